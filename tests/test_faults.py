"""Fault injection on the tiny job: dead and hung actors, NaN rewards, non-finite updates, a stop mid-checkpoint.
Nothing may be lost, trained twice or silently corrupted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.jobs import ROOT, job_env, run_job


@pytest.mark.slow
def test_dead_and_hung_actors_and_nan_rewards_lose_nothing(tmp_path, tiny_model_dirs):
    r = subprocess.run([sys.executable, "-m", "tests.fault_run", str(tmp_path), str(tiny_model_dirs["flux"])],
                       cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    history, counters, metrics = report["history"], report["counters"], report["metrics"]

    # the run completed; 8 prompts x 1 epoch = 8 groups, each trained once and whole, but the NaN one
    assert [h["iteration"] for h in history] == [1, 2, 3, 4]
    trained = [g for h in history for g in h["group_ids"]]
    assert len(trained) == len(set(trained)) == 7
    assert sum(h["groups_dropped"] for h in history) == 1
    assert all(h["samples"] == 8 * h["groups"] for h in history)
    dropped = [line for line in report["said"] if "dropped" in line]
    assert len(dropped) == 1 and "'a poison apple'" in dropped[0] and "non-finite" in dropped[0]

    # the killed rollout actor: restarted by Ray, its group sampled again, with the current weights (no staleness)
    assert report["requeued"] >= 1
    assert report["rollout_pids_after"][0] != report["rollout_pids"][0]
    assert all(h["staleness"] == 0 for h in history)

    # the killed and the hung reward actor: retried; the NaN group failed loudly; every event counted in the metrics
    assert counters["actor_failures"] >= 1 and counters["timeouts"] >= 1 and counters["retries"] >= 2
    assert counters["nonfinite"] == 1 and counters["groups_failed"] == 1
    assert metrics["ray_flowrl_groups_requeued_total"] == report["requeued"]
    assert metrics["ray_flowrl_reward_events_total{timeout}"] == counters["timeouts"]
    assert metrics["ray_flowrl_reward_events_total{actor_failure}"] == counters["actor_failures"]
    assert metrics["ray_flowrl_reward_events_total{nonfinite}"] == 1
    assert metrics["ray_flowrl_groups_dropped_total"] == 1
    assert metrics["ray_flowrl_groups_trained_total"] == 7

    # every survived event said once when it happened, and counted in its iteration's history line
    events = {kind: sum(h["events"][kind] for h in history) for kind in history[0]["events"]}
    said = report["said"]
    assert sum(h["groups_requeued"] for h in history) == report["requeued"]
    assert events["rollout_actor_died"] + events["rollout_actor_lost"] == report["requeued"]
    assert sum("is queued again" in line for line in said) == report["requeued"]
    assert events["reward_actor_failed"] == counters["actor_failures"]
    assert sum(line.startswith("reward actor ") and "failed on group" in line for line in said) \
        == counters["actor_failures"]
    assert events["reward_timeout"] == counters["timeouts"]
    assert sum("gave no answer within 4 s" in line for line in said) == counters["timeouts"]
    assert events["reward_retry"] == counters["retries"] == sum("sent again" in line for line in said)


SMALL = ["data.images_per_iteration=16", "eval.every_n_iterations=0", "metrics.port=0"]


# The job, with the driver's last step of a checkpoint (writing trainer.json, once every rank wrote its shard) replaced
# by one that SIGKILLs the process instead in the checkpoint of iteration 4 (after printing the hashes of iteration 2's).
KILLED_MID_CHECKPOINT = r"""
import hashlib, json, os, signal, sys
from pathlib import Path
import learner.main  # first: it keeps Ray on loopback
import learner.ranks.checkpoint as checkpoint

write = checkpoint.write_trainer

