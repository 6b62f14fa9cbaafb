"""The tiny job on a real three-node Ray cluster on this machine (bench/local_cluster.py): pools placed on chosen nodes
through custom resources, a placement that no node can hold, the loss of the rollout node (with groups being
sampled, with scored groups whose records the learner had not fetched yet, and during an evaluation), of the learner
node, and of a slow reward actor's node.

Nodes: the head (1 CPU, `head`: the driver's node, the reward actor's), a rollout node (2 CPUs, `rollout_node`) and
a learner node (1 CPU, `learner_node`); the tests add nodes back after killing one. Only the raylets this module
started are stopped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bench_helpers import load_bench
from tests.jobs import MAIN, ROOT, VENV_BIN, history, job_args, job_env, run_job, start_job

local_cluster = load_bench("local_cluster")
LocalCluster, submit_job = local_cluster.LocalCluster, local_cluster.submit_job
PINNED = ["rollout.resources={rollout_node: 0.1}", "learner.resources={learner_node: 0.1}",
          "rewards.resources={head: 0.1}"]
SMALL = ["data.images_per_iteration=16", "data.group_size=4", "rollout.samples_per_forward=4",
         "learner.micro_batch_size=4", "eval.every_n_iterations=0", "checkpoint.every_n_iterations=1",
         "metrics.port=0", "rollout.node_wait_s=120"]


@pytest.fixture
def cluster(three_nodes):
    """The three-node cluster, with the rollout and learner nodes there again after a test that killed one."""
    yield three_nodes
    for name, resources in (("rollout", {"rollout_node": 1}), ("learner", {"learner_node": 1})):
        if name not in three_nodes.nodes:
            three_nodes.add(name, 2 if name == "rollout" else 1, resources)


@pytest.fixture(scope="module")
def three_nodes():
    host = LocalCluster(Path("/tmp") / f"flowrl-mn-{os.getpid()}", {"head": 1}, cluster_env())  # a short path: Ray's
    # socket paths are limited
    try:
        host.add("rollout", 2, {"rollout_node": 1})
        host.add("learner", 1, {"learner_node": 1})
        yield host
    finally:
        host.close()


def cluster_env(cluster: LocalCluster | None = None) -> dict[str, str]:
    """Token auth off, loopback only; with `cluster`, a job joins it."""
    return job_env(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                   RAY_ADDRESS=cluster.address if cluster is not None else None)


def wait_for_iterations(out: Path, count: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while len(history(out)) < count:
        assert proc.poll() is None, f"the job ended early (exit {proc.returncode})"
        assert time.monotonic() < end, f"no {count} iterations within {timeout} s"
        time.sleep(0.2)


@pytest.mark.slow
def test_submitted_job_runs_its_pools_on_the_chosen_nodes(cluster, tmp_path):
    out = tmp_path / "run"
    command = ["python", *MAIN, *job_args("tiny", *PINNED, *SMALL, "iterations=3", out=out)]
    r = submit_job(str(VENV_BIN / "ray"), cluster.dashboard, command, ROOT, cluster_env())
    logs = sorted(cluster.temp_dir.glob("session_*/logs/dashboard*.log"))  # what the head says, if it failed
    assert r.returncode == 0, r.stderr[-1500:] + "".join(f"\n== {p}\n{p.read_text()[-1500:]}" for p in logs)
    assert "joined the Ray cluster" in r.stdout and "done: 3 iterations" in r.stdout
    rows = history(out)
    assert [h["iteration"] for h in rows] == [1, 2, 3]
    # iteration 3 was sampled on the rollout node with version 2, published by the learner node: weights crossed
    assert [h["sampled_policy_versions"] for h in rows] == [[0], [1], [2]]

    listed = subprocess.run([str(VENV_BIN / "ray"), "list", "actors", f"--address={cluster.dashboard}", "--detail",
                             "--format=json", "--limit=1000"], env=cluster_env(), capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    nodes: dict[str, set[str]] = {}
    for actor in json.loads(listed.stdout):
        nodes.setdefault(actor["class_name"], set()).add(actor["node_id"])
    assert nodes["RolloutWorker"] == {cluster.nodes["rollout"]}
    assert nodes["LearnerActor"] == {cluster.nodes["learner"]}
    assert cluster.nodes["rollout"] not in nodes["ScorerActor"] | nodes["WeightStore"]
    assert cluster.nodes["learner"] not in nodes["ScorerActor"] | nodes["WeightStore"]


@pytest.mark.slow
def test_pools_that_cannot_be_placed_are_refused_naming_each_node(cluster, tmp_path):
    # 2.5 CPUs per learner rank: the cluster has 4 in all, but no node more than 2
    r = run_job("tiny", *PINNED, *SMALL, "learner.num_cpus_per_actor=2.5", out=tmp_path, dry_run=True, expect_rc=2,
                timeout=300, env=cluster_env(cluster))
    [error] = r.errors
    assert "PlacementError: pool 'learner': 1 bundle(s) of {CPU 2.5, learner_node 0.1}" in error
    assert "no node can hold one bundle" in error
    for node_id in cluster.nodes.values():
        assert f"node {node_id[:8]} has: CPU" in error
    assert "Traceback" not in r.stderr

    # each pool fits the rollout node alone, not together: the learner (reserved first) takes a CPU the rollouts need
    together = ["learner.resources={rollout_node: 0.1}", "rollout.num_actors=2", "rollout.num_cpus_per_actor=1",
                "ray.placement_timeout_s=3"]
    r = run_job("tiny", *PINNED, *SMALL, *together, out=tmp_path, dry_run=True, expect_rc=2, timeout=300,
                env=cluster_env(cluster))
    [error] = r.errors
    assert "pool 'rollout': 2 bundle(s) of {CPU 1, rollout_node 0.1} (PACK) were not placed within 3 s" in error
    assert f"node {cluster.nodes['rollout'][:8]} has free: CPU 1.5," in error

    r = run_job("tiny", *PINNED, *SMALL, "rollout.num_actors=2", out=tmp_path, dry_run=True, timeout=300,
                env=cluster_env(cluster))
    assert f"learner: 1 x {{CPU 0.5, learner_node 0.1}} (PACK), checked on node {cluster.nodes['learner'][:8]}" \
        in r.stdout
    assert f"rollout: 2 x {{CPU 0.5, rollout_node 0.1}} (PACK), checked on node {cluster.nodes['rollout'][:8]}" \
        in r.stdout
    assert "dry run: every check passed" in r.stdout and not (tmp_path / "history.jsonl").exists()


@pytest.mark.slow
def test_losing_the_rollout_node_requeues_its_groups_and_the_job_completes(cluster, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    with start_job("tiny", *PINNED, *SMALL, "iterations=6", out=out, log=log, env=cluster_env(cluster)) as proc:
        wait_for_iterations(out, 2, proc)
        killed_at = cluster.kill("rollout")
        done_at_kill = len(history(out))
        end = time.monotonic() + 60  # no other node can take the rollout bundles: the pool waits
        while "left the cluster" not in log.read_text():
            assert time.monotonic() < end and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        added_at = time.time()
        cluster.add("rollout", 2, {"rollout_node": 1})
        wait_for_iterations(out, done_at_kill + 1, proc)
        trained_again_at = time.time()
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    rows = history(out)
    said = log.read_text()
    assert [h["iteration"] for h in rows] == [1, 2, 3, 4, 5, 6]
    trained = [g for h in rows for g in h["group_ids"]]
    assert len(trained) == len(set(trained)) == 6 * 4  # every group trained once and whole
    assert all(h["samples"] == 16 for h in rows)
    requeued = sum(h["groups_requeued"] for h in rows)
    lost = sum(h["events"]["rollout_actor_lost"] + h["events"]["rollout_actor_died"] for h in rows)
    assert requeued >= 1 and lost == requeued
    assert said.count("is queued again") == requeued
    assert sum(h["events"]["node_lost"] for h in rows) == 1 and said.count("left the cluster") == 1
    print(f"MEASURED rollout node loss: {added_at - killed_at:.1f} s until the loss was seen and a node added, then "
          f"{trained_again_at - added_at:.1f} s until the next iteration ({done_at_kill + 1}) was trained")



# The job, with the driver stopped at the start of iteration 2's evaluation until the file $FLOWRL_HOLD_UNTIL exists.
HELD_AT_EVALUATION = r"""
import os, sys, time
import learner.main  # first: it keeps Ray on loopback
from learner.driver.job import Job

