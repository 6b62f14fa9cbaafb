"""Security defaults: every socket of a running job listens on loopback only, and no project code unpickles data."""

from __future__ import annotations

import re
from pathlib import Path

import psutil
import pytest

from tests.jobs import job_env, start_job

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listening(root_pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket and bound UDP socket of a process tree."""
    found = []
    root = psutil.Process(root_pid)
    for proc in [root] + root.children(recursive=True):
        try:
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.type == 2 and c.laddr and not c.raddr):
                    found.append((c.laddr.ip, c.laddr.port, proc.name()))
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_a_tiny_job_listens_on_loopback_only(tmp_path):
    """Two learner ranks (torch.distributed store + gloo), rollout and reward actors, the metrics agent and the
    Ray dashboard: all on 127.0.0.1, listed while the job trains."""
    env = job_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=None)
    sockets, output = [], []
    with start_job("tiny", "iterations=4", "metrics.port=0", "ray.include_dashboard=true", "learner.num_actors=2",
                   "learner.num_cpus_per_actor=0.25", "eval.every_n_iterations=0", "checkpoint.every_n_iterations=0",
                   out=tmp_path, env=env) as job:
        for line in job.stdout:
            output.append(line)
            if "iter 2/4" in line:
                sockets = listening(job.pid)
                break
        rest, _ = job.communicate(timeout=300)
    assert job.returncode == 0, "".join(output[-30:]) + rest[-3000:]
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names and any("LearnerActor" in n for n in names), sorted(names)
    assert [s for s in sockets if s[0] not in LOOPBACK] == []


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
