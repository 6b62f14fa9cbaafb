"""Security defaults: every socket of a running job listens on loopback only, and no project code unpickles data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

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
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    job = subprocess.Popen(
        [sys.executable, "-m", "learner.main", "--cfg", "cluster/tiny.yaml", "--set", "iterations=4",
         "--set", f"output_dir={tmp_path}", "--set", "metrics.port=0", "--set", "ray.include_dashboard=true",
         "--set", "learner.num_actors=2", "--set", "learner.num_cpus_per_actor=0.25",
         "--set", "eval.every_n_iterations=0", "--set", "checkpoint.every_n_iterations=0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sockets, output = [], []
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
