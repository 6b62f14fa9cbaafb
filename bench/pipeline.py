"""How the job's stages overlap, with the real driver, pools and weight publishing and stand-in work that takes a
set time: iteration wall time against the slowest stage (sync vs async), and rollout throughput with 1, 2, 4, 8
rollout actors.

    .venv/bin/python bench/pipeline.py [--rollout-s 1] [--reward-s 0.25] [--learner-s 2] [--groups 8]
                                       [--actors 4] [--scorers 2] [--iterations 8] [--scaling 1,2,4,8]

On 2 CPU cores the real stages compete for the same cores, so the overlap cannot show. Here each rollout group, each
reward call and each learner update still runs for real on the tiny model, then sleeps until its configured time
has passed (`--rollout-s` per group, `--reward-s` per group, `--learner-s` per update): the stage
times are set, the cores stay mostly idle, and what is measured is the driver's scheduling. A stage's time per
iteration: rollout = groups / actors x rollout-s, reward = groups / scorers x reward-s, learner = updates x
learner-s; the best an iteration can take is the slowest of the three (async) or their chain (sync). Async runs
with max_staleness 1 and 2: with 1, the next iteration's groups can only start once this iteration's weights are
out, so when rollout and learner take as long as each other the last groups' rewards trail the update by about one
group's reward latency; with 2 the rollouts are a further iteration ahead and nothing trails.

Rollout scaling runs async with short reward and learner stages so that the rollouts are the slowest stage; the
efficiency with N actors is (groups per second with N) / (N x groups per second with one). The first
`--warmup` iterations of each run are left out.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# the stand-in classes below are sent to the actors by value; their bases are imported there from the checkout
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import ray  # noqa: E402

from cluster.config_loading import load_config  # noqa: E402
from cluster.runtime import start_ray  # noqa: E402
from learner.driver.job import Job  # noqa: E402
from learner.ranks.actor import LearnerActor  # noqa: E402
from rewards.service import ScorerActor  # noqa: E402
from rollout.worker import RolloutWorker  # noqa: E402


SCALING_REWARD_S, SCALING_LEARNER_S = 0.05, 0.1  # in the throughput runs: the rollouts stay the slowest stage
MEASURED = ("rollout", "reward", "train", "iteration")  # the driver's waits per iteration (history.jsonl "times")


def _sleep_rest(began: float, seconds: float) -> None:
    time.sleep(max(0.0, seconds - (time.perf_counter() - began)))


class TimedRollout(RolloutWorker):
    seconds = 1.0  # per group

    @ray.method(num_returns=3)  # as the method it overrides
    def sample_group(self, group):
        began = time.perf_counter()
        out = super().sample_group(group)
        _sleep_rest(began, self.seconds)
        return out


class TimedScorer(ScorerActor):
    seconds = 0.0625  # per image (a group's images are spread over the scorer's actors)

    def score(self, images, start, stop, *args, **kwargs):
        began = time.perf_counter()
        out = super().score(images, start, stop, *args, **kwargs)
        _sleep_rest(began, self.seconds * (stop - start))
        return out


class TimedLearner(LearnerActor):
    seconds = 2.0  # per update, publishing the new weights included

    def train_iteration(self, *args, **kwargs):
        began = time.perf_counter()
        out = super().train_iteration(*args, **kwargs)
        _sleep_rest(began, self.seconds * len(out["updates"]))
        return out


def timed(cls: type, seconds: float) -> type:
    return type(cls.__name__, (cls,), {"seconds": seconds})


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rollout-s", type=float, default=1.0, help="seconds per rollout group")
    ap.add_argument("--reward-s", type=float, default=0.25,
                    help="reward actor seconds per group (its images are spread over the reward actors)")
    ap.add_argument("--learner-s", type=float, default=2.0, help="seconds per learner update")
    ap.add_argument("--groups", type=int, default=8, help="groups per iteration")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--actors", type=int, default=4, help="rollout actors in the sync/async comparison")
    ap.add_argument("--scorers", type=int, default=2, help="reward actors")
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="first iterations of each run left out")
    ap.add_argument("--scaling", default="1,2,4,8", help="rollout actor counts for the throughput table ('' skips)")
    ap.add_argument("--scaling-groups", type=int, default=16, help="groups per iteration in the throughput runs")
    ap.add_argument("--scaling-rollout-s", type=float, default=0.5, help="seconds per group in the throughput runs")
    ap.add_argument("--set", action="append", default=[], help="further config overrides key=value")
    args = ap.parse_args()
    if args.iterations <= args.warmup:
        ap.error(f"--iterations {args.iterations} must exceed --warmup {args.warmup}")
    return args


def run(args: argparse.Namespace, out: str, *, mode: str, actors: int, groups: int, rollout_s: float,
        reward_s: float, learner_s: float, bound: int = 1) -> dict[str, float]:
    """The median seconds of each stage the driver waits for, and of the whole iteration, after the warm-up."""
    overrides = [f"output_dir={out}", f"iterations={args.iterations}", f"learner.mode={mode}",
                 f"learner.max_staleness={bound}", "learner.updates_per_iteration=1", f"rollout.num_actors={actors}",
                 "rollout.num_cpus_per_actor=0.1", f"rewards.num_actors={args.scorers}",
                 "rewards.num_cpus_per_actor=0.1", "learner.num_cpus_per_actor=0.1",
                 f"data.group_size={args.group_size}", f"data.images_per_iteration={groups * args.group_size}",
                 f"rollout.samples_per_forward={args.group_size}", f"learner.micro_batch_size={args.group_size}",
                 "sampler.num_steps=2", "eval.every_n_iterations=0", "checkpoint.every_n_iterations=0",
                 "metrics.enabled=false", f"run_name=pipeline-{mode}-{bound}-{actors}", *args.set]
    cfg = load_config(ROOT / "cluster/tiny.yaml", overrides)
    per_image = reward_s / args.group_size
    classes = {"rollout": timed(TimedRollout, rollout_s), "rewards": timed(TimedScorer, per_image),
               "learner": timed(TimedLearner, learner_s)}
    job = Job(cfg, say=lambda message: None, actor_classes=classes)
    try:
        job.resume("none")
        history = job.run()
    finally:
        job.shutdown()
    later = history[args.warmup:]
    return {stage: float(np.median([h["times"].get(stage, 0.0) for h in later])) for stage in MEASURED}


def main() -> None:
    args = parse_args()
    scaling = [int(n) for n in args.scaling.split(",") if n.strip()]
    print(f"stand-in stages: rollout {args.rollout_s:g} s per group on {args.actors} actors, reward "
          f"{args.reward_s:g} s per group on {args.scorers} actors, learner {args.learner_s:g} s per update; "
          f"{args.groups} groups of {args.group_size} per iteration, {args.iterations} iterations "
          f"(first {args.warmup} left out)", flush=True)
    stages = {"rollout": args.groups / args.actors * args.rollout_s,
              "reward": args.groups / args.scorers * args.reward_s, "learner": args.learner_s}
    slowest = max(stages.values())
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "cluster/tiny.yaml", ["ray.num_cpus=16"])
        start_ray(cfg.ray)
        try:
            rows = []
            for mode, bound in (("sync", 0), ("async", 1), ("async", 2)):
                began = time.perf_counter()
                times = run(args, f"{tmp}/{mode}-{bound}", mode=mode, actors=args.actors, groups=args.groups,
                            rollout_s=args.rollout_s, reward_s=args.reward_s, learner_s=args.learner_s, bound=bound)
                label = mode if mode == "sync" else f"async, max_staleness {bound}"
                rows.append((label, times))
                print(f"  {label}: median iteration {times['iteration']:.2f} s ({time.perf_counter() - began:.0f} s "
                      f"run)", flush=True)
            throughput = []
            for n in scaling:
                times = run(args, f"{tmp}/scale-{n}", mode="async", actors=n, groups=args.scaling_groups,
                            rollout_s=args.scaling_rollout_s, reward_s=SCALING_REWARD_S,
                            learner_s=SCALING_LEARNER_S)
                throughput.append((n, args.scaling_groups / times["iteration"]))
                print(f"  {n} rollout actors: {throughput[-1][1]:.2f} groups/s", flush=True)
        finally:
            ray.shutdown()

    print("\nstage seconds per iteration: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
          + f" (slowest {slowest:.2f})")
    print("| mode | waits for rollouts | for rewards | for the learner | iteration | ÷ slowest stage |")
    print("|---|---|---|---|---|---|")
    for mode, t in rows:
        print(f"| {mode} | " + " | ".join(f"{t[k]:.2f}" for k in MEASURED)
              + f" | {t['iteration'] / slowest:.2f}x |")
    if throughput:
        one = throughput[0][1] / throughput[0][0]
        print(f"\nrollout throughput ({args.scaling_groups} groups per iteration, {args.scaling_rollout_s:g} s per "
              f"group, async, reward {SCALING_REWARD_S:g} s per group, learner {SCALING_LEARNER_S:g} s per update)")
        print("| rollout actors | groups / s | ideal | efficiency |")
        print("|---|---|---|---|")
        for n, rate in throughput:
            print(f"| {n} | {rate:.2f} | {n * one:.2f} | {rate / (n * one):.2f} |")


if __name__ == "__main__":
    main()
