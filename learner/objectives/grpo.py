"""GRPO on recorded steps (docs/math.md "GRPO", "GRPO-Guard"): the micro-batch of recorded steps, the recompute of
one step's log-prob with the sampling forward, the loss of one (micro-batch, step) call, and the objective itself.

The loss is `policy_loss + kl_beta·KL`: the clipped GRPO loss of the recomputed log-probs against the recorded ones,
and the KL of the step's Gaussian to the reference policy's (the adapter switched off, or a frozen copy for full
fine-tuning). `learner.log_prob_reduction` arrives here once as a number, the log-prob scale: 1 keeps the per-element
means of the papers, D (the latent elements of one sample) turns log-probs and KL alike into sums over the latent.
No Ray, no DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from cluster.config import GUARD_KINDS, TRAINABLE_KINDS, JobConfig
from learner.objectives.base import Objective, StepLoss, Trainee, UpdateStats
from learner.objectives.batch import SampleRef, samples_embeds
from learner.objectives.grpo_math import guard_log_ratio, policy_loss
from rollout.models.contract import FlowModel, PromptEmbeds
from rollout.sampling.forward import score_step
from rollout.sampling.steps import StepOutput, kl
from rollout.sampling.trajectory import SamplerSettings, Trajectories


@dataclass(frozen=True)
class MicroBatch:
    """The recorded data of a few samples as one learner forward takes them (all on the model's device).

    states / next_states (B, K, *latent) float32, old_log_probs (B, K), advantages (B,), step_indices (B, K),
    old_means (B, K, *latent) when the rollout recorded them (GRPO-Guard); `embeds` has one row when every sample
    shares one prompt (as the rollout passes it), else B rows.
    """

    samples: tuple[SampleRef, ...]
    states: torch.Tensor
    next_states: torch.Tensor
    old_log_probs: torch.Tensor
    advantages: torch.Tensor
    step_indices: torch.Tensor
    embeds: PromptEmbeds
    sigmas: torch.Tensor
    settings: SamplerSettings
    old_means: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        """K, the recorded steps per sample."""
        return self.old_log_probs.shape[1]


def micro_batch(
    groups: Sequence[Trajectories],
    samples: Sequence[SampleRef],
    advantages: torch.Tensor,
    device: torch.device | str = "cpu",
) -> MicroBatch:
    """Gather the samples' recorded tensors (and their advantages, aligned with `samples`) into one MicroBatch."""
    embeds = samples_embeds(groups, samples)
    positions = sorted({g for g, _ in samples})

    def stack(name: str) -> torch.Tensor:
        return torch.stack([getattr(groups[g], name)[i] for g, i in samples]).to(device)

    return MicroBatch(
        samples=tuple(samples),
        states=stack("states"),
        next_states=stack("next_states"),
        old_log_probs=stack("log_probs"),
        advantages=advantages.to(device=device, dtype=torch.float32),
        step_indices=torch.stack([groups[g].step_indices for g, _ in samples]),
        embeds=embeds.to(device),
        sigmas=groups[positions[0]].sigmas,
        settings=groups[positions[0]].settings,
        old_means=stack("means") if groups[positions[0]].means is not None else None,
    )


def score_recorded_step(model: FlowModel, mb: MicroBatch, k: int, negative: PromptEmbeds | None) -> StepOutput:
    """Log-prob (B,) and mean of the recorded next states of step slot k under `model`, differentiable.

    Samples whose groups recorded different sigma indices at slot k (Fast windows) are scored in one forward per
    index and put back in micro-batch order.
    """
    indices = mb.step_indices[:, k]
    states, next_states = mb.states[:, k].contiguous(), mb.next_states[:, k].contiguous()
    values = list(dict.fromkeys(indices.tolist()))
    if len(values) == 1:
        return score_step(model, mb.settings, mb.sigmas, values[0], states, next_states, mb.embeds, negative)
    parts, rows_in_order = [], []
    for index in values:
        rows = torch.nonzero(indices == index).reshape(-1)
        embeds = mb.embeds if len(mb.embeds) == 1 else mb.embeds.index_select(rows.to(mb.embeds.prompt_embeds.device))
        rows_dev = rows.to(states.device)
        parts.append(score_step(model, mb.settings, mb.sigmas, index, states[rows_dev], next_states[rows_dev],
                                embeds, negative))
        rows_in_order.append(rows_dev)
    inverse = torch.argsort(torch.cat(rows_in_order))
    return StepOutput(*(torch.cat([getattr(p, f) for p in parts])[inverse]
                        for f in ("prev_sample", "log_prob", "mean", "std", "noise_scale")))


def log_prob_scale(reduction: str, latent_elements: int) -> float:
    """What `learner.log_prob_reduction` means as a factor on the per-element mean log-prob: D for "sum", 1 for
    "mean"."""
    return float(latent_elements) if reduction == "sum" else 1.0


def step_loss(
    scored: StepOutput,
    mb: MicroBatch,
    k: int,
    *,
    clip_range: float,
    kl_beta: float,
    reference_mean: torch.Tensor | None = None,
    log_prob_scale: float = 1.0,
    ratio_norm: bool = False,
) -> StepLoss:
    """policy_loss(ℓθ, ℓold, A) + β_KL·mean KL(μθ ‖ μref) of step slot k; KL is 0 when kl_beta = 0.

    `log_prob_scale` multiplies both log-probs and the per-sample KL alike: the KL term is always that of the
    distribution whose log-prob ratio is trained, and the ratio statistics are those of the trained ratio.
    `ratio_norm` (GRPO-Guard): the ratio is exp of grpo_math.guard_log_ratio, from the recorded rollout means, and each
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
    if kl_beta > 0:
        if reference_mean is None:
            raise ValueError("kl_beta > 0 needs the reference mean of the step")
        kl_value = kl(scored.mean, reference_mean, scored.noise_scale, form=mb.settings.log_prob_form).mean()
        kl_value = kl_value * log_prob_scale
    else:
        kl_value = torch.zeros((), dtype=policy.dtype, device=policy.device)
    return StepLoss(policy + kl_beta * kl_value, policy, kl_value, ratio)


class Grpo(Objective):
    """Flow-GRPO: each recorded step's log-prob recomputed, the clipped ratio to the recorded one, + kl_beta·KL."""

    name = "grpo"

    @staticmethod
    def problems(cfg: JobConfig) -> list[str]:
        s, lr = cfg.sampler, cfg.learner
        p = []
        if s.kind == "ode":
            p.append(f"sampler.kind = 'ode': the ODE step has no log-prob to train with GRPO; allowed for training: "
                     f"{', '.join(TRAINABLE_KINDS)} (or an objective on final samples: learner.objective nft or awm)")
        if lr.ref_beta > 0:
            p.append(f"learner.ref_beta = {lr.ref_beta}: the velocity distance to the reference belongs to nft and "
                     f"awm; GRPO's reference term is the KL of each step, learner.kl_beta")
        if lr.ratio_norm:
            if s.kind not in GUARD_KINDS:
                p.append(f"learner.ratio_norm = true: GRPO-Guard normalises the Gaussian log-ratio of "
                         f"{' and '.join(GUARD_KINDS)} steps; sampler.kind = {s.kind!r} is not one of them")
            if s.log_prob_form not in (None, "gaussian"):
                p.append(f"learner.ratio_norm = true: needs the Gaussian log-prob, sampler.log_prob_form = "
                         f"{s.log_prob_form!r}")
            if lr.log_prob_reduction != "mean":
                p.append(f"learner.ratio_norm = true: the normalised ratio is defined on per-element mean log-probs; "
                         f"learner.log_prob_reduction = {lr.log_prob_reduction!r} must be 'mean'")
        return p

    def rollout_settings(self) -> SamplerSettings:
        """Every trained step recorded (with its mean under GRPO-Guard)."""
        return replace(SamplerSettings.from_config(self.cfg), record_steps=True,
                       record_means=self.cfg.learner.ratio_norm)

    @property
    def calls_per_micro_batch(self) -> int:
        """One call per recorded step."""
        return self.cfg.trained_steps

    def micro_batch(self, groups: Sequence[Trajectories], samples: Sequence[SampleRef], advantages: torch.Tensor,
                    device: torch.device | str) -> MicroBatch:
        return micro_batch(groups, samples, advantages, device)

    def train(self, trainee: Trainee, batch: MicroBatch, stats: UpdateStats) -> None:
        lc = self.cfg.learner
        # "sum" sums log-probs and KL over the D elements of a recorded latent: here it becomes that factor
        scale = log_prob_scale(lc.log_prob_reduction, batch.states[0, 0].numel())
        for k in range(batch.num_steps):
            reference_mean = None
            if lc.kl_beta > 0:
                with torch.no_grad(), trainee.reference() as reference:
                    reference_mean = score_recorded_step(reference, batch, k, trainee.negative).mean
            scored = score_recorded_step(trainee.model, batch, k, trainee.negative)
            call = step_loss(scored, batch, k, clip_range=lc.clip_range, kl_beta=lc.kl_beta,
                             reference_mean=reference_mean, log_prob_scale=scale, ratio_norm=lc.ratio_norm)
            trainee.backward(call.loss)
            stats.add(call)
