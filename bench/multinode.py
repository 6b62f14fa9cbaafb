"""The tiny job on one Ray node against a real three-node cluster on this machine, and how long a lost rollout node
costs. Prints one table.

    .venv/bin/python bench/multinode.py [--iterations 20]

Rows: the job on a local Ray; the same job joined to a cluster of a head (the driver and the reward actor), a rollout
node and a learner node (bench/local_cluster.py), its pools pinned there by custom resources; the same again with a
spare rollout node, killing the rollout node after iteration 3 (Ray places the rollout bundles on the spare one and
restarts the actors there). All nodes share this machine's cores, so the cluster is no faster: the figures show what
placement, node checks and a node loss cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.local_cluster import LocalCluster  # noqa: E402

JOB = ["data.images_per_iteration=16", "data.group_size=4", "rollout.samples_per_forward=4", "learner.micro_batch_size=4",
       "eval.every_n_iterations=0", "checkpoint.every_n_iterations=5", "metrics.port=0"]
PINNED = ["rollout.resources={rollout_node: 0.1}", "learner.resources={learner_node: 0.1}",
          "rewards.resources={head: 0.1}"]


def env(address: str | None = None) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out.update(PATH=f"{Path(sys.executable).parent}:{out.get('PATH', '')}", RAY_AUTH_MODE="disabled",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    if address:
        out["RAY_ADDRESS"] = address
    return out


def history(out: Path) -> list[dict]:
    path = out / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_job(out: Path, iterations: int, overrides: list[str], address: str | None = None,
            kill: tuple[LocalCluster, str, int] | None = None) -> dict[str, float]:
    """Wall seconds of the whole job and of its iterations; with `kill` = (cluster, node, after), the node is killed
    once `after` iterations are done, and the seconds from the kill until the groups it cut off are trained (the
    first iteration with a re-queued group is in the history)."""
    args = [sys.executable, "-m", "learner.main", "--cfg", "cluster/tiny.yaml", "--set", f"output_dir={out}",
            "--set", f"iterations={iterations}"]
    for o in JOB + overrides:
        args += ["--set", o]
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, env=env(address), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result: dict[str, float] = {}
    if kill is not None:
        cluster, node, after = kill
        while len(history(out)) < after and proc.poll() is None:
            time.sleep(0.1)
        killed_at = time.perf_counter()
        cluster.kill(node)
        while not any(h["groups_requeued"] for h in history(out)) and proc.poll() is None:
            time.sleep(0.1)
        result["recovery_s"] = time.perf_counter() - killed_at
    if proc.wait() != 0:
        raise SystemExit(f"the job in {out} failed (exit {proc.returncode})")
    rows = history(out)
    result.update(total_s=time.perf_counter() - started, iterations_s=sum(h["times"]["iteration"] for h in rows),
                  requeued=sum(h["groups_requeued"] for h in rows))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="flowrl-bench-") as tmp:
        rows.append(("one node (local Ray)", run_job(Path(tmp) / "local", args.iterations, [])))
        cluster = LocalCluster(Path("/tmp") / f"flowrl-bmn-{os.getpid()}", {"head": 1}, env())
        try:
            cluster.add("rollout", 2, {"rollout_node": 1})
            cluster.add("learner", 1, {"learner_node": 1})
            rows.append(("three nodes", run_job(Path(tmp) / "cluster", args.iterations, PINNED, cluster.address)))
            cluster.add("spare", 2, {"rollout_node": 1})
            rows.append(("three nodes + spare, rollout node killed after iteration 3",
                         run_job(Path(tmp) / "loss", args.iterations, PINNED, cluster.address,
                                 kill=(cluster, "rollout", 3))))
        finally:
            cluster.close()
    print(f"\ncluster/tiny.yaml, {args.iterations} iterations of 4 groups x 4")
    print("| run | job wall s | iterations s | groups re-queued | kill to the cut-off groups trained, s |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        recovery = f"{r['recovery_s']:.1f}" if "recovery_s" in r else "–"
        print(f"| {name} | {r['total_s']:.1f} | {r['iterations_s']:.1f} | {r['requeued']} | {recovery} |")


if __name__ == "__main__":
    main()
