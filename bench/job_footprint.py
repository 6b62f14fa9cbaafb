"""Wall time and peak memory of a whole job (driver, local Ray and every actor), sampled twice a second.

    .venv/bin/python bench/job_footprint.py [--cfg cluster/tiny.yaml] [--set key=value ...]

Peak memory is the largest sum of resident set sizes over the job's process tree (shared pages are counted once per
process, so it is an upper bound).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cfg", default="cluster/tiny.yaml")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "learner.main", "--cfg", args.cfg, "--set", f"output_dir={out}"]
        for o in args.set:
            cmd += ["--set", o]
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        watched, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(watched))
            time.sleep(0.5)
        wall = time.perf_counter() - started
        last = [line for line in proc.stdout.read().splitlines() if line.startswith("[flowrl]")][-1:]
    print(f"| config | exit | wall s | peak memory GiB |\n|---|---|---|---|\n"
          f"| {args.cfg} {' '.join(args.set)} | {proc.returncode} | {wall:.0f} | {peak / 2**30:.2f} |")
    if last:
        print(last[0])


if __name__ == "__main__":
    main()
