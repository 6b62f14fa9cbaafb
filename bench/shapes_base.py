"""Builds (or finds) the shapes world's base model and scores it with the `shapes` reward.

    .venv/bin/python bench/shapes_base.py --out DIR [--seed 0] [--quick] [--overwrite] [--threads 2]

The model itself is built by `rollout.shapes.base_model.build_shapes_base`; this script adds what rollout code may not
do, scoring with a reward: 10-step ODE samples through the project's sampler (`RolloutSampler.sample_eval`) of the
train and held-out prompts at each of the settings' guidance scales, and the VAE's reconstructions of training images.
The exact accuracies (and the guidance scale with the best train accuracy, which the held-out combos play no part in
choosing) go into the model's `shapes_base.json`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewards.shapes import ShapesScorer  # noqa: E402
from rollout.models.loading import load_flow_model  # noqa: E402
from rollout.sampling.loop import RolloutSampler  # noqa: E402
from rollout.sampling.trajectory import SamplerSettings  # noqa: E402
from rollout.shapes import data as shapes_data  # noqa: E402
from rollout.shapes.base_model import (  # noqa: E402
    T5_LENGTH,
    BaseModelTooWeak,
    Settings,
    build_shapes_base,
    quick_settings,
)


def evaluate(path: Path, s: Settings, reconstructions: np.ndarray, captions: list[str], metadata: list[dict]) -> dict:
    """Exact accuracy and mean reward of `eval_samples` ODE samples per split (prompts cycled, seeds fixed) at each
    guidance scale, and the exact accuracy of the VAE reconstructions; the headline figures are the best guidance's."""
    model = load_flow_model(str(path), "sd3", max_sequence_length=T5_LENGTH)
    scorer, by_guidance = ShapesScorer(), {}
    vae_exact = float(scorer(reconstructions, captions, metadata).metrics["shapes_exact"].mean())
    print(f"VAE: exact accuracy of reconstructions {vae_exact:.3f}", flush=True)
    for guidance in s.guidance_scales:
        settings = SamplerSettings(kind="ode", noise_level=0.0, log_prob_form="gaussian", guidance_scale=guidance,
                                   height=64, width=64, num_steps=s.eval_steps, samples_per_forward=64, trained_steps=1)
        sampler = RolloutSampler(model, settings, run_seed=s.seed)
        results = by_guidance[str(guidance)] = {}
        for split in ("train", "heldout"):
            items = shapes_data.shapes_prompts(split)
            chosen = [items[i % len(items)] for i in range(s.eval_samples)]
            seeds = [1_000_003 * s.seed + i + (0 if split == "train" else 500_000) for i in range(len(chosen))]
            images = sampler.sample_eval([p.prompt for p in chosen], seeds, num_steps=s.eval_steps, batch_size=64)
            scored = scorer(images, [p.prompt for p in chosen], [p.metadata for p in chosen])
            results[f"{split}_exact"] = round(float(scored.metrics["shapes_exact"].mean()), 4)
            results[f"{split}_reward"] = round(float(scored.scores.mean()), 4)
    best = max(s.guidance_scales, key=lambda g: by_guidance[str(g)]["train_exact"])
    return {"guidance_scale": best, **by_guidance[str(best)], "by_guidance": by_guidance, "vae_exact": vae_exact}


def validate(path: Path, s: Settings) -> float:
    """Exact accuracy of `validation_samples` 10-step ODE samples of the training combos without CFG (as
    cluster/micro.yaml samples), seeds apart from the evaluation's: the builder's stopping test."""
    model = load_flow_model(str(path), "sd3", max_sequence_length=T5_LENGTH)
    settings = SamplerSettings(kind="ode", noise_level=0.0, log_prob_form="gaussian", guidance_scale=1.0, height=64,
                               width=64, num_steps=s.eval_steps, samples_per_forward=64, trained_steps=1)
    items = shapes_data.shapes_prompts("train")
    chosen = [items[i % len(items)] for i in range(s.validation_samples)]
    seeds = [7_000_001 * (s.seed + 1) + i for i in range(len(chosen))]
    images = RolloutSampler(model, settings, run_seed=s.seed).sample_eval([p.prompt for p in chosen], seeds,
                                                                          num_steps=s.eval_steps, batch_size=64)
    scored = ShapesScorer()(images, [p.prompt for p in chosen], [p.metadata for p in chosen])
    return float(scored.metrics["shapes_exact"].mean())


def shapes_base(out_dir: Path | str, settings: Settings = Settings(), *, overwrite: bool = False) -> dict:
    """The base model at `out_dir`, built until it validates and scored (or found cached); returns its marker."""
    return build_shapes_base(out_dir, settings, evaluate=evaluate, validate=validate, overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    """Command line: build (or find) the base model and print its accuracies."""
    parser = argparse.ArgumentParser(prog="python bench/shapes_base.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="model folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few iterations only (tests)")
    parser.add_argument("--overwrite", action="store_true", help="replace a folder built with other settings")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (1 is faster on a machine whose cores are busy with other work)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = quick_settings(args.seed) if args.quick else Settings(seed=args.seed)
    start = time.perf_counter()
    try:
        marker = shapes_base(args.out, settings, overwrite=args.overwrite)
    except (FileExistsError, BaseModelTooWeak) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"shapes base model at {args.out.absolute()} ({time.perf_counter() - start:.1f} s this call; "
          f"built in {marker['total_s']:.0f} s)")
    for guidance, found in marker["by_guidance"].items():
        print(f"  exact accuracy, 10-step ODE, guidance {guidance}: train {found['train_exact']:.3f}, "
              f"held-out {found['heldout_exact']:.3f}")
    print(f"  recommended guidance {marker['guidance_scale']}; VAE reconstructions {marker['vae_exact']:.3f} exact; "
          f"validations (iteration, train exact without CFG): {marker['validations']}")


if __name__ == "__main__":
    main()
