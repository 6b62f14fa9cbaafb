"""Every shipped config (cluster/*.yaml) names inputs that a fresh clone has: each prompt file is in the repository,
and the model and each scorer's weights are in the repository or given as hub ids (downloaded on first use).

Paths resolve against the repository root, where the job starts (or Ray's copy of it under `ray job submit
--working-dir .`, which carries the same files)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cluster.config import FILE_SOURCES
from cluster.config_loading import load_config
from rewards.registry import scorer_class

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "cluster").glob("*.yaml"))
# Model folders that a command builds first, as the config's header says (bench/shapes_base.py: 15-25 min on 2 cores).
BUILT_FIRST = {".cache/shapes-base": "bench/shapes_base.py --out .cache/shapes-base"}


def is_hub_id(value: str) -> bool:
    """'owner/name' as the Hugging Face Hub spells a repository, and no local path of that name."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value) is not None and not (ROOT / value).exists()


def inputs(cfg) -> tuple[dict[str, str], dict[str, str]]:
    """(the prompt files it reads: field -> path, the model and scorer weights: field -> path or hub id)."""
    files = {"data.path": cfg.data.path if cfg.data.source in FILE_SOURCES else None,
             "data.exclude_path": cfg.data.exclude_path,
             "eval.path": cfg.eval.path if cfg.eval.every_n_iterations and cfg.eval.source in FILE_SOURCES else None}
    weights = {"model.path": None if cfg.model.build_tiny else cfg.model.path}  # build_tiny: built on first use
    for i, spec in enumerate(cfg.rewards.scorers):
        paths = scorer_class(spec.name).path_options  # the options that name weights (rewards/base.py)
        weights.update({f"rewards.scorers.{i}.options.{option}": value
                        for option, value in spec.options.items() if option in paths and value})
    return ({k: v for k, v in files.items() if v}, {k: v for k, v in weights.items() if v})


def test_the_configs_are_there():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "flux.yaml", "sd3.yaml", "micro.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_input_of_a_shipped_config_is_in_the_repository_or_a_hub_id(path):
    cfg = load_config(path)
    files, weights = inputs(cfg)
    for field, value in files.items():
        assert not Path(value).is_absolute() and (ROOT / value).is_file(), \
            f"{path.name}: {field} = {value!r} is not a file of the repository"
    for field, value in weights.items():
        if value in BUILT_FIRST:
            assert BUILT_FIRST[value] in path.read_text(), f"{path.name}: says nothing of how {value} is built"
            continue
        assert not Path(value).is_absolute() and ((ROOT / value).exists() or is_hub_id(value)), \
            f"{path.name}: {field} = {value!r} is neither a path in the repository nor a hub id"


def test_the_prompt_sets_are_the_papers():
    """data/ holds Flow-GRPO's prompt sets whole (data/README.md): a file cut short fails here."""
    lines = {name: len((ROOT / "data" / name).read_text(encoding="utf-8").splitlines())
             for name in ("pickscore/train.txt", "pickscore/test.txt", "geneval/test_metadata.jsonl", "ocr/test.txt")}
    assert lines == {"pickscore/train.txt": 25432, "pickscore/test.txt": 2048, "geneval/test_metadata.jsonl": 2212,
                     "ocr/test.txt": 1018}
    assert "MIT License" in (ROOT / "data" / "README.md").read_text()
