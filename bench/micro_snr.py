"""How much of one gradient of the micro config is signal: per-group policy gradients, their mean and spread.

    .venv/bin/python bench/micro_snr.py [--groups 72] [--checkpoint DIR ...] [--set key=value ...]

Any objective and sampler option the config takes: e.g. `--set sampler.antithetic=true` for antithetic window noise,
or `--set learner.objective=nft --set sampler.kind=ode --set sampler.fast_window=null --set
sampler.same_initial_noise=false` for DiffusionNFT (AWM alike), whose gradient is taken at the rollout policy (the old
or prox adapter equal to θ).

Samples J groups (cluster/micro.yaml's sampler, training prompts, distinct seeds) from the base model and from each
checkpoint, scores them with the `shapes` reward, takes the learner's advantages and loss, and computes each group's
gradient g_j of the loss over the LoRA parameters. With m the mean of the g_j and S = Σ_j |g_j − m|² / (J − 1) the total
variance of one group's gradient, |μ|² ≈ |m|² − S/J estimates the squared norm of the true (expected) gradient, and a
batch of n groups has signal-to-noise SNR(n) = n·|μ|²/S. The table gives SNR at the config's batch, the expected cosine
between the gradients of two independent batches (SNR/(1 + SNR)), and the groups a batch needs for SNR 1 (in
brackets: the same with |μ|² two standard errors above its estimate, the most the data allow).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.config_loading import load_config  # noqa: E402
from learner.objectives.base import UpdateStats  # noqa: E402
from learner.objectives.batch import batch_advantages  # noqa: E402
from learner.objectives.registry import objective_for  # noqa: E402
from learner.ranks.checkpoint import load_tree  # noqa: E402
from rewards.shapes import ShapesScorer  # noqa: E402
from rollout.models.loading import load_flow_model  # noqa: E402
from rollout.policy import add_lora, apply_policy_state, policy_state  # noqa: E402
from rollout.prompts.groups import PromptGroup  # noqa: E402
from rollout.sampling.loop import RolloutSampler  # noqa: E402
from rollout.shapes import data as shapes_data  # noqa: E402

CONFIG = ROOT / "cluster" / "micro.yaml"


class AtThePolicy:
    """The objective's Trainee at the rollout policy: a plain backward, and the trailing adapter (old / prox) equal to
    θ; no reference term (kl_beta and ref_beta are 0 here)."""

    negative = None
    policy_version = 0

    def __init__(self, model) -> None:
        self.model = model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reference(self):
        raise RuntimeError("the gradient SNR is measured without a reference term")

    def trailing(self):
        return contextlib.nullcontext()


def group_gradients(cfg, model, params: list[torch.Tensor], groups: int) -> tuple[torch.Tensor, dict[str, float]]:
    """(J, P) per-group gradients of the learner's loss (with the batch's advantages) and the batch's statistics."""
    lc = cfg.learner.model_copy(update={"kl_beta": 0.0, "ref_beta": 0.0})
    objective = objective_for(cfg.model_copy(update={"learner": lc}))
    sampler = RolloutSampler(model, objective.rollout_settings(), cfg.seed)
    scorer, items, size = ShapesScorer(), shapes_data.shapes_prompts("train"), cfg.data.group_size
    trajectories, rewards = [], []
    for j in range(groups):
        item = items[j % len(items)]
        traj = sampler.sample_group(PromptGroup(j, item.prompt, item.metadata,
                                                tuple(range(1000 * j, 1000 * j + size))))
        scored = scorer(traj.images, [item.prompt] * size, [item.metadata] * size)
        trajectories.append(traj)
        rewards.append(torch.as_tensor(scored.scores, dtype=torch.float64))
    adv, stats = batch_advantages(trajectories, rewards, std=lc.advantage_std, clip=lc.advantage_clip)
    grads = []
    for j, traj in enumerate(trajectories):
        samples, group_adv = [(0, i) for i in range(size)], adv[j * size:(j + 1) * size]
        for p in params:
            p.grad = None
        objective.train(AtThePolicy(model), objective.micro_batch([traj], samples, group_adv, "cpu"), UpdateStats())
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]).double())
        print(f"\r  group {j + 1}/{groups}", end="", flush=True)
    print()
    return torch.stack(grads), stats


