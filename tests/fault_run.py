"""A tiny job with faults injected while it trains; prints a JSON report on its last line.

    python -m tests.fault_run OUT_DIR MODEL_DIR

Faults: SIGKILL of a rollout actor while both hold a group (iteration 2), SIGKILL of a reward actor in the middle of
a scoring call (iteration 3), a reward call that hangs past its timeout (the first one of `hang_mean`), and NaN
rewards for the prompt that contains "poison". Run by tests/test_faults.py in its own process, with its own Ray.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_metrics_report_interval_ms"] = "1000"

import json  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import ray  # noqa: E402

from cluster.config_loading import load_config  # noqa: E402
from cluster.runtime import start_ray  # noqa: E402
from learner.driver.job import Job  # noqa: E402
from rewards.registry import REGISTRY  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cube", "a blue ball", "a green tree", "a poison apple", "a yellow car", "a white cat",
           "a black dog", "an orange fish"]


def scrape() -> dict[str, float]:
    """Our counters on this node's metrics endpoint, summed over processes: name{label} -> value."""
    node = ray._private.worker._global_node
    text = urllib.request.urlopen(f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics").read().decode()
    values: dict[str, float] = {}
    for name, labels, value in re.findall(r"^(ray_flowrl_\w+_total)\{([^}]*)\} (\S+)$", text, re.M):
        event = re.search(r'event="(\w+)"', labels)
        key = name + (f"{{{event.group(1)}}}" if event else "")
        values[key] = values.get(key, 0.0) + float(value)
    return values


def main(out: Path, model: Path) -> dict:
    REGISTRY["slow_mean"] = "tests.reward_helpers:SlowMean"
    REGISTRY["hang_mean"] = "tests.reward_helpers:SlowMean"
    REGISTRY["nan_for_word"] = "tests.reward_helpers:NanForWord"
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (out / "hang").write_text("")
    cfg = load_config(ROOT / "cluster" / "tiny.yaml", [
        "iterations=4", f"output_dir={out / 'run'}", f"model.path={model}",
        "data.source=text", f"data.path={out / 'prompts.txt'}", "data.images_per_iteration=16",
        "rollout.max_restarts=3", "eval.every_n_iterations=0", "checkpoint.every_n_iterations=0", "metrics.port=0",
        "rollout.num_actors=2", "rewards.num_actors=2", "rewards.num_cpus_per_actor=0.05", "rewards.timeout_s=4",
        "rewards.max_retries=2",
        "rewards.scorers=[{name: slow_mean, options: {sleep_s: 1.0}}, "
        f"{{name: hang_mean, options: {{hang_file: '{out / 'hang'}'}}}}, "
        "{name: nan_for_word, options: {word: poison}}]",
    ])
    start_ray(cfg.ray, metrics_port=0)
    said: list[str] = []

    def say(message: str) -> None:
        said.append(message)
        print(message, flush=True)

    job = Job(cfg, say)
    rollout_pids = ray.get([w.pid.remote() for w in job.pool.workers])
    reward_pids = job.rewards.actor_pids()
    collect, submit = job.collect, job.rewards.submit
    killed_reward = threading.Event()

    def collect_with_faults(version):
        if job.iteration == 1:  # iteration 2: both workers are sampling a group right now
            os.kill(rollout_pids[0], signal.SIGKILL)
        return collect(version)

    def submit_with_faults(*args, **kwargs):
        handle = submit(*args, **kwargs)
        if job.iteration == 2 and not killed_reward.is_set():  # iteration 3: both slow_mean actors sleep 1 s now
            killed_reward.set()
            threading.Timer(0.3, os.kill, (reward_pids["slow_mean"][0], signal.SIGKILL)).start()
        return handle

    job.collect, job.rewards.submit = collect_with_faults, submit_with_faults
    job.resume("none")
    history = job.run()

    counters = vars(job.rewards.counters)
    expected = {"ray_flowrl_groups_requeued_total": job.pool.requeued,
                "ray_flowrl_reward_events_total{timeout}": counters["timeouts"],
                "ray_flowrl_reward_events_total{actor_failure}": counters["actor_failures"],
                "ray_flowrl_reward_events_total{nonfinite}": counters["nonfinite"]}
    deadline = time.monotonic() + 30
    while True:  # Ray's agent exports once a second
        metrics = scrape()
        if all(metrics.get(k) == v for k, v in expected.items()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    report = {"history": history, "said": said, "requeued": job.pool.requeued, "counters": counters,
              "metrics": metrics, "rollout_pids": rollout_pids, "rollout_pids_after": pids_once_up(job.pool.workers)}
    job.shutdown()
    ray.shutdown()
    return report


def pids_once_up(workers: list, timeout_s: float = 120.0) -> list[int]:
    """The workers' process ids, waiting for one that Ray is still restarting (a slow start on a busy machine)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get([w.pid.remote() for w in workers])
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2])), default=str))
