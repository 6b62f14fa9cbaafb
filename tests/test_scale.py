"""`python -m cluster.scale` resizes the rollout pool of a running job: the tiny job scaled 1 -> 3 -> 1 while it trains
trains every group once, the actor-count gauge follows, a size the cluster cannot place is refused and changes
nothing, and `--show` lists the pools' actors with their nodes and policy versions."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.jobs import ROOT, history, job_env, start_job

JOB = ["iterations=60", "data.images_per_iteration=16", "data.group_size=4", "rollout.samples_per_forward=4",
       "learner.micro_batch_size=4", "eval.every_n_iterations=0", "checkpoint.every_n_iterations=0",
       "metrics.port=0", "run_name=scaled", "rollout.num_actors=1", "rollout.num_cpus_per_actor=0.25",
       "ray.placement_timeout_s=5"]


def clean_env() -> dict[str, str]:
    """No Ray address from outside; token auth off (an earlier local Ray on this machine may have switched it on, and
    the job's Ray and the command must agree)."""
    return job_env(RAY_AUTH_MODE="disabled")


def scale(address: str, *args: str, run: str = "scaled") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.scale", "--run", run, "--address", address, *args],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)


def gauge(endpoint: str) -> float | None:
    """ray_flowrl_actors_alive{pool="rollout"} on the job's metrics endpoint, if exported yet."""
    text = urllib.request.urlopen(endpoint, timeout=10).read().decode()
    found = re.findall(r'^ray_flowrl_actors_alive\{[^}]*pool="rollout"[^}]*\} (\S+)$', text, re.M)
    return float(found[-1]) if found else None


def wait_for(condition, what: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the job ended before {what}: " + log.read_text()[-3000:]
        assert time.monotonic() < end, f"no {what} within {timeout} s: " + log.read_text()[-3000:]
        time.sleep(0.5)


@pytest.mark.slow
def test_a_running_job_is_scaled_1_3_1_and_trains_every_group_once(tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    env = {**clean_env(), "RAY_metrics_report_interval_ms": "1000"}
    with start_job("tiny", *JOB, out=out, log=log, env=env) as proc:
        wait_for(lambda: "iter 2/60" in log.read_text(), "two iterations", proc, log)
        said = log.read_text()
        address = re.search(r"started a local Ray on 127\.0\.0\.1 \(address (\S+)\)", said).group(1)
        endpoint = re.search(r"metrics: (http://\S+/metrics)", said).group(1)

        r = scale(address, "--rollout", "3")
        assert r.returncode == 0 and "rollout pool resized from 1 to 3 actors" in r.stdout, r.stderr[-2000:]
        wait_for(lambda: gauge(endpoint) == 3, "the gauge at 3", proc, log)
        shown = scale(address, "--show")
        assert shown.returncode == 0, shown.stderr[-2000:]
        rollout_rows = [ln for ln in shown.stdout.splitlines() if ln.startswith("| rollout |")]
        assert len(rollout_rows) == 3 and any("| learner | rank-0 |" in ln for ln in shown.stdout.splitlines())
        r = scale(address, "--show", run="another")
        assert r.returncode == 2 and "no running job named 'another'" in r.stderr, r.stdout + r.stderr

        r = scale(address, "--rollout", "20")  # 20 x 0.25 CPU: more than the local Ray's 2 CPUs hold
        assert r.returncode == 2 and "rollout pool kept at 3 actors" in r.stderr, r.stdout + r.stderr
        assert "cannot be placed" in r.stderr

        r = scale(address, "--rollout", "1")
        assert r.returncode == 0 and "rollout pool resized from 3 to 1 actors" in r.stdout, r.stderr[-2000:]
        wait_for(lambda: gauge(endpoint) == 1, "the gauge at 1", proc, log)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    said = log.read_text()
    assert said.count("rollout pool resized") == 2 and "rollout pool kept at 3 actors" in said
    rows = history(out)
    assert [h["iteration"] for h in rows] == list(range(1, 61))
    trained = [g for h in rows for g in h["group_ids"]]
    assert len(trained) == len(set(trained)) == 60 * 4 and sorted(trained) == list(range(240))

    r = scale(address, "--rollout", "2")  # the job is gone: its control actor too
    assert r.returncode == 2 and "nothing answers at" in r.stderr, r.stdout + r.stderr
