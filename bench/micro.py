"""The CPU micro-benchmark as a race: GRPO (Flow-SDE, CPS, the exact SDE, GRPO-Guard, the papers' reference setting)
against DiffusionNFT and AWM through the whole job on the shapes base model, with the same seeds and the same budget of
rollout images, evaluated on the training and the held-out combos.

    .venv/bin/python bench/micro.py [--methods sde,cps,nft] [--iterations 50] [--eval-every 25]
                                    [--eval-samples 512] [--out runs/micro-bench]

Builds the base model once (bench/shapes_base.py, cached in .cache/shapes-base), runs
`python -m learner.main --cfg cluster/micro.yaml` once per method, evaluates the base model and every checkpoint with
the same ODE seeds (exact accuracy of the `shapes` reward, mean ± standard error), and writes to --out: results.md (the
tables), results.json, curves.png (training- and held-out-combo accuracy against wall-clock minutes of training),
samples.png (base vs tuned, same seeds) and the noise probe (high-frequency energy of images sampled by each step rule
from one initial noise).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.shapes_base import shapes_base  # noqa: E402
from cluster.config_loading import load_config  # noqa: E402
from learner.ranks.checkpoint import load_tree  # noqa: E402
from rewards.shapes import ShapesScorer  # noqa: E402
from rollout.models.loading import load_flow_model  # noqa: E402
from rollout.policy import add_lora, apply_policy_state, policy_state  # noqa: E402
from rollout.prompts.groups import PromptGroup  # noqa: E402
from rollout.sampling.loop import RolloutSampler  # noqa: E402
from rollout.sampling.steps import DEFAULT_LOG_PROB_FORM  # noqa: E402
from rollout.sampling.trajectory import SamplerSettings  # noqa: E402
from rollout.shapes import data as shapes_data  # noqa: E402

CONFIG = ROOT / "cluster" / "micro.yaml"
# The forward objectives sample whole ODE trajectories, each with its own initial noise (a shared one would make a
# group's ODE samples identical), and train at 9 of the 10 levels per image.
FORWARD = ["sampler.kind=ode", "sampler.fast_window=null", "sampler.same_initial_noise=false"]
RULES = {  # name -> (what it is, config overrides); the Fast variant's noise level 0.8 for every GRPO rule
    "sde": ("Flow-SDE a=0.8", ["sampler.kind=sde", "sampler.noise_level=0.8"]),
    "cps": ("CPS eta=0.8", ["sampler.kind=cps", "sampler.noise_level=0.8"]),
    "sde_exact": ("exact SDE a=0.8", ["sampler.kind=sde_exact", "sampler.noise_level=0.8"]),
    "reference": ("Flow-SDE a=0.8, mean log-prob, clip 1e-5, lr 3e-4",
                  ["sampler.kind=sde", "sampler.noise_level=0.8", "learner.log_prob_reduction=mean",
                   "learner.clip_range=1e-5", "learner.lr=3e-4"]),
    "guard": ("GRPO-Guard, Flow-SDE a=0.8, clip 2e-6, lr 1e-4, group std",
              ["sampler.kind=sde", "sampler.noise_level=0.8", "learner.ratio_norm=true",
               "learner.log_prob_reduction=mean", "learner.clip_range=2e-6", "learner.lr=1e-4",
               "learner.advantage_std=group"]),
    "nft": ("DiffusionNFT, ODE rollouts, beta 1, lr 1e-3", ["learner.objective=nft", *FORWARD, "learner.lr=1e-3"]),
    "awm": ("AWM, ODE rollouts, lr 1e-3", ["learner.objective=awm", *FORWARD, "learner.lr=1e-3"]),
}
SPLITS = ("train", "heldout")
COLOURS = {"sde": (200, 60, 60), "cps": (40, 110, 200), "sde_exact": (40, 160, 80), "reference": (150, 150, 150),
           "guard": (230, 140, 30), "nft": (140, 60, 180), "awm": (20, 150, 160)}


class Evaluator:
    """Exact accuracy of ODE samples (eval.num_steps, fixed seeds) on each split, for the base or a checkpoint."""

    def __init__(self, cfg, samples: int) -> None:
        self.cfg = cfg
        self.model = load_flow_model(cfg.model.path, "sd3", max_sequence_length=cfg.model.max_sequence_length)
        add_lora(self.model.transformer, cfg.learner.lora)  # B = 0: the base model until a state is applied
        self.base = {k: v.clone() for k, v in policy_state(self.model.transformer, "lora").items()}
        self.sampler = RolloutSampler(self.model, SamplerSettings.from_config(cfg), cfg.seed)
        self.scorer = ShapesScorer()
        self.items = {}
        for split in SPLITS:
            items = shapes_data.shapes_prompts(split)
            self.items[split] = [items[i % len(items)] for i in range(samples)]
        self.seeds = {split: [10_000 * (1 + k) + i for i in range(samples)] for k, split in enumerate(SPLITS)}

    def __call__(self, state: dict | None = None) -> tuple[dict, dict]:
        """({split: (accuracy, standard error)}, {split: uint8 images})."""
        apply_policy_state(self.model.transformer, state if state is not None else self.base, "lora")
        accuracy, images = {}, {}
        for split in SPLITS:
            items = self.items[split]
            pics = self.sampler.sample_eval([p.prompt for p in items], self.seeds[split],
                                            num_steps=self.cfg.eval.num_steps, batch_size=64)
            exact = self.scorer(pics, [p.prompt for p in items], [p.metadata for p in items]).metrics["shapes_exact"]
            p = float(exact.mean())
            accuracy[split] = (p, math.sqrt(max(p * (1 - p), 1e-12) / len(exact)))
            images[split] = pics.numpy()
        return accuracy, images


def run_rule(name: str, out: Path, iterations: int, every: int) -> float:
    """The real job for one rule; its wall time in seconds."""
    args = [sys.executable, "-m", "learner.main", "--cfg", str(CONFIG), "--set", f"output_dir={out}",
            "--set", f"iterations={iterations}", "--set", "eval.every_n_iterations=0",
            "--set", f"checkpoint.every_n_iterations={every}", "--set", "checkpoint.keep_last=1000",
            "--set", "metrics.port=0"]
    for override in RULES[name][1]:
        args += ["--set", override]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    with open(out.parent / f"{name}.log", "w") as log:
        r = subprocess.run(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"the {name} job failed (exit {r.returncode}); see {out.parent / f'{name}.log'}")
    return time.perf_counter() - started


def noise_probe(evaluator: Evaluator, groups: int = 8, size: int = 8) -> dict[str, float]:
    """High-frequency energy (mean squared difference from a 3x3 box blur, pixels in [0, 1]) of base-model images
    sampled by each step rule from the same initial noise and prompts."""
    evaluator(None)
    cfg, model = evaluator.cfg, evaluator.model
    items = shapes_data.shapes_prompts("train")
    energy = {}
    for kind, level in (("ode", 0.0), ("sde", 0.7), ("sde_exact", 0.7), ("cps", 0.9)):
        settings = SamplerSettings(kind=kind, noise_level=level, log_prob_form=DEFAULT_LOG_PROB_FORM[kind],
                                   guidance_scale=cfg.sampler.guidance_scale, height=64, width=64,
                                   num_steps=cfg.sampler.num_steps, samples_per_forward=size,
                                   trained_steps=cfg.sampler.num_steps - 1)
        sampler = RolloutSampler(model, settings, cfg.seed)
        images = torch.cat([sampler.sample_group(PromptGroup(g, items[g].prompt, items[g].metadata,
                                                             tuple(range(100 * g, 100 * g + size)))).images
                            for g in range(groups)]).float() / 255
        x = images.permute(0, 3, 1, 2)
        blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
        energy[kind] = float(((x - blurred) ** 2).mean())
    return energy


# --------------------------------------------------------------------------- pictures


def plot_curves(curves: dict, path: Path) -> None:
    """Accuracy against wall-clock minutes of training (curves: {method: {split: [(minutes, (acc, se))]}}), one panel
    per split, ±1 standard error bars: a PNG drawn with PIL."""
    width, height, pad = 420, 300, 46
    canvas = Image.new("RGB", (2 * width, height + 40), "white")
    draw = ImageDraw.Draw(canvas)
    iterations = max(i for rule in curves.values() for i, _ in rule["train"]) or 1  # here: minutes
    for panel, split in enumerate(SPLITS):
        x0 = panel * width
        values = [v for rule in curves.values() for _, (v, _) in rule[split]]
        lo, hi = max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.05)

        def at(i, v):
            return (x0 + pad + (width - 2 * pad) * i / iterations,
                    height - pad + 20 - (height - 2 * pad) * (v - lo) / max(hi - lo, 1e-6))

        draw.rectangle([x0 + pad, pad - 20 + 20, x0 + width - pad, height - pad + 20], outline="black")
        draw.text((x0 + pad, 8), f"{split} combos: exact accuracy against minutes", fill="black")
        for k in range(5):
            v = lo + (hi - lo) * k / 4
            draw.text((x0 + 4, at(0, v)[1] - 6), f"{v:.2f}", fill="black")
        for k in range(5):  # minute ticks
            minutes = iterations * k / 4
            draw.text((at(minutes, lo)[0] - 8, height - pad + 24), f"{minutes:.0f}", fill="black")
        for name, rule in curves.items():
            points = [at(i, v) for i, (v, _) in rule[split]]
            draw.line(points, fill=COLOURS[name], width=2)
            for (i, (v, se)), (px, py) in zip(rule[split], points):
                draw.line([at(i, v - se), at(i, v + se)], fill=COLOURS[name], width=1)
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=COLOURS[name])
    for k, name in enumerate(curves):
        draw.rectangle([pad + 90 * k, height + 22, pad + 90 * k + 12, height + 32], fill=COLOURS[name])
        draw.text((pad + 90 * k + 16, height + 21), name, fill="black")
    canvas.save(path)


def sample_grid(rows: list[tuple[str, np.ndarray]], path: Path, columns: int = 12) -> None:
    """One row of images per (label, images), the same prompts and seeds in every row."""
    label_w, size = 90, 64
    canvas = Image.new("RGB", (label_w + columns * (size + 2), len(rows) * (size + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * (size + 2) + size // 2 - 6), label, fill="black")
        for c, image in enumerate(images[:columns]):
            canvas.paste(Image.fromarray(image), (label_w + c * (size + 2), r * (size + 2)))
    canvas.save(path)


# --------------------------------------------------------------------------- the benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-samples", type=int, default=512)
    ap.add_argument("--methods", default=",".join(RULES), help=f"comma-separated, of {', '.join(RULES)}")
    ap.add_argument("--out", default="runs/micro-bench")
    args = ap.parse_args()
    rules = args.methods.split(",")
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}; allowed: {', '.join(RULES)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(CONFIG)
    started = time.perf_counter()
    base = shapes_base(ROOT / cfg.model.path)
    print(f"base model: {cfg.model.path} (train {base['train_exact']}, held-out {base['heldout_exact']} exact at its "
          f"build, guidance {base['guidance_scale']}; this run's guidance {cfg.sampler.guidance_scale})", flush=True)

    torch.set_num_threads(2)
    evaluator = Evaluator(cfg, args.eval_samples)
    t = time.perf_counter()
    base_accuracy, base_images = evaluator(None)
    eval_s = time.perf_counter() - t
    print(f"base: {base_accuracy} ({eval_s:.0f} s per evaluation)", flush=True)
    probe = noise_probe(evaluator)
    print(f"noise probe: {probe}", flush=True)

    results = {"iterations": args.iterations, "eval_samples": args.eval_samples, "base": base_accuracy,
               "base_model": base, "noise_probe": probe, "rules": {}}
    finals = {}
    for name in rules:
        wall = run_rule(name, out / name, args.iterations, args.eval_every)
        curve = {split: [(0, base_accuracy[split])] for split in SPLITS}
        for folder in sorted((out / name / "checkpoints").glob("iter-*")):
            state = load_tree(folder / "learner-rank0")["weights"]
            accuracy, images = evaluator(state)
            for split in SPLITS:
                curve[split].append((int(folder.name[5:]), accuracy[split]))
        finals[name] = images
        history = [json.loads(ln) for ln in (out / name / "history.jsonl").read_text().splitlines()]
        elapsed = np.cumsum([h["times"]["iteration"] for h in history]) / 60  # training minutes after iteration i
        minutes = {split: [(0.0 if i == 0 else float(elapsed[i - 1]), a) for i, a in curve[split]] for split in SPLITS}
        results["rules"][name] = {"setting": RULES[name][0], "job_s": wall, "curve": curve, "minutes": minutes,
                                  "s_per_iteration": float(np.mean([h["times"]["iteration"] for h in history]))}
        print(f"{name}: job {wall:.0f} s, final {curve['train'][-1][1]}, {curve['heldout'][-1][1]}", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    results["wall_s"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1))

    plot_curves({name: r["minutes"] for name, r in results["rules"].items()}, out / "curves.png")
    best = max(finals, key=lambda n: results["rules"][n]["curve"]["heldout"][-1][1][0])
    sample_grid([("base train", base_images["train"]), (f"{best} train", finals[best]["train"]),
                 ("base held-out", base_images["heldout"]), (f"{best} held-out", finals[best]["heldout"])],
                out / "samples.png")
    table = report(results)
    (out / "results.md").write_text(table)
    print(table)


def report(results: dict) -> str:
    """Markdown tables: base and final accuracy per rule with the change in standard errors, the curves, timings."""
    def pm(a):
        return f"{a[0]:.3f} ± {a[1]:.3f}"

    lines = [f"{results['eval_samples']} ODE samples per split, {results['iterations']} iterations per rule; exact "
             f"accuracy mean ± standard error.", "",
             "| rule | setting | train: base → final (Δ) | held-out: base → final (Δ, in SE) | job s | s/iter |",
             "|---|---|---|---|---|---|"]
    base = results["base"]
    if "base_model" in results:
        m = results["base_model"]
        lines[1:1] = [f"Base model (seed {m['settings']['seed']}): validations (iteration, train exact without CFG) "
                      f"{m.get('validations', 'not recorded')}; at its build train {m['train_exact']}, held-out "
                      f"{m['heldout_exact']} (guidance {m['guidance_scale']}).", ""]
    for name, r in results["rules"].items():
        cells = []
        for split in SPLITS:
            final = r["curve"][split][-1][1]
            delta = final[0] - base[split][0]
            se = math.hypot(final[1], base[split][1])
            cells.append(f"{pm(base[split])} → {pm(final)} ({delta:+.3f}" + (f", {delta / se:+.1f} SE)"
                                                                              if split == "heldout" else ")"))
        lines.append(f"| {name} | {r['setting']} | {cells[0]} | {cells[1]} | {r['job_s']:.0f} | "
                     f"{r['s_per_iteration']:.2f} |")
    lines += ["", "| rule | split | " + " | ".join(f"it {i}" for i, _ in next(iter(results['rules'].values()))
                                                  ["curve"]["train"]) + " |",
              "|---|---|" + "---|" * len(next(iter(results["rules"].values()))["curve"]["train"])]
    for name, r in results["rules"].items():
        for split in SPLITS:
            lines.append(f"| {name} | {split} | " + " | ".join(f"{v:.3f}" for _, (v, _) in r["curve"][split]) + " |")
    probe = results["noise_probe"]
    lines += ["", "Noise probe (base model, same initial noise): high-frequency energy "
              + ", ".join(f"{k} {v:.5f}" for k, v in probe.items()), ""]
    if "wall_s" in results:
        lines.append(f"Whole benchmark: {results['wall_s'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
