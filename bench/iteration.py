"""Per-stage times and iteration wall time of the whole job, synchronous vs asynchronous mode, in one run.

    .venv/bin/python bench/iteration.py [--iterations 6] [--set key=value ...]

Runs the tiny config (or any --cfg) twice on one local Ray: `learner.mode=sync`, then `async` (max_staleness 1),
and prints the mean seconds per stage over the iterations after the first. Compare the two rows of one run, not
absolute times: these machines vary up to 2x from run to run.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import ray  # noqa: E402

from cluster.config_loading import load_config  # noqa: E402
from cluster.runtime import start_ray  # noqa: E402
from learner.driver.job import Job  # noqa: E402

STAGES = ("rollout", "reward", "train", "iteration")


def measure(cfg_path: str, overrides: list[str]) -> dict[str, float]:
    cfg = load_config(cfg_path, overrides)
    job = Job(cfg, say=lambda msg: None)
    try:
        job.resume("none")
        history = job.run()
    finally:
        job.shutdown()
    later = history[1:] or history
    return {stage: float(np.mean([h["times"].get(stage, 0.0) for h in later])) for stage in STAGES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cfg", default="cluster/tiny.yaml")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        common = [f"iterations={args.iterations}", "eval.every_n_iterations=0", "checkpoint.every_n_iterations=0",
                  *args.set]
        cfg = load_config(args.cfg, common)
        start_ray(cfg.ray)
        try:
            rows = {mode: measure(args.cfg, common + [f"output_dir={out}/{mode}", f"learner.mode={mode}",
                                                      "learner.max_staleness=1"])
                    for mode in ("sync", "async")}
        finally:
            ray.shutdown()
    print(f"\n{args.cfg}, {args.iterations} iterations (mean seconds per iteration, first excluded)")
    print("| mode | " + " | ".join(STAGES) + " | speed-up |")
    print("|---" * (len(STAGES) + 2) + "|")
    for mode, t in rows.items():
        speedup = rows["sync"]["iteration"] / t["iteration"]
        print(f"| {mode} | " + " | ".join(f"{t[s]:.2f}" for s in STAGES) + f" | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
