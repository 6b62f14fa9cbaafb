"""The inputs a job reads (prompt files, the model, the scorers' weights: local paths or hub ids), and the check that
finds every missing one at once, one line each. A hub id that is not in the local Hugging Face cache is missing only
when it cannot be downloaded (HF_HUB_OFFLINE=1, or the hub does not give it), or in a dry run, which downloads nothing;
otherwise the job downloads it first, and says so with the download's size. Run by learner/driver/preflight.py in the
driver and by learner/driver/placement.py on the nodes of a cluster.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from cluster.config import FILE_SOURCES, JobConfig


class InputError(ValueError):
    """An input of the job (a folder, a name or an option in the config) that cannot work; one line says why (one
    line per input when several are missing)."""


@dataclass(frozen=True)
class Input:
    """One thing the job reads, as the config names it: a local path, or (unless `holds` is "prompts") a hub id."""

    field: str  # e.g. "data.path", "model.path", "rewards.scorers.0.options.path"
    value: str
    holds: str  # "prompts" (a local file), "diffusers" (a pipeline folder), or a scorer's kind: Scorer.path_options
    filename: str | None = None  # "file" in a hub repo: the file read from it
    patterns: tuple[str, ...] = ()  # "diffusers" from the hub: the files read from it


def driver_inputs(cfg: JobConfig) -> list[Input]:
    """The prompt files, which the driver reads."""
    named = [("data.path", cfg.data.path if cfg.data.source in FILE_SOURCES else None),
             ("data.exclude_path", cfg.data.exclude_path),
             ("eval.path", cfg.eval.path if cfg.eval.every_n_iterations and cfg.eval.source in FILE_SOURCES else None)]
    return [Input(field, value, "prompts") for field, value in named if value]


def model_inputs(cfg: JobConfig, parts: tuple[str, ...] | None = None) -> list[Input]:
    """The model folder or hub id (none with `model.build_tiny`: the job builds it); `parts`: what is loaded."""
    from rollout.models.loading import PARTS, hub_patterns

    m = cfg.model
    if m.build_tiny:
        return []
    return [Input("model.path", m.path, "diffusers", patterns=tuple(hub_patterns(m.family, parts or PARTS)))]


def scorer_inputs(name: str, options: dict, field: str) -> list[Input]:
    """The weights a scorer reads (its `path_options`, defaults included); none for a scorer name or options that
    `check_rewards` refuses."""
    from rewards.registry import scorer_class

    try:
        cls = scorer_class(name)
        bound = inspect.signature(cls.check).bind(**options)
    except (ValueError, TypeError):
        return []
    bound.apply_defaults()
    args = bound.arguments
    return [Input(f"{field}.{option}", str(args[option]), holds,
                  filename=args.get("filename") if holds == "file" else None)
            for option, holds in cls.path_options.items() if args.get(option)]


def inputs_here(inputs: list[Input], dry_run: bool = False) -> list[str]:
    """On this node: every input is there, or (a hub id) can be downloaded; InputError listing every one that is
    missing, one line each. A hub id not in the local cache is missing offline (HF_HUB_OFFLINE=1), when the hub does
    not give it, and in a dry run (which downloads nothing); otherwise the job downloads it first: one line each of
    those is returned, with the download's size."""
    problems, downloads = [], []
    for i in inputs:
        problem, download = _input_problem(i, dry_run)
        problems += [problem] if problem else []
        downloads += [download] if download else []
    if len(problems) == 1:
        raise InputError(problems[0])
    if problems:
        raise InputError(f"{len(problems)} inputs are missing:\n" + "\n".join(f"  {p}" for p in problems))
    return downloads


def _input_problem(i: Input, dry_run: bool) -> tuple[str | None, str | None]:
    """(why the input is missing, or None; a line saying it will be downloaded, or None)."""
    from rollout.models.loading import looks_like_hub_id

    if Path(i.value).exists():
        return None, None
    if i.holds == "prompts":
        return f"{i.field}: {i.value}: prompt file not found", None
    if i.holds == "file" and not i.filename:
        return f"{i.field} {i.value!r}: no such file; give a local file", None
    if not looks_like_hub_id(i.value):
        what = ("folder", "a local diffusers folder") if i.holds == "diffusers" else ("file or folder", "a local path")
        return f"{i.field} {i.value!r}: no such {what[0]} (and not a hub id like 'org/name'); give {what[1]} or a " \
               f"hub id", None
    return _hub_problem(i, dry_run)


def _hub_problem(i: Input, dry_run: bool) -> tuple[str | None, str | None]:
    from huggingface_hub import constants

    from cluster.errors import described

    where = f"{i.field} {i.value!r}" + (f" (file {i.filename!r})" if i.filename else "")
    if _in_hub_cache(i):
        return None, None
    if constants.is_offline_mode():
        return (f"{where}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 is set (size unknown (offline)); "
                f"unset HF_HUB_OFFLINE to download it, or point {i.field} at a local copy"), None
    try:
        size = _download_size(i)
    except Exception as e:  # noqa: BLE001 - whatever the hub says (no such repo, gated, no network) is the reason
        return (f"{where}: not in the local Hugging Face cache, and the hub does not give it ({described(e)}); check "
                f"the id, your access to it (a gated model needs `hf auth login`) and the network, or point "
                f"{i.field} at a local copy"), None
    if dry_run:
        return (f"{where}: not in the local Hugging Face cache; a run downloads it ({size}), the dry run downloads "
                f"nothing"), None
    return None, f"{where}: not in the local Hugging Face cache; downloading it first ({size})"


def _in_hub_cache(i: Input) -> bool:
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    if i.filename:
        return isinstance(try_to_load_from_cache(i.value, i.filename), str)
    try:
        snapshot_download(i.value, local_files_only=True)
    except Exception:  # noqa: BLE001 - not there, whatever the reason
        return False
    return True


def _download_size(i: Input) -> str:
    """What downloading the input's files weighs, as the hub lists them (it needs the network)."""
    from huggingface_hub import HfApi

    sizes = {f.rfilename: f.size or 0 for f in HfApi().model_info(i.value, files_metadata=True).siblings or ()}
    if i.filename:
        if i.filename not in sizes:
            raise LookupError(f"the repository has no file {i.filename!r}")
        chosen = [i.filename]
    elif i.patterns:
        chosen = [f for f in sizes if any(fnmatch(f, p) for p in i.patterns)]
    else:  # what transformers' from_pretrained reads: the top folder's configs, and (a model) its preferred weights
        top = [f for f in sizes if "/" not in f]
        weights = [f for f in top if f.endswith(".safetensors")] or [f for f in top if f.endswith(".bin")]
        chosen = [f for f in top if f.endswith((".json", ".txt"))] + (weights if i.holds == "model" else [])
    total = sum(sizes[f] for f in chosen)
    return f"{total / 1e9:.1f} GB" if total >= 1e8 else f"{total / 1e6:.1f} MB"


def check_inputs(cfg: JobConfig, dry_run: bool = False) -> list[str]:
    """`inputs_here` for the prompt files and, on a local Ray, the model and every scorer's weights (a job that joins
    a cluster checks those on the nodes where the pools are placed); the lines of what is downloaded first."""
    inputs = driver_inputs(cfg)
    from cluster.runtime import joins_cluster

    if not joins_cluster(cfg.ray):
        inputs += model_inputs(cfg)
        for index, spec in enumerate(cfg.rewards.scorers):
            inputs += scorer_inputs(spec.name, spec.options, f"rewards.scorers.{index}.options")
    return inputs_here(inputs, dry_run)
