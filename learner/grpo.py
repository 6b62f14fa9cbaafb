"""GRPO maths: group-relative advantages, the clipped policy loss and its statistics (MATH.md, "GRPO")."""

from __future__ import annotations

from typing import Hashable, Sequence

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
    """Indices of the samples whose advantage is not exactly 0 (the others carry no policy-gradient signal).

    Dropping them is optional; a learner that does must keep its micro-batch count fixed (DeepSpeed's gradient
    accumulation count is fixed at init), e.g. by splitting the kept samples over the same number of micro-batches.
    """
    return torch.nonzero(advantages != 0, as_tuple=False).reshape(-1)


def policy_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, *, clip_range: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clipped GRPO loss mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))), ρ = exp(ℓ − ℓ_old), and its statistics as floats.

    Statistics: clip_frac (fraction with |ρ − 1| > ε), ratio_mean, ratio_std (ddof 0), approx_kl = ½·mean((ℓ − ℓ_old)²).
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
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "clip_frac": float(((ratio - 1.0).abs() > clip_range).float().mean()),
            "ratio_mean": float(ratio.mean()),
            "ratio_std": float(ratio.std(correction=0)),
            "approx_kl": float(0.5 * (diff**2).mean()),
        }
    return loss, stats
