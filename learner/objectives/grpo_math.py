"""GRPO maths: group-relative advantages, the clipped policy loss and its ratio statistics (docs/math.md "GRPO")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Hashable, Sequence

import torch

STD_MODES = ("global", "group")


def _group_index(group_ids: torch.Tensor | Sequence[Hashable], n: int) -> torch.Tensor:
    """Dense group numbers 0..G−1 for per-sample group ids (an int tensor, or any hashable ids such as prompt texts)."""
    if isinstance(group_ids, torch.Tensor):
        if group_ids.ndim != 1 or group_ids.is_floating_point():
            raise ValueError(f"group_ids must be a 1-D integer tensor, got {group_ids.dtype} {tuple(group_ids.shape)}")
        index = torch.unique(group_ids.cpu(), return_inverse=True)[1]
    else:
        numbers: dict[Hashable, int] = {}
        index = torch.tensor([numbers.setdefault(g, len(numbers)) for g in group_ids], dtype=torch.long)
    if index.numel() != n:
        raise ValueError(f"got {index.numel()} group ids for {n} rewards")
    return index


def advantages(
    rewards: torch.Tensor | Sequence[float],
    group_ids: torch.Tensor | Sequence[Hashable],
    *,
    std: str = "global",
    eps: float = 1e-4,
    clip: float | None = 5.0,
) -> torch.Tensor:
    """A = (r − mean of its group) / (std + eps), clipped to ±clip; std (ddof 0) over all rewards ("global") or group.

    Global std is the reference default, so advantages wait for the whole iteration's rewards; a zero-variance group
    gets A = 0. `group_ids` is an integer tensor or a list of any hashable ids (e.g. prompt texts).
    """
    if std not in STD_MODES:
        raise ValueError(f"unknown std mode {std!r}; expected one of {', '.join(STD_MODES)}")
    r = torch.as_tensor(rewards)
    out_dtype, device = (r.dtype if r.is_floating_point() else torch.float32), r.device
    r = r.detach().to(device="cpu", dtype=torch.float64)
    if r.ndim != 1 or r.numel() == 0:
        raise ValueError(f"rewards must be a non-empty 1-D sequence, got shape {tuple(r.shape)}")
    index = _group_index(group_ids, r.numel())
    num_groups = int(index.max()) + 1
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, index, torch.ones_like(r))
    group_mean = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, index, r) / count
    centred = r - group_mean[index]
    if std == "global":
        scale = r.std(correction=0)
    else:
        scale = (torch.zeros(num_groups, dtype=torch.float64).index_add_(0, index, centred**2) / count).sqrt()[index]
    a = centred / (scale + eps)
    if clip is not None:
        a = a.clamp(-clip, clip)
    return a.to(device=device, dtype=out_dtype)


def nonzero_advantage_indices(advantages: torch.Tensor) -> torch.Tensor:
    """Positions of the samples whose advantage is not exactly 0 (the others carry no policy-gradient signal); the
    learner trains only these when `learner.drop_zero_advantage` is on."""
    return torch.nonzero(advantages != 0, as_tuple=False).reshape(-1)


@dataclass(frozen=True)
class RatioStats:
    """Statistics of the ratio ρ = exp(ℓ − ℓ_old) over the samples of one or more loss calls, as float64 sums (so
    calls and ranks add up exactly) and the largest |ρ − 1|; `means()` turns them into the reported figures."""

    SUMS: ClassVar[tuple[str, ...]] = ("samples", "ratio_m1", "ratio_m1_sq", "clipped", "log_ratio_sq")
    sums: torch.Tensor  # float64 (5,), in SUMS order: n, Σ(ρ − 1), Σ(ρ − 1)², #{|ρ − 1| > ε}, Σ(ℓ − ℓ_old)²
    max_dev: torch.Tensor  # float64 (): max |ρ − 1|

    def means(self) -> dict[str, float]:
        """clip_frac, ratio_mean, ratio_std (ddof 0), approx_kl = ½·mean((ℓ − ℓ_old)²), ratio_max_dev."""
        s = dict(zip(self.SUMS, self.sums.tolist()))
        n = max(s["samples"], 1.0)
        mean_m1 = s["ratio_m1"] / n
        return {
            "clip_frac": s["clipped"] / n,
            "ratio_mean": 1.0 + mean_m1,
            "ratio_std": max(s["ratio_m1_sq"] / n - mean_m1**2, 0.0) ** 0.5,
            "approx_kl": 0.5 * s["log_ratio_sq"] / n,
            "ratio_max_dev": float(self.max_dev),
        }


def policy_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, *, clip_range: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, RatioStats]:
    """PPO-clipped GRPO loss mean(w·max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))), ρ = exp(ℓ − ℓ_old), and its ratio statistics;
    `weights` w per sample (default 1).

    The statistics are computed once here, in float64 from ℓ − ℓ_old (ρ − 1 = expm1, well conditioned for the tiny
    ratios that clip ranges near 1e-4 allow), and passed on as sums.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(
            f"log_prob, old_log_prob and advantages need one shape, got {tuple(log_prob.shape)}, "
            f"{tuple(old_log_prob.shape)}, {tuple(advantages.shape)}"
        )
    diff = log_prob - old_log_prob.detach()
    ratio = torch.exp(diff)
    adv = advantages.detach().to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_sample = per_sample * weights.detach().to(per_sample.dtype)
    loss = per_sample.mean()
    with torch.no_grad():
        d = diff.detach().double().cpu()
        dev = torch.expm1(d)
        sums = torch.stack([torch.tensor(float(d.numel()), dtype=torch.float64), dev.sum(), (dev**2).sum(),
                            (dev.abs() > clip_range).double().sum(), (d**2).sum()])
        max_dev = dev.abs().max() if d.numel() else torch.zeros((), dtype=torch.float64)
    return loss, RatioStats(sums, max_dev)


def guard_log_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor, old_mean: torch.Tensor,
                    std: torch.Tensor) -> torch.Tensor:
    """GRPO-Guard's normalised log-ratio per sample (docs/math.md "GRPO-Guard"): (ℓθ − ℓold + b)·s with
    b = mean_D (μθ − μold)²/(2s²), for per-element-mean Gaussian log-probs ℓ (B,), means (B, ...) and the step std s
    (one per sample, any shape with B elements). Equals mean_D(z ⊙ (μθ − μold)) for a next state μold + s·z."""
    s = std.reshape(-1).to(log_prob.dtype)
    delta = (mean - old_mean.detach()).to(log_prob.dtype)
    b = (delta**2).reshape(delta.shape[0], -1).mean(dim=1) / (2.0 * s * s)
    return (log_prob - old_log_prob.detach() + b) * s