evaluate = Job.evaluate

def held(self):
    if self.iteration == 2 and not os.path.exists(os.environ["FLOWRL_HOLD_UNTIL"]):
        print("EVALUATING", flush=True)
        while not os.path.exists(os.environ["FLOWRL_HOLD_UNTIL"]):
            time.sleep(0.2)
    return evaluate(self)

Job.evaluate = held
sys.exit(learner.main.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_losing_the_rollout_node_during_an_evaluation_ends_no_run_and_loses_no_checkpoint(cluster, tmp_path):
    """The rollout node killed as iteration 2's evaluation starts (its batch goes to the lost workers): the evaluation
    either waits for them or is reported failed, iteration 2's checkpoint is written, and the run completes."""
    out, log, flag = tmp_path / "run", tmp_path / "job.log", tmp_path / "go"
    env = {**cluster_env(cluster), "FLOWRL_HOLD_UNTIL": str(flag)}
    evaluated = [o for o in SMALL if not o.startswith("eval.")] + ["eval.every_n_iterations=2", "eval.at_start=false"]
    with start_job("tiny", *PINNED, *evaluated, "iterations=3", "checkpoint.keep_last=3", out=out, log=log, env=env,
                   script=HELD_AT_EVALUATION) as proc:
        end = time.monotonic() + 300
        while "EVALUATING" not in log.read_text():
            assert time.monotonic() < end and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        cluster.kill("rollout")
        flag.touch()
        while "left the cluster" not in log.read_text():
            assert time.monotonic() < end and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        cluster.add("rollout", 2, {"rollout_node": 1})
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    rows, said = history(out), log.read_text()
    assert [h["iteration"] for h in rows] == [1, 2, 3]
    trained = [g for h in rows for g in h["group_ids"]]
    assert len(trained) == len(set(trained)) == 3 * 4  # every group trained once and whole
    failed = sum(h["events"]["evaluation_failed"] for h in rows)
    assert failed == ("error" in rows[1]["eval"]) == said.count("the evaluation of iteration 2 failed")
    assert "error" in rows[1]["eval"] or rows[1]["eval"]["jpeg_compressibility"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter-000001", "iter-000002", "iter-000003"]
    print(f"MEASURED evaluation during the rollout node's loss: {'failed, reported' if failed else 'waited, scored'}")

# On the cluster: a pool of two actors pinned to the rollout node, one ended (its bundle free); after the test kills
# the node, one more actor is asked for.
GROW_AFTER_LOSS = r"""
import sys
import ray
from cluster.config import RolloutConfig
from cluster.pools import ActorPool, PlacementError
from tests.reward_helpers import ImageHolder

ray.init(log_to_driver=False)
pool = ActorPool("rollout", ImageHolder, RolloutConfig(num_actors=2, num_cpus_per_actor=0.5,
                 resources={"rollout_node": 0.1}), placement_timeout_s=3)
first, second = pool.spawn(), pool.spawn()
ray.get([first.put.remote(0), second.put.remote(0)])
pool.release(second)
print("READY", flush=True)
sys.stdin.readline()  # the rollout node is gone
try:
    grown = pool.spawn()
    print("ANSWER", ray.get(grown.put.remote(1), timeout=20), flush=True)
except PlacementError as e:
    print("REFUSED", str(e).splitlines()[0], flush=True)
except ray.exceptions.GetTimeoutError:
    print("HUNG", flush=True)
"""


@pytest.mark.slow
def test_a_pool_grown_after_its_node_left_uses_no_bundle_of_the_dead_node(cluster):
    proc = subprocess.Popen([sys.executable, "-c", GROW_AFTER_LOSS], cwd=ROOT, env=cluster_env(cluster),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        cluster.kill("rollout")
        time.sleep(5)  # Ray sees the node gone (health checks every second here)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        answer = ""
        while not answer.startswith(("REFUSED", "ANSWER", "HUNG")):  # Ray's own lines about the lost node aside
            answer = proc.stdout.readline()
            assert answer, "the script ended without an answer"
    finally:
        proc.kill()
        proc.wait()
    # no node has rollout_node now: a new bundle cannot be placed, and saying so beats an actor that never starts
    assert answer.startswith("REFUSED pool 'rollout'"), answer


# The job, with the driver holding iteration 3's scored groups (their records still on the rollout node) until the
# file $FLOWRL_HOLD_UNTIL exists, before the learner is asked to train them.
HELD_BEFORE_TRAINING = r"""
import os, sys, time
import learner.main  # first: it keeps Ray on loopback
from learner.driver.job import Job

train = Job.train

def held(self, scored, version, times):
    if self.iteration == 2 and not os.path.exists(os.environ["FLOWRL_HOLD_UNTIL"]):
        print("HOLDING " + " ".join(str(s.group_id) for s, _ in scored), flush=True)
        while not os.path.exists(os.environ["FLOWRL_HOLD_UNTIL"]):
            time.sleep(0.2)
    return train(self, scored, version, times)

Job.train = held
sys.exit(learner.main.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_records_lost_with_the_rollout_node_before_the_learner_fetched_them_are_sampled_again(cluster, tmp_path):
    out, log, flag = tmp_path / "run", tmp_path / "job.log", tmp_path / "go"
    env = {**cluster_env(cluster), "FLOWRL_HOLD_UNTIL": str(flag)}
    with start_job("tiny", *PINNED, *SMALL, "iterations=4", out=out, log=log, env=env,
                   script=HELD_BEFORE_TRAINING) as proc:
        end = time.monotonic() + 300
        while "HOLDING" not in log.read_text():
            assert time.monotonic() < end and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        held = [int(g) for g in re.search(r"HOLDING ([\d ]+)", log.read_text()).group(1).split()]
        cluster.kill("rollout")  # the held groups' records and images lived in its object store
        cluster.add("rollout", 2, {"rollout_node": 1})
        flag.touch()
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    rows, said = history(out), log.read_text()
    assert [h["iteration"] for h in rows] == [1, 2, 3, 4]
    trained = [g for h in rows for g in h["group_ids"]]
    assert len(trained) == len(set(trained)) == 4 * 4  # every group trained once and whole
    assert sorted(rows[2]["group_ids"]) == sorted(held)  # the held groups, sampled again, are iteration 3's
    assert all(h["samples"] == 16 for h in rows)
    assert rows[2]["events"]["records_lost"] == len(held) == said.count("is sampled again: its record was lost")


@pytest.mark.slow
def test_losing_the_learner_node_stops_the_job_and_resume_auto_completes_it(cluster, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    with start_job("tiny", *PINNED, *SMALL, "iterations=5", out=out, log=log, env=cluster_env(cluster)) as proc:
        wait_for_iterations(out, 2, proc)
        cluster.kill("learner")
        assert proc.wait(timeout=300) == 1, log.read_text()[-4000:]
    [error] = [ln for ln in log.read_text().splitlines() if ln.startswith("error:")]
    assert "TrainingStopped: a learner rank is gone" in error and "--resume auto" in error
    done = len(history(out))
    assert done >= 2 and f"iter-{done:06d}" in error

    cluster.add("learner", 1, {"learner_node": 1})  # the checkpoint was written by the learner node that is gone
    r = run_job("tiny", *PINNED, *SMALL, "iterations=5", out=out, resume="auto", timeout=400,
                env=cluster_env(cluster))
    assert f"at iteration {done}" in r.stdout
    assert [h["iteration"] for h in history(out)] == [1, 2, 3, 4, 5]
    assert history(out)[-1]["policy_version"] == 5
    trained = [g for h in history(out) for g in h["group_ids"]]
    assert len(trained) == len(set(trained)) == 5 * 4  # across both runs, every group trained once


@pytest.mark.slow
def test_a_slow_reward_actor_killed_twice_and_its_node_lost_drops_no_group(cluster, tmp_path):
    """One reward actor on a fourth node of its own, with a scorer that is slow to start: SIGKILLed twice while it
    scores, then its node lost for a while. Its batches wait for each restart; the run drops no group.
    FLOWRL_SLOW_REWARD_S="START,OUTAGE" sets the two delays: 5 s and 10 s in the suite; "20,30" is the scenario of
    docs/running.md (about 160 s)."""
    import signal

    start_delay_s, outage_s = (float(s) for s in os.environ.get("FLOWRL_SLOW_REWARD_S", "5,10").split(","))

    out, log, pid_file = tmp_path / "run", tmp_path / "job.log", tmp_path / "reward-pids"
    # the job, with the test scorer registered in the driver and in the check run on the reward node before any
    # actor starts (a fresh process there; the actor itself gets the registry entry from the driver)
    slow_scorer_job = r"""
import sys
import learner.main  # first: it keeps Ray on loopback
import learner.driver.placement as placement
from rewards.registry import REGISTRY

REGISTRY["slow_mean"] = "tests.reward_helpers:SlowMean"
check_scorer = placement.scorer_node

def registered_then_checked(*args):
    from rewards.registry import REGISTRY
    REGISTRY["slow_mean"] = "tests.reward_helpers:SlowMean"
    return check_scorer(*args)

placement.scorer_node = registered_then_checked
sys.exit(learner.main.main(sys.argv[1:]))
"""
    scorer = (f"rewards.scorers=[{{name: slow_mean, options: {{sleep_s: 1, start_delay_s: {start_delay_s}, "
              f"pid_file: '{pid_file}'}}}}]")
    pinned = [*PINNED[:2], "rewards.resources={reward_node: 0.1}", scorer]

    def lives() -> list[int]:
        return [int(pid) for pid in pid_file.read_text().split()] if pid_file.exists() else []

    def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while not condition():
            assert proc.poll() is None, f"the job ended before {what}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < end, f"no {what} within {timeout} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)

    def sent_again() -> int:
        return log.read_text().count("sent again to slow_mean-0")

    began = time.monotonic()
    cluster.add("reward", 1, {"reward_node": 1})
    try:
        with start_job("tiny", *pinned, *SMALL, "iterations=3", out=out, log=log, env=cluster_env(cluster),
                       script=slow_scorer_job) as proc:
            wait_until(lambda: len(history(out)) >= 1, proc, "first iteration", timeout=300)
            os.kill(lives()[0], signal.SIGKILL)
            for life in (2, 3):  # once the restarted actor has the batches that waited for it, it is killed again
                resent = sent_again()
                wait_until(lambda: len(lives()) >= life and sent_again() > resent, proc, f"reward actor life {life}")
                if life == 2:
                    os.kill(lives()[1], signal.SIGKILL)
            cluster.kill("reward")  # no other node has reward_node: the actor waits for its bundle to be placed again
            time.sleep(outage_s)
            cluster.add("reward", 1, {"reward_node": 1})
            assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if "reward" in cluster.nodes:
            cluster.kill("reward")
    rows, said = history(out), log.read_text()
    assert [h["iteration"] for h in rows] == [1, 2, 3]
    assert all(h["groups"] == 4 and h["groups_dropped"] == 0 for h in rows)  # not one group dropped
    assert len(lives()) == 4  # two kills and the node loss: three restarts, each waited for
    events = {kind: sum(h["events"][kind] for h in rows) for kind in rows[0]["events"]}
    assert events["reward_actor_failed"] == 3 == said.count("[flowrl] reward actor slow_mean-0 failed on group")
    assert events["reward_retry"] == said.count("sent again to slow_mean-0") >= 3
    assert events["reward_timeout"] == 0 and "dropped" not in said
    assert "A worker died" not in said and "(raylet)" not in said  # Ray's own lines stay out of the job's log
    print(f"MEASURED slow reward actor killed twice and its node lost: {time.monotonic() - began:.0f} s")