def write_then_die(folder, trainer):
    if "iter-000004" in str(folder):
        previous = Path(folder).parent / "iter-000002"
        digest = {str(p.relative_to(previous)): hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in sorted(previous.rglob("*")) if p.is_file()}
        print("PREVIOUS " + json.dumps(digest), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    write(folder, trainer)

checkpoint.write_trainer = write_then_die
sys.exit(learner.main.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_kill_in_the_middle_of_a_checkpoint_keeps_the_previous_one_and_resume_auto_goes_on(tmp_path):
    import hashlib

    from tests.bench_helpers import load_bench

    stop_cluster = load_bench("local_cluster").stop_processes_of

    out = tmp_path / "run"
    ray_tmp = Path("/tmp") / f"flowrl-ck-{os.getpid()}"  # short: Ray's socket paths are limited
    try:
        r = run_job("tiny", *SMALL, "iterations=4", "checkpoint.every_n_iterations=2", out=out, expect_rc=-9,
                    env=job_env(RAY_TMPDIR=str(ray_tmp)), script=KILLED_MID_CHECKPOINT)
    finally:
        stop_cluster(ray_tmp)  # the killed driver's Ray processes
        shutil.rmtree(ray_tmp, ignore_errors=True)
    previous = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("PREVIOUS "))[9:])

    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["iter-000002"]
    [partial] = list(root.glob(".tmp-iter-000004-*"))  # what the kill left: never taken for a checkpoint
    assert not (partial / "trainer.json").exists()
    now = {str(p.relative_to(root / "iter-000002")): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted((root / "iter-000002").rglob("*")) if p.is_file()}
    assert now == previous and "trainer.json" in now
    run_id = json.loads((root / "iter-000002" / "trainer.json").read_text())["run_id"]

    # a second, fresh run into the same folder: refused before Ray starts, the run's files left as they were
    r = run_job("tiny", *SMALL, "iterations=4", out=out, expect_rc=2)
    assert "--resume auto" in r.stderr and "a new output_dir or checkpoint.storage" in r.stderr, r.stderr
    assert "started a local Ray" not in r.stdout and partial.is_dir()
    assert {str(p.relative_to(root / "iter-000002")): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "iter-000002").rglob("*")) if p.is_file()} == previous

    # the run goes on under its own id; a training key changed on purpose is given with --set
    r = run_job("tiny", *SMALL, "iterations=4", "checkpoint.every_n_iterations=2", "learner.lr=0.02", out=out,
                resume="auto")
    assert f"resumed from {root / 'iter-000002'} at iteration 2" in r.stdout
    assert sorted(p.name for p in root.iterdir()) == ["iter-000002", "iter-000004"]  # the leftover is gone
    last = json.loads((root / "iter-000004" / "trainer.json").read_text())
    assert last["run_id"] == run_id and last["training_config"]["learner.lr"] == 0.02
    rows = [json.loads(ln) for ln in (out / "history.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in rows] == [1, 2, 3, 4]  # iteration 3 of the killed run is not kept twice
    assert rows[-1]["policy_version"] == 4


@pytest.mark.slow
def test_updates_skipped_in_a_row_stop_the_job_with_a_clear_message(tmp_path):
    """lr 1e30: the first update leaves weights whose forward overflows, so every later update is non-finite."""
    r = run_job("tiny", *SMALL, "iterations=8", "learner.lr=1e30", "learner.max_skipped_updates=2",
                "checkpoint.every_n_iterations=0", out=tmp_path, expect_rc=1)
    assert "iter 1/8 v1" in r.stdout and "update skipped for a non-finite loss or gradient (1 in a row" in r.stdout
    errors = r.errors
    assert len(errors) == 1 and "2 updates in a row were skipped" in errors[0]
    assert "learner.max_skipped_updates = 2" in errors[0] and "policy version 1" in errors[0]
    assert "Traceback" not in r.stderr


# The job, with a rollout actor killed (Ray restarts it) as the evaluation of iteration 3 starts.
KILLED_DURING_EVALUATION = r"""
import sys
import ray
import learner.main  # first: it keeps Ray on loopback
import learner.driver.job as job

evaluate = job.evaluate

def kill_then_evaluate(cfg, pool, rewards, weights, iteration):
    if iteration == 3:
        ray.kill(pool.workers[0], no_restart=False)
    return evaluate(cfg, pool, rewards, weights, iteration)

job.evaluate = kill_then_evaluate
sys.exit(learner.main.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_an_evaluation_that_fails_is_reported_and_the_checkpoint_still_written(tmp_path):
    out = tmp_path / "run"
    r = run_job("tiny", *SMALL, "iterations=4", "eval.every_n_iterations=3", "eval.at_start=false",
                "checkpoint.every_n_iterations=3", out=out, script=KILLED_DURING_EVALUATION)
    rows = r.history
    assert [h["iteration"] for h in rows] == [1, 2, 3, 4]
    assert rows[2]["eval"]["error"] and rows[2]["events"]["evaluation_failed"] == 1
    assert r.stdout.count("the evaluation of iteration 3 failed") == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter-000003", "iter-000004"]
    evaluations = [json.loads(ln) for ln in (out / "eval" / "results.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evaluations] == [4]  # the next one, after the actor's restart, is whole


# The job, with its rollout pool declared lost while it collects iteration 3's groups.
POOL_LOST_AT_ITERATION_3 = r"""
import sys
import learner.main  # first: it keeps Ray on loopback
from learner.driver.job import Job
from rollout.pool import RolloutPoolLost

collect = Job.collect

def collect_or_fail(self, version, wanted=None):
    if self.iteration == 2:
        raise RolloutPoolLost("no rollout actor has answered (injected)")
    return collect(self, version, wanted)

Job.collect = collect_or_fail
sys.exit(learner.main.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_fatal_error_outside_the_learner_leaves_an_emergency_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = run_job("tiny", *SMALL, "iterations=3", "checkpoint.every_n_iterations=0", out=out, expect_rc=1,
                script=POOL_LOST_AT_ITERATION_3)
    assert r.errors and "RolloutPoolLost" in r.errors[0]
    assert f"emergency checkpoint of iteration 2 written to {out / 'checkpoints' / 'iter-000002'}" in r.stdout
    assert "--resume auto" in r.stdout
    r = run_job("tiny", *SMALL, "iterations=3", "checkpoint.every_n_iterations=0", out=out, resume="auto")
    assert "at iteration 2" in r.stdout
    assert [h["iteration"] for h in r.history] == [1, 2, 3] and r.history[-1]["policy_version"] == 3
