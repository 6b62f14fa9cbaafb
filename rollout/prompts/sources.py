"""Build the training and evaluation prompt lists that the config's `data` and `eval` sections name."""

from __future__ import annotations

from cluster.config import DataConfig, EvalConfig
from rollout.prompts.files import builtin_prompts, read_geneval_jsonl, read_text_prompts
from rollout.prompts.geneval import generate_geneval_prompts, refuse_test_overlap
from rollout.prompts.groups import PromptItem
from rollout.shapes.data import shapes_prompts


def _read(source: str, path: str | None) -> list[PromptItem]:
    if source == "builtin":
        return builtin_prompts()
    if source == "text":
        return read_text_prompts(path)
    if source == "geneval_jsonl":
        return read_geneval_jsonl(path)
    if source.startswith("shapes_"):
        return shapes_prompts(source.removeprefix("shapes_"))
    raise ValueError(f"unknown prompt source {source!r}")


def training_prompts(data: DataConfig, *, seed: int = 0) -> list[PromptItem]:
    """The training prompts; none may be a prompt of `data.exclude_path` (the GenEval test file), else ValueError."""
    test = read_geneval_jsonl(data.exclude_path) if data.exclude_path else []
    if data.source == "geneval_generate":
        return generate_geneval_prompts(data.num_prompts, seed=seed, exclude=test)
    items = _read(data.source, data.path)
    if test:
        refuse_test_overlap(items, test, test_name=data.exclude_path)
    return items


def eval_prompts(ev: EvalConfig) -> list[PromptItem]:
    """The evaluation prompts, the first `eval.num_prompts` of the source (all when unset)."""
    items = _read(ev.source, ev.path)
    return items[: ev.num_prompts] if ev.num_prompts else items
