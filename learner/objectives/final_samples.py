"""What nft and awm share (docs/math.md "Forward-process objectives"): a micro-batch of the rollouts' final samples,
their noised inputs at the trained noise levels, and the calls that train on them with a trailing adapter. No Ray, no
DeepSpeed.

Each sample's noise levels and fresh noise come from a generator seeded by (run seed, policy version, group id,
sample index): the same on every rank and in a resumed run. Per micro-batch, one call per trained level: the trailing
adapter's velocities first (no gradient), then θ's loss (+ `learner.ref_beta`·mean (v_θ − v_ref)²) and its backward.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from cluster.config import JobConfig
from learner.objectives.base import Objective, StepLoss, Trainee, UpdateStats, no_ratio
from learner.objectives.batch import SampleRef, samples_embeds
from learner.objectives.final_sample_math import forward_process, reference_distance
from rollout.models.contract import PromptEmbeds
from rollout.sampling.forward import guided_velocity
from rollout.sampling.trajectory import FinalSamples, SamplerSettings
from rollout.seeds import seeded_generator


@dataclass(frozen=True)
class FinalBatch:
    """The final samples of a few rollouts as one learner forward takes them: x0 (B, *latent), advantages (B,)."""

    samples: tuple[SampleRef, ...]
    keys: tuple[tuple[int, int], ...]  # (group id, sample index) per sample: what its noise is drawn from
    x0: torch.Tensor
    advantages: torch.Tensor
    embeds: PromptEmbeds
    sigmas: torch.Tensor
    settings: SamplerSettings


def final_micro_batch(groups: Sequence[FinalSamples], samples: Sequence[SampleRef], advantages: torch.Tensor,
                      device: torch.device | str = "cpu") -> FinalBatch:
    """Gather the samples' final latents (and their advantages, aligned with `samples`) into one FinalBatch."""
    embeds = samples_embeds(groups, samples)
    first = groups[samples[0][0]]
    return FinalBatch(
        samples=tuple(samples),
        keys=tuple((groups[g].group_id, i) for g, i in samples),
        x0=torch.stack([groups[g].latents[i] for g, i in samples]).to(device),
        advantages=advantages.to(device=device, dtype=torch.float32),
        embeds=embeds.to(device),
        sigmas=first.sigmas,
        settings=first.settings,
    )


class FinalSampleObjective(Objective):
    """An objective on the rollouts' final samples with a trailing adapter; subclasses give the levels, the loss term
    and the trailing adapter's schedule."""

    @staticmethod
    def problems(cfg: JobConfig) -> list[str]:
        s, lr = cfg.sampler, cfg.learner
        why = f"learner.objective = {lr.objective!r} trains on final samples"
        p = []
        if s.fast_window is not None:
            p.append(f"sampler.fast_window: {why}; a window of trained steps means nothing there: remove it")
        if lr.ratio_norm:
            p.append(f"learner.ratio_norm = true: GRPO-Guard is a GRPO option; {why}")
        if lr.kl_beta > 0:
            p.append(f"learner.kl_beta = {lr.kl_beta}: the KL of each recorded step is GRPO's; {why}, and its "
                     f"reference term is learner.ref_beta (the velocity distance to the adapter switched off)")
        if lr.finetune != "lora":
            p.append(f"learner.finetune = {lr.finetune!r}: {lr.objective} keeps a trailing LoRA adapter; use "
                     f"finetune 'lora'")
        if lr.zero_stage != 2:
            p.append(f"learner.zero_stage = {lr.zero_stage}: {lr.objective} swaps its trailing adapter into the "
                     f"parameters, which needs them whole on every rank; use zero_stage 2")
        return p

    def rollout_settings(self) -> SamplerSettings:
        """Final samples only: no step is recorded."""
        return replace(SamplerSettings.from_config(self.cfg), record_steps=False, record_means=False)

    @property
    def calls_per_micro_batch(self) -> int:
        """The noise levels each final sample is trained at: ⌊0.99·N⌋ of the schedule's N (at least one)."""
        return max(1, int(0.99 * self.cfg.sampler.num_steps))

    def micro_batch(self, groups: Sequence[FinalSamples], samples: Sequence[SampleRef], advantages: torch.Tensor,
                    device: torch.device | str) -> FinalBatch:
        return final_micro_batch(groups, samples, advantages, device)

    @abstractmethod
    def level_indices(self, num_steps: int, levels: int, generator: torch.Generator) -> torch.Tensor:
        """(levels,) schedule indices one sample is trained at, drawn from its generator."""

    @abstractmethod
    def loss_term(self, batch: FinalBatch, t: torch.Tensor, x_t: torch.Tensor, v: torch.Tensor,
                  v_theta: torch.Tensor, v_trailing: torch.Tensor) -> torch.Tensor:
        """The objective's own loss of one (micro-batch, level) call."""

    def noised_inputs(self, batch: FinalBatch, version: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per trained level j: (t (B,), x_t, v), with each sample's levels and fresh noise from its own generator."""
        levels = self.calls_per_micro_batch
        latent = tuple(batch.x0.shape[1:])
        indices, noises = [], []
        for group_id, index in batch.keys:
            g = seeded_generator("forward", self.cfg.seed, version, group_id, index)
            indices.append(self.level_indices(batch.settings.num_steps, levels, g))
            noises.append(torch.randn((levels, *latent), generator=g))
        idx, noise = torch.stack(indices), torch.stack(noises).to(batch.x0.device)
        out = []
        for j in range(levels):
            t = batch.sigmas[idx[:, j]].to(device=batch.x0.device, dtype=torch.float32)
            x_t, v = forward_process(batch.x0, noise[:, j], t)
            out.append((t, x_t, v))
        return out

    def step_loss(self, batch: FinalBatch, t: torch.Tensor, x_t: torch.Tensor, v: torch.Tensor,
                  v_theta: torch.Tensor, v_trailing: torch.Tensor, v_ref: torch.Tensor | None) -> StepLoss:
        """The loss of one (micro-batch, level) call: the objective's term + ref_beta·mean (v_θ − v_ref)²."""
        policy = self.loss_term(batch, t, x_t, v, v_theta, v_trailing)
        beta = self.cfg.learner.ref_beta
        if beta > 0:
            if v_ref is None:
                raise ValueError("learner.ref_beta > 0 needs the velocity with the adapter disabled")
            penalty = reference_distance(v_theta, v_ref)
        else:
            penalty = torch.zeros((), dtype=policy.dtype, device=policy.device)
        return StepLoss(policy + beta * penalty, policy, penalty, no_ratio())

    def train(self, trainee: Trainee, batch: FinalBatch, stats: UpdateStats) -> None:
        inputs = self.noised_inputs(batch, trainee.policy_version)

        def velocity(model, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided_velocity(model, x_t, t, batch.embeds, trainee.negative, batch.settings)

        with torch.no_grad(), trainee.trailing():
            v_trailing = [velocity(trainee.model, x_t, t) for t, x_t, _ in inputs]
        for (t, x_t, v), v_trail in zip(inputs, v_trailing):
            v_ref = None
            if self.cfg.learner.ref_beta > 0:
                with torch.no_grad(), trainee.reference() as reference:
                    v_ref = velocity(reference, x_t, t)
            call = self.step_loss(batch, t, x_t, v, velocity(trainee.model, x_t, t), v_trail, v_ref)
            trainee.backward(call.loss)
            stats.add(call)
