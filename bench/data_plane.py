"""How many bytes of rollout data pass through the driver process per iteration, against the bytes one iteration's
rollout records hold: the tiny job at growing image sizes, on one node and on a three-node cluster on this machine.

    .venv/bin/python bench/data_plane.py [--sizes 64,128,256] [--nodes 1,3] [--iterations 3] [--label TEXT]
                                         [--json PATH]
    .venv/bin/python bench/data_plane.py --compare A.json B.json     # two saved runs side by side, nothing run

Each (nodes, resolution) row runs the real job (cluster/tiny.yaml, 4 groups x 4 images per iteration, no evaluation,
the final checkpoint only) as `python -c SCRIPT <learner.main arguments>`: SCRIPT (`counted_main`) replaces the module
attributes `ray.get` and `ray.put` in the driver with wrappers that add up the bytes of every value returned or put
(`nbytes`: tensors, numpy arrays and bytes, walked through dataclasses, lists, tuples and dicts; anything else counts
0), then runs `learner.main.main`. Columns:
- record MB/iter: one group sampled here, in the bench process, with the job's model and its objective's training
  `SamplerSettings` (`RolloutSampler.sample_group`), the bytes of every tensor of the record, times groups/iteration;
- driver get / put MB/iter: what the driver's `ray.get` returned and what it gave `ray.put`, over the run, divided by
  the iterations (arguments passed by value to `.remote()` are not counted); driver/record % is get over record;
- iteration s: the median of history.jsonl's `times.iteration`.
Start-up fetches carry no tensor bytes (one node, 64 px: iterations=1 and 3 fetch 615,408 and 1,846,224 bytes,
exactly 3x, in 29 and 65 calls), so total / iterations is the per-iteration figure.
The three nodes (bench/local_cluster.py: the head with the driver and the reward actor, a rollout node of 2 CPUs, a
learner node of 1 CPU, pools pinned by custom resources) share this machine's cores: timings show overheads only.
MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.multinode import PINNED, env, history  # noqa: E402

COUNTS = "FLOWRL_DATA_PLANE_COUNTS"  # the file the job writes its counts to
SCRIPT = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.data_plane import counted_main; "
          f"sys.exit(counted_main(sys.argv[1:]))")
JOB = ["data.images_per_iteration=16", "data.group_size=4", "rollout.samples_per_forward=4",
       "learner.micro_batch_size=4", "eval.every_n_iterations=0", "checkpoint.every_n_iterations=0", "metrics.port=0",
       f"model.path={ROOT / '.cache/tiny/flux'}"]
COLUMNS = [("get", "driver get MB/iter"), ("put", "driver put MB/iter"), ("percent", "driver/record %"),
           ("iteration_s", "iteration s")]  # per run, after nodes, resolution and record MB/iter


def nbytes(value: Any) -> int:
    """The bytes of the tensors, arrays and byte strings in `value`, through dataclasses, lists, tuples and dicts (by
    type, not by attribute: a dataclass may have a field named `nbytes`)."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.numel()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.nbytes
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


def counted_main(argv: list[str]) -> int:
    """The job's driver (learner.main with `argv`) with `ray.get` and `ray.put` counted; the counts go to the file
    $FLOWRL_DATA_PLANE_COUNTS at exit."""
    import atexit

    import ray

    counts = {"get_bytes": 0, "get_calls": 0, "put_bytes": 0, "put_calls": 0}
    get, put = ray.get, ray.put

    def counted_get(*args: Any, **kwargs: Any) -> Any:
        value = get(*args, **kwargs)
        counts["get_bytes"] += nbytes(value)
        counts["get_calls"] += 1
        return value

    def counted_put(value: Any, *args: Any, **kwargs: Any) -> Any:
        counts["put_bytes"] += nbytes(value)
        counts["put_calls"] += 1
        return put(value, *args, **kwargs)

    ray.get, ray.put = counted_get, counted_put
    atexit.register(lambda: Path(os.environ[COUNTS]).write_text(json.dumps(counts)))
    import learner.main

    if not Path(learner.main.__file__).resolve().is_relative_to(ROOT):
        raise SystemExit(f"learner.main comes from {learner.main.__file__}, not from {ROOT}: set PYTHONPATH")
    return learner.main.main(argv)


