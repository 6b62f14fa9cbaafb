"""`ray job submit` of a shipped config as written, to a one-node cluster started with `ray start --head`: the job runs
in Ray's temporary copy of the submitted folder, so its relative output_dir goes to ~/flowrl_runs/<run_name> (HOME is
a folder of the test's own here), which it says first, and its outputs are there once it has succeeded.

Only the processes of the cluster this test started are stopped: `ray stop` would stop every Ray on the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.bench_helpers import load_bench
from tests.jobs import MAIN, ROOT, VENV_BIN, history, job_args, job_env

local_cluster = load_bench("local_cluster")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(temp_dir: Path, gcs_port: int) -> None:
    """Kill the processes of the cluster started with `temp_dir` and their children: those whose command line names
    that folder, and the Ray client server, whose command line names only the cluster's GCS address."""
    local_cluster.stop_processes_of(temp_dir, re.compile(rf"127\.0\.0\.1:{gcs_port}\b"))


@pytest.fixture
def one_node(tmp_path):
    """A one-node cluster on 127.0.0.1 (2 CPUs, the dashboard that takes job submissions), started as a user starts
    one, with HOME at tmp_path/home; (its dashboard address, the job's environment)."""
    temp_dir = Path("/tmp") / f"flowrl-js-{os.getpid()}"  # short: Ray's socket paths are limited
    home = tmp_path / "home"
    home.mkdir()
    env = job_env(HOME=str(home), RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    gcs_port, dashboard_port = free_port(), free_port()
    try:
        r = subprocess.run(
            [str(VENV_BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
             f"--temp-dir={temp_dir}", "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}", "--disable-usage-stats"],
            env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        stop_cluster(temp_dir, gcs_port)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_tiny_yaml_submitted_as_written_runs_and_keeps_its_outputs(one_node, tmp_path):
    dashboard, env = one_node
    # `ray job submit --address <dashboard> --working-dir . -- python -m learner.main --cfg cluster/tiny.yaml`, with
    # 2 of its 50 iterations
    r = local_cluster.submit_job(str(VENV_BIN / "ray"), dashboard, ["python", *MAIN, *job_args("tiny", "iterations=2")],
                                 ROOT, env)
    said = r.stdout + r.stderr
    assert r.returncode == 0 and re.search(r"Job 'raysubmit_\w+' succeeded", said), said[-4000:]
    out = tmp_path / "home" / "flowrl_runs" / "tiny"
    lines = [ln for ln in said.splitlines() if ln.startswith("[flowrl]")]
    assert "(Ray's copy of the submitted folder)" in lines[1], lines[:4]
    assert lines[2] == f"[flowrl] outputs go to {out}, checkpoints to {out / 'checkpoints'}"
    assert "joined the Ray cluster at 127.0.0.1:" in said and "done: 2 iterations" in said
    assert [h["iteration"] for h in history(out)] == [1, 2]
    assert (out / "checkpoints" / "iter-000002" / "trainer.json").is_file()
    assert (out / "eval" / "results.jsonl").is_file()
