"""The loss of one (micro-batch, trained step) and the statistics of an update (MATH.md, "GRPO"; no Ray, no DeepSpeed).

The loss is `policy_loss + β·KL`: the clipped GRPO loss of the recomputed log-probs against the recorded ones, and the
KL of the step's Gaussian to the reference policy's (the adapter switched off, or a frozen copy for full fine-tuning).
`learner.log_prob_reduction` arrives here once as a number, the log-prob scale: 1 keeps the per-element means of the
papers, D (the latent elements of one sample) turns log-probs and KL alike into sums over the latent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch

from learner.objectives.batch import MicroBatch
from learner.objectives.grpo_math import RatioStats, guard_log_ratio, policy_loss
from rollout.sampling.steps import StepOutput, kl


def log_prob_scale(reduction: str, latent_elements: int) -> float:
    """What `learner.log_prob_reduction` means as a factor on the per-element mean log-prob: D for "sum", 1 for
    "mean"."""
    return float(latent_elements) if reduction == "sum" else 1.0


@contextmanager
def adapter_disabled(transformer: torch.nn.Module) -> Iterator[None]:
    """The base model: the peft adapter switched off inside the block (the KL reference), on again after it."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


class StepLoss(NamedTuple):
    """The loss of one (micro-batch, step) call, its two terms, and the ratio statistics of its samples."""

    loss: torch.Tensor
    policy: torch.Tensor
    kl: torch.Tensor
    ratio: RatioStats


def step_loss(
    scored: StepOutput,
    mb: MicroBatch,
    k: int,
    *,
    clip_range: float,
    beta: float,
    reference_mean: torch.Tensor | None = None,
    log_prob_scale: float = 1.0,
    ratio_norm: bool = False,
) -> StepLoss:
    """policy_loss(ℓθ, ℓold, A) + β·mean KL(μθ ‖ μref) of step slot k; KL is 0 when β = 0.

    `log_prob_scale` multiplies both log-probs and the per-sample KL alike: the KL term is always that of the
    distribution whose log-prob ratio is trained, and the ratio statistics are those of the trained ratio.
    `ratio_norm` (GRPO-Guard): the ratio is exp of grpo.guard_log_ratio, from the recorded rollout means, and each
    sample's loss is weighted by 1/Δ of its step.
    """
    if ratio_norm:
        if mb.old_means is None:
            raise ValueError("ratio_norm needs the rollout means of the recorded steps (SamplerSettings.record_means)")
        log_ratio = guard_log_ratio(scored.log_prob, mb.old_log_probs[:, k], scored.mean, mb.old_means[:, k],
                                    scored.std)
        index = mb.step_indices[:, k].to(mb.sigmas.device)
        sigmas = mb.sigmas.double()  # Δ as step() computes it
        delta = (sigmas[index] - sigmas[index + 1]).to(device=log_ratio.device, dtype=log_ratio.dtype)
        policy, ratio = policy_loss(log_ratio, torch.zeros_like(log_ratio), mb.advantages, clip_range=clip_range,
                                    weights=1.0 / delta)
    else:
        policy, ratio = policy_loss(scored.log_prob * log_prob_scale, mb.old_log_probs[:, k] * log_prob_scale,
                                    mb.advantages, clip_range=clip_range)
    if beta > 0:
        if reference_mean is None:
            raise ValueError("beta > 0 needs the reference mean of the step")
        kl_value = kl(scored.mean, reference_mean, scored.noise_scale, form=mb.settings.log_prob_form).mean()
        kl_value = kl_value * log_prob_scale
    else:
        kl_value = torch.zeros((), dtype=policy.dtype, device=policy.device)
    return StepLoss(policy + beta * kl_value, policy, kl_value, ratio)


class UpdateStats:
    """Sums over the (micro-batch, step) calls of one update, reducible over ranks: the losses per call, the ratio
    statistics over all (sample, step)."""

    LOSSES = ("calls", "loss", "policy_loss", "kl")

    def __init__(self) -> None:
        self.losses = torch.zeros(len(self.LOSSES), dtype=torch.float64)
        self.ratio_sums = torch.zeros(len(RatioStats.SUMS), dtype=torch.float64)
        self.max_ratio_dev = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def add(self, call: StepLoss) -> None:
        """Record one (micro-batch, step) call."""
        self.losses += torch.tensor([1.0, float(call.loss), float(call.policy), float(call.kl)], dtype=torch.float64)
        self.ratio_sums += call.ratio.sums
        self.max_ratio_dev = torch.maximum(self.max_ratio_dev, call.ratio.max_dev)

    def reduce(self, all_reduce: Callable[[torch.Tensor, str], None] | None) -> None:
        """Combine with the other ranks in place: `all_reduce(tensor, "sum" | "max")`; None for one process."""
        if all_reduce is not None:
            all_reduce(self.losses, "sum")
            all_reduce(self.ratio_sums, "sum")
            all_reduce(self.max_ratio_dev, "max")

    def summary(self) -> dict[str, float]:
        """Means per call (loss, policy_loss, kl) and per (sample, step) (clip fraction, ratio, approx-KL; only when
        some call had a ratio)."""
        s = dict(zip(self.LOSSES, self.losses.tolist()))
        calls = max(s["calls"], 1.0)
        ratio = RatioStats(self.ratio_sums, self.max_ratio_dev)
        return {
            "loss": s["loss"] / calls,
            "policy_loss": s["policy_loss"] / calls,
            "kl": s["kl"] / calls,
            **(ratio.means() if self.ratio_sums[0] > 0 else {}),  # none without a ratio (nft, awm)
        }
