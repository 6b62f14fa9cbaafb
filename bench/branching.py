"""Rollout images/s with and without branching at the Fast window, with one config's sampler, in one run.

    .venv/bin/python bench/branching.py [--cfg cluster/micro.yaml] [--groups 6] [--threads 2] [--set key=value ...]

Branched: the config as it is (one initial noise per group, a Fast window): the ODE steps before the window are
computed once per group. Unbranched: the same sampler with an initial noise per sample, which computes every step for
every sample, as a rollout without branching does. Both sample the same groups (window positions included). Without
the shapes base model (bench/shapes_base.py), pass e.g. `--set model.path=.cache/tiny/sd3 --set model.build_tiny=true
--set model.max_sequence_length=32` to run the micro sampler on a tiny random SD3.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.config_loading import load_config  # noqa: E402
from rollout.models.loading import load_configured  # noqa: E402
from rollout.prompts.groups import PromptGroup, sample_seed  # noqa: E402
from rollout.sampling.loop import RolloutSampler, recorded_steps  # noqa: E402
from rollout.sampling.trajectory import SamplerSettings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cfg", default=str(ROOT / "cluster/micro.yaml"))
    ap.add_argument("--groups", type=int, default=6, help="groups per mode (window positions vary by group)")
    ap.add_argument("--repeats", type=int, default=3, help="passes over the groups; the median pass counts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.cfg, args.set)
    settings = SamplerSettings.from_config(cfg)
    if not (settings.fast_window_size and settings.same_initial_noise):
        sys.exit(f"{args.cfg}: branching needs sampler.fast_window and sampler.same_initial_noise: true")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]
    model = load_configured(cfg.model, dtype=dtype, device="cpu")
    size = cfg.data.group_size
    groups = [PromptGroup(g, "a red square", {}, tuple(sample_seed(cfg.seed, g, i) for i in range(size)))
              for g in range(args.groups)]
    modes = {"branched": settings, "unbranched": dataclasses.replace(settings, same_initial_noise=False)}
    samplers = {name: RolloutSampler(model, s, cfg.seed) for name, s in modes.items()}
    n = settings.num_steps
    starts = [recorded_steps(settings, cfg.seed, g.group_id)[0] for g in groups]
    forwards = {"branched": statistics.mean(j + size * (n - j) for j in starts), "unbranched": size * n}
    print(f"{args.cfg}: {settings.kind}, {n} steps, window {settings.fast_window_size} at steps "
          f"{sorted(set(starts))}, groups of {size}, {args.threads} torch threads", flush=True)

    samplers["branched"].sample_group(groups[0])  # warm-up
    passes: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, sampler in samplers.items():  # interleaved: both see the same machine
            began = time.perf_counter()
            for group in groups:
                sampler.sample_group(group)
            passes[name].append(time.perf_counter() - began)
    images = args.groups * size
    rate = {name: images / statistics.median(seconds) for name, seconds in passes.items()}
    print("| rollout | sample-forwards per group | images / s | speed-up |")
    print("|---|---|---|---|")
    for name in modes:
        print(f"| {name} | {forwards[name]:.1f} | {rate[name]:.1f} | {rate[name] / rate['unbranched']:.2f}x |")


if __name__ == "__main__":
    main()
