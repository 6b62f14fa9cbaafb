"""Security defaults: no project code unpickles data. (Every socket of a running job listens on loopback only:
tests/test_metrics.py checks it on the job its Prometheus scrapes.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


SOURCES = [p for folder in ("cluster", "rollout", "rewards", "learner", "bench") for p in (ROOT / folder).rglob("*.py")]


@pytest.mark.parametrize("pattern,why", [
    (r"\bimport pickle\b|\bfrom pickle\b|\bcloudpickle\b|\bdill\b", "pickle"),
    (r"allow_pickle\s*=\s*True", "numpy pickle"),
    (r"weights_only\s*=\s*False", "torch.load of pickles"),
])
def test_no_code_unpickles(pattern, why):
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(pattern, line)]
    assert hits == [], f"{why}: {hits}"


def test_every_torch_load_is_weights_only():
    calls = [(p, m) for p in SOURCES for m in re.finditer(r"torch\.load\(([^)]*)\)", p.read_text())]
    assert calls, "no torch.load found: the scan is looking in the wrong place"
    assert [str(p.relative_to(ROOT)) for p, m in calls if "weights_only=True" not in m.group(1)] == []
