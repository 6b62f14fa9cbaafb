"""Rollout throughput: images/s of a plain diffusers pipeline call, of the rollout sampler in-process (recording
log-probs), and of the RolloutPool with 1 and 2 workers, with the same model, steps and batch, measured in one run.

    .venv/bin/python bench/rollout_throughput.py [--family flux] [--path DIR] [--steps 4] [--batch 4] [--groups 6]

Without --path a tiny random model is built into a temporary folder. Compare the ratios, not the absolute times: these
vary up to 2x from run to run on a shared machine, while every row of one run sees the same machine. Every process
computes with the same number of torch threads: --cpus-per-worker, what Ray gives a pool worker (more threads than
free cores slows CPU runs down many times over, so the in-process rows do not take all cores).
"""

from __future__ import annotations

import os

# Before anything imports ray: keep the local Ray on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.config import JobConfig, RayConfig  # noqa: E402
from cluster.config_loading import load_config  # noqa: E402
from rollout.prompts.files import builtin_prompts  # noqa: E402
from rollout.prompts.groups import GroupSampler  # noqa: E402

GUIDANCE = {"flux": 3.5, "sd3": 4.5}
# cluster/tiny.yaml's adapter names FLUX modules; SD3's transformer has the attention projections only
LORA_TARGETS = {"flux": None, "sd3": "[to_q, to_k, to_v, to_out.0]"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=["flux", "sd3"], default="flux")
    ap.add_argument("--path", help="diffusers model folder (default: a tiny random model built on the fly)")
    ap.add_argument("--steps", type=int, default=4, help="sampling steps")
    ap.add_argument("--batch", type=int, default=4, help="images per pipeline call = group size = samples per forward")
    ap.add_argument("--groups", type=int, default=6, help="timed calls / groups per row")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    return ap.parse_args(argv)


def job_config(args: argparse.Namespace, path: str) -> JobConfig:
    """cluster/tiny.yaml with the benchmark's model, steps and batch layout."""
    return load_config(ROOT / "cluster" / "tiny.yaml", [
        f"model.family={args.family}", f"model.path={path}", "model.build_tiny=false", f"model.dtype={args.dtype}",
        f"model.resolution={args.resolution}", f"sampler.num_steps={args.steps}",
        f"sampler.guidance_scale={GUIDANCE[args.family]}", f"data.group_size={args.batch}",
        f"data.images_per_iteration={args.batch}", "learner.micro_batch_size=1",
        f"rollout.samples_per_forward={args.batch}", f"rollout.num_cpus_per_actor={args.cpus_per_worker}",
        *([f"learner.lora.target_modules={LORA_TARGETS[args.family]}"] if LORA_TARGETS[args.family] else []),
    ])


def time_calls(call, count: int) -> float:
    """Seconds for `count` calls after one untimed warm-up call."""
    call(0)
    start = time.perf_counter()
    for i in range(count):
        call(i + 1)
    return time.perf_counter() - start


def bench_pipeline(cfg: JobConfig, prompts: list[str]) -> float:
    """One plain diffusers pipeline call per batch, images returned as arrays."""
    from diffusers import DiffusionPipeline

    m, s = cfg.model, cfg.sampler
    pipe = DiffusionPipeline.from_pretrained(m.path, dtype=getattr(torch, m.dtype))
    pipe.set_progress_bar_config(disable=True)
    batch = cfg.data.group_size

    def call(i: int) -> None:
        pipe(prompt=[prompts[i % len(prompts)]] * batch, num_inference_steps=s.num_steps,
             guidance_scale=s.guidance_scale, height=m.resolution, width=m.resolution,
             max_sequence_length=m.max_sequence_length, generator=torch.Generator().manual_seed(i), output_type="np")

    return time_calls(call, len(prompts))


def bench_in_process(cfg: JobConfig, groups: list) -> float:
    """RolloutSampler in this process: a whole group per call, log-probs recorded."""
    from rollout.models.loading import load_flow_model
    from rollout.sampling.loop import RolloutSampler
    from rollout.sampling.trajectory import SamplerSettings

    m = cfg.model
    model = load_flow_model(m.path, m.family, dtype=getattr(torch, m.dtype), max_sequence_length=m.max_sequence_length)
    sampler = RolloutSampler(model, SamplerSettings.from_config(cfg), cfg.seed)
    return time_calls(lambda i: sampler.sample_group(groups[i % len(groups)]), len(groups) - 1)


def bench_pool(cfg: JobConfig, groups: list, workers: int) -> float:
    """RolloutPool with `workers` actors, after each has sampled one warm-up group."""
    from rollout.pool import RolloutPool
    from rollout.sampling.trajectory import SamplerSettings

    pool = RolloutPool(cfg, SamplerSettings.from_config(cfg), num_workers=workers)
    try:
        pool.submit(groups[:workers])
        list(pool.results())
        start = time.perf_counter()
        pool.submit(groups[workers:])
        list(pool.results())
        return time.perf_counter() - start
    finally:
        pool.shutdown()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(max(1, int(args.cpus_per_worker)))
    import ray

    from cluster.runtime import start_ray

    with tempfile.TemporaryDirectory() as tmp:
        path = args.path
        if path is None:
            from rollout.models.tiny import build_tiny

            path = str(build_tiny(args.family, Path(tmp) / args.family))
        cfg = job_config(args, path)
        sampler = GroupSampler(builtin_prompts(), group_size=args.batch, seed=cfg.seed)
        images = args.batch * args.groups
        rows = [("diffusers pipeline call", bench_pipeline(cfg, [g.prompt for g in sampler.take(args.groups + 1)]))]
        groups = sampler.take(args.groups + 1)
        rows.append(("RolloutSampler in-process, log-probs", bench_in_process(cfg, groups)))
        start_ray(RayConfig(namespace="bench"))
        try:
            for workers in (1, 2):
                groups = sampler.take(args.groups + workers)
                rows.append((f"RolloutPool, {workers} worker{'s' if workers > 1 else ''}",
                             bench_pool(cfg, groups, workers)))
        finally:
            ray.shutdown()

    print(f"\n{args.family}, {args.resolution} px, {args.steps} steps, batch {args.batch}, {args.groups} timed "
          f"batches per row ({images} images), {cfg.sampler.kind} with log-probs, torch threads "
          f"{torch.get_num_threads()}, {args.cpus_per_worker:g} CPU per pool worker")
    base = images / rows[0][1]
    print(f"| {'row':<38} | {'images/s':>9} | {'vs pipeline':>11} |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 13}|")
    for name, seconds in rows:
        rate = images / seconds
        print(f"| {name:<38} | {rate:>9.1f} | {rate / base:>10.2f}x |")


if __name__ == "__main__":
    main()