def signal_to_noise(g: torch.Tensor, batch_groups: int) -> dict[str, float]:
    """|μ|² (unbiased, with its jackknife standard error), S = tr Σ of one group's gradient, and what they mean for a
    batch of `batch_groups` groups. |m|² − S/J is the U-statistic Σ_{i≠j} g_i·g_j / (J(J−1)), computed so."""
    J = g.shape[0]
    gram = g @ g.T
    total, diagonal = float(gram.sum()), torch.diagonal(gram)
    mu2 = (total - float(diagonal.sum())) / (J * (J - 1))
    S = (float(diagonal.sum()) - total / J) / (J - 1)
    off_row = gram.sum(1) - diagonal  # Σ_{j≠i} g_i·g_j
    leave_out = (total - float(diagonal.sum()) - 2 * off_row) / ((J - 1) * (J - 2))
    mu2_se = math.sqrt((J - 1) / J * float(((leave_out - leave_out.mean()) ** 2).sum()))
    snr, high = batch_groups * mu2 / S, mu2 + 2 * mu2_se
    return {"mu2": mu2, "mu2_se": mu2_se, "S": S, "snr": snr, "snr_high": batch_groups * high / S,
            "cosine": snr / (1 + snr) if snr > 0 else float("nan"),
            "groups_for_snr1": S / mu2 if mu2 > 0 else float("inf"),
            "groups_for_snr1_low": S / high if high > 0 else float("inf")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=72, help="groups sampled per model (J; 72 = every training prompt twice)")
    ap.add_argument("--checkpoint", nargs="*", default=[], help="checkpoint folders (iter-*) besides the base")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = ap.parse_args()
    if args.groups < 4:
        raise SystemExit(f"--groups must be at least 4, got {args.groups}")
    for folder in args.checkpoint:
        if not (Path(folder) / "learner-rank0.safetensors").is_file():
            raise SystemExit(f"{folder}: not a checkpoint folder (no learner-rank0.safetensors inside)")
    cfg = load_config(CONFIG, args.overrides)
    torch.set_num_threads(2)
    torch.manual_seed(cfg.seed)
    model = load_flow_model(cfg.model.path, "sd3", max_sequence_length=cfg.model.max_sequence_length)
    add_lora(model.transformer, cfg.learner.lora)
    base = {k: v.clone() for k, v in policy_state(model.transformer, "lora").items()}
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    batch_groups = cfg.data.images_per_iteration // cfg.data.group_size
    rows = []
    for name in ["base"] + args.checkpoint:
        state = base if name == "base" else load_tree(Path(name) / "learner-rank0")["weights"]
        apply_policy_state(model.transformer, state, "lora")
        print(f"{name}: {args.groups} groups of {cfg.data.group_size}", flush=True)
        g, stats = group_gradients(cfg, model, params, args.groups)
        rows.append((name, stats, signal_to_noise(g, batch_groups)))
        print(f"  reward {stats['reward_mean']:.3f}, SNR at {batch_groups} groups {rows[-1][2]['snr']:.3f}", flush=True)

    window = cfg.sampler.fast_window.size if cfg.sampler.fast_window else None
    print(f"\n{cfg.learner.objective}, {cfg.sampler.kind}, noise {cfg.sampler.noise_level}, window {window}, "
          f"antithetic {cfg.sampler.antithetic}, {cfg.learner.log_prob_reduction} log-prob; batch {batch_groups} "
          f"groups of {cfg.data.group_size}; {args.groups} groups per model\n")
    print(f"| model | reward | zero-std groups | |μ|² ± SE | tr Σ (one group) | SNR at {batch_groups} groups "
          f"(at most) | cosine of two batches | groups for SNR 1 (at least) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, stats, r in rows:
        print(f"| {name} | {stats['reward_mean']:.3f} | {stats['zero_std_group_frac']:.2f} | "
              f"{r['mu2']:.3g} ± {r['mu2_se']:.2g} | {r['S']:.3g} | {r['snr']:.3f} ({r['snr_high']:.3f}) | "
              f"{r['cosine']:.3f} | {r['groups_for_snr1']:.0f} ({r['groups_for_snr1_low']:.0f}) |")
    print("\n(at most / at least: with |μ|² at its estimate plus 2 standard errors)")


if __name__ == "__main__":
    main()
