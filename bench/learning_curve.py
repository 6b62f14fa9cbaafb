"""Learning curves: the job run in-process for each sampler kind (default Flow-SDE and CPS) with one config, and the
mean training reward of every iteration side by side.

    .venv/bin/python bench/learning_curve.py [--cfg cluster/tiny.yaml] [--kinds sde,cps] [--seeds 0]
                                             [--set key=value ...] [--out DIR] [--json FILE]

Every run uses the config file with the `--set` overrides, then its own `sampler.kind` (and `seed` when --seeds is
given) and its own output folder under --out (a temporary folder by default). One local Ray serves all runs; each
run builds and tears down its own actors. The table shows the mean reward of each iteration's training rollouts (the
policy in force when they were sampled, so iteration 1 is the base model) and, per run, the mean of the first and last
few iterations, their change (also in units of the reward std within the first iterations, "/std"), the seconds spent
in iterations ("train") and the wall time of the run (actor start-up included).
"""

from __future__ import annotations

import os

# Before anything imports ray: keep the local Ray on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.config import ConfigError  # noqa: E402
from cluster.config_loading import load_config  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cfg", default=str(ROOT / "cluster" / "tiny.yaml"), help="job config (default cluster/tiny.yaml)")
    ap.add_argument("--kinds", default="sde,cps", help="comma-separated sampler kinds, one run each (default sde,cps)")
    ap.add_argument("--seeds", default=None, help="comma-separated run seeds, one run per kind and seed "
                                                  "(default: the config's seed)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    ap.add_argument("--out", help="folder for the runs' outputs (default: a temporary folder, removed at the end)")
    ap.add_argument("--window", type=int, default=3, help="iterations averaged for the first/last summary (default 3)")
    ap.add_argument("--json", help="also write the curves and timings to this JSON file")
    ap.add_argument("--quiet", action="store_true", help="hide the job's own per-iteration lines")
    return ap.parse_args(argv)


def run_one(cfg_path: str, overrides: list[str], quiet: bool) -> dict[str, Any]:
    """One job, start to end, in this process's Ray: its per-iteration history and wall time."""
    from learner.driver.job import Job

    cfg = load_config(cfg_path, overrides)
    started = time.perf_counter()
    job = Job(cfg, say=(lambda _: None) if quiet else (lambda msg: print(f"  {msg}", flush=True)))
    try:
        job.resume("none")
        history = job.run()
    finally:
        job.shutdown()
    return {
        "rewards": [h["reward_mean"] for h in history],
        "reward_stds": [h["reward_std"] for h in history],
        "eval": [h["eval"] for h in history if "eval" in h],
        "train_s": sum(h["times"]["iteration"] for h in history),
        "wall_s": time.perf_counter() - started,
    }


def table(runs: dict[str, dict[str, Any]], window: int) -> str:
    """Per-iteration mean rewards, one column per run, then first/last-window means, their change, and timings."""
    names = list(runs)
    width = max(11, *(len(n) for n in names))
    lines = ["iter  " + "  ".join(f"{n:>{width}}" for n in names)]
    longest = max(len(r["rewards"]) for r in runs.values())
    for i in range(longest):
        cells = [f"{r['rewards'][i]:>{width}.6f}" if i < len(r["rewards"]) else " " * width for r in runs.values()]
        lines.append(f"{i + 1:>4}  " + "  ".join(cells))

    def row(label: str, fn) -> str:
        return f"{label:<6}" + "".join(f"  {fn(r):>{width}}" for r in runs.values())

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    lines.append(row(f"first{window}", lambda r: f"{mean(r['rewards'][:window]):.6f}"))
    lines.append(row(f"last{window}", lambda r: f"{mean(r['rewards'][-window:]):.6f}"))
    lines.append(row("change", lambda r: f"{mean(r['rewards'][-window:]) - mean(r['rewards'][:window]):+.6f}"))
    def in_stds(r: dict[str, Any]) -> str:  # the change in units of the first iterations' reward spread
        change = mean(r["rewards"][-window:]) - mean(r["rewards"][:window])
        return f"{change / max(mean(r['reward_stds'][:window]), 1e-12):+.2f}"

    lines.append(row("/std", in_stds))
    lines.append(row("train", lambda r: f"{r['train_s']:.1f}s"))
    lines.append(row("wall", lambda r: f"{r['wall_s']:.1f}s"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    try:
        base = load_config(args.cfg, args.set)  # validate once before starting anything
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2

    import ray

    from cluster.runtime import check_pools_fit, start_ray

    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="learning-curve-")
    out = Path(args.out) if args.out else Path(tmp.name)
    print(start_ray(base.ray), flush=True)
    runs: dict[str, dict[str, Any]] = {}
    try:
        check_pools_fit(base, ray.cluster_resources())
        for seed in seeds:
            for kind in kinds:
                name = kind if seed is None else f"{kind}/s{seed}"
                overrides = [*args.set, f"sampler.kind={kind}", f"output_dir={out / name.replace('/', '-')}"]
                if seed is not None:
                    overrides.append(f"seed={seed}")
                print(f"run {name}: {args.cfg} {' '.join('--set ' + o for o in overrides)}", flush=True)
                runs[name] = run_one(args.cfg, overrides, args.quiet)
                print(f"run {name}: {runs[name]['wall_s']:.1f} s", flush=True)
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    print()
    print(table(runs, args.window))
    if args.json:
        Path(args.json).write_text(json.dumps({"cfg": args.cfg, "set": args.set, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