def say(text: str) -> None:
    print(f"[data_plane {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def overrides(resolution: int, iterations: int) -> list[str]:
    return [*JOB, f"model.resolution={resolution}", f"iterations={iterations}"]


def record_bytes(resolution: int) -> int:
    """The bytes of one iteration's rollout records at `resolution`: one group sampled here, times the groups."""
    from cluster.config_loading import load_config
    from learner.objectives.registry import objective_for
    from rollout.models.loading import load_configured
    from rollout.prompts.groups import PromptGroup
    from rollout.sampling.loop import RolloutSampler

    cfg = load_config(ROOT / "cluster/tiny.yaml", overrides(resolution, 1))
    model = load_configured(cfg.model, dtype=getattr(torch, cfg.model.dtype), device="cpu")
    sampler = RolloutSampler(model, objective_for(cfg).rollout_settings(), cfg.seed)
    size = cfg.data.group_size
    record = sampler.sample_group(PromptGroup(0, "a red cube on a table", {}, tuple(range(size))))
    return nbytes(record) * (cfg.data.images_per_iteration // size)


def run_job(out: Path, sets: list[str], address: str | None) -> dict[str, Any]:
    """The job with `sets`, its driver counted; its counts and history."""
    args = ["--cfg", "cluster/tiny.yaml", "--set", f"output_dir={out}"]
    for o in sets:
        args += ["--set", o]
    job_env = env(address) | {COUNTS: str(out / "counts.json"), "PYTHONPATH": str(ROOT)}
    out.mkdir(parents=True)
    with open(out / "job.log", "w") as log:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=ROOT, env=job_env, stdout=log,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not (out / "counts.json").is_file():
        raise SystemExit(f"the job in {out} failed (exit {proc.returncode}):\n{(out / 'job.log').read_text()[-3000:]}")
    return {"counts": json.loads((out / "counts.json").read_text()), "history": history(out)}


def measure(nodes: int, resolution: int, iterations: int, record: int, tmp: Path,
            address: str | None) -> dict[str, Any]:
    """One row: the job on `nodes` nodes (joining `address`, pinned, for 3) at `resolution`."""
    say(f"{nodes} node(s), {resolution} px: running {iterations} iterations")
    sets = overrides(resolution, iterations) + (PINNED if address else [])
    started = time.perf_counter()
    job = run_job(tmp / f"n{nodes}-r{resolution}", sets, address)
    counts, rows = job["counts"], job["history"]
    get, put = counts["get_bytes"] / iterations, counts["put_bytes"] / iterations
    row = {"nodes": nodes, "resolution": resolution, "record": record / 1e6, "get": get / 1e6, "put": put / 1e6,
           "percent": 100 * get / record, "iteration_s": statistics.median(h["times"]["iteration"] for h in rows),
           "get_calls": counts["get_calls"], "put_calls": counts["put_calls"], "iterations": len(rows),
           "job_s": time.perf_counter() - started}
    say(f"{nodes} node(s), {resolution} px: done in {row['job_s']:.0f} s, driver get {row['get']:.2f} MB/iter")
    return row


def run_all(sizes: list[int], nodes: list[int], iterations: int) -> list[dict[str, Any]]:
    records = {}
    for size in sizes:
        say(f"sampling one group at {size} px for the record size")
        records[size] = record_bytes(size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="flowrl-dp-") as tmp:
        if 1 in nodes:
            rows += [measure(1, size, iterations, records[size], Path(tmp), None) for size in sizes]
        if 3 in nodes:
            from bench.local_cluster import LocalCluster

            say("starting the three-node cluster")
            cluster = LocalCluster(Path("/tmp") / f"flowrl-dp-{os.getpid()}", {"head": 1},
                                   env() | {"PYTHONPATH": str(ROOT)})
            try:
                cluster.add("rollout", 2, {"rollout_node": 1})
                cluster.add("learner", 1, {"learner_node": 1})
                rows += [measure(3, size, iterations, records[size], Path(tmp), cluster.address) for size in sizes]
            finally:
                cluster.close()
    return rows


def cell(value: Any) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def table(title: str, runs: list[dict[str, Any]]) -> str:
    """One markdown table: per (nodes, resolution), the record size and each run's columns side by side."""
    labels = [run["label"] for run in runs]
    header = ["nodes", "resolution", "record MB/iter"] + [f"{name} ({label})" if len(runs) > 1 else name
                                                         for _, name in COLUMNS for label in labels]
    keyed = [{(r["nodes"], r["resolution"]): r for r in run["rows"]} for run in runs]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in sorted(set().union(*keyed)):
        rows = [k.get(key, {}) for k in keyed]
        record = next(r["record"] for r in rows if r)
        values = [*key, record] + [row.get(field, "–") for field, _ in COLUMNS for row in rows]
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,128,256", help="image sizes (model.resolution), comma-separated")
    parser.add_argument("--nodes", default="1,3", help="1 (a local Ray), 3 (bench/local_cluster.py) or both")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--label", default="", help="the run's name in the table title and the JSON")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                        help="print two saved runs side by side; nothing is run")
    args = parser.parse_args()
    if args.compare:
        runs = [json.loads(p.read_text()) for p in args.compare]
        print(table(" vs ".join(r["label"] for r in runs) + " (tiny job, driver data plane)", runs))
        return
    sizes, nodes = [int(s) for s in args.sizes.split(",")], [int(n) for n in args.nodes.split(",")]
    run = {"label": args.label, "date": time.strftime("%Y-%m-%d %H:%M"), "iterations": args.iterations,
           "job": JOB, "rows": run_all(sizes, nodes, args.iterations)}
    print(table(f"{args.label} (tiny job, {args.iterations} iterations of 4 groups x 4, driver data plane)".lstrip(),
                [run]))
    if args.json:
        args.json.write_text(json.dumps(run, indent=1) + "\n")


if __name__ == "__main__":
    main()
