"""The learner's side of the forward-process objectives (nft, awm): a micro-batch of final samples, its noised inputs
at the trained noise levels, and the loss of one (micro-batch, level) call. No Ray, no DeepSpeed.

Each sample's noise levels and fresh noise come from a generator seeded by (run seed, policy version, group id,
sample index): the same on every rank and in a resumed run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cluster.config import LearnerConfig
from learner.objectives.batch import SampleRef, samples_embeds
from learner.objectives.final_sample_math import (
    awm_loss,
    awm_timestep_indices,
    forward_process,
    nft_loss,
    nft_timestep_indices,
    optimality_probability,
)
from learner.objectives.grpo_math import RatioStats
from learner.objectives.grpo_loss import StepLoss
from rollout.models.contract import PromptEmbeds
from rollout.sampling.trajectory import FinalSamples, SamplerSettings


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


def _generator(seed: int, version: int, group_id: int, index: int) -> torch.Generator:
    digest = hashlib.blake2b(f"forward:{seed}:{version}:{group_id}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "big") >> 1)


def noised_inputs(batch: FinalBatch, objective: str, levels: int, seed: int, version: int
                  ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per trained level j: (t (B,), x_t, v). nft: per sample a random permutation of the schedule's levels, its first
    `levels`; awm: one level from each of `levels` strata of the levels below t = 1. Fresh noise per (sample, level)."""
    n = batch.settings.num_steps
    latent = tuple(batch.x0.shape[1:])
    indices, noises = [], []
    for group_id, index in batch.keys:
        g = _generator(seed, version, group_id, index)
        if objective == "nft":
            indices.append(nft_timestep_indices(n, 1, g)[0, :levels])
        else:
            indices.append(awm_timestep_indices(n, 1, levels, g)[0])
        noises.append(torch.randn((levels, *latent), generator=g))
    idx, noise = torch.stack(indices), torch.stack(noises).to(batch.x0.device)
    out = []
    for j in range(levels):
        t = batch.sigmas[idx[:, j]].to(device=batch.x0.device, dtype=torch.float32)
        x_t, v = forward_process(batch.x0, noise[:, j], t)
        out.append((t, x_t, v))
    return out


def forward_step_loss(lc: LearnerConfig, batch: FinalBatch, t: torch.Tensor, x_t: torch.Tensor, v: torch.Tensor,
                      v_theta: torch.Tensor, v_second: torch.Tensor, v_ref: torch.Tensor | None) -> StepLoss:
    """The loss of one (micro-batch, level) call: the objective's term, + β·mean (v_θ − v_ref)² when β > 0 (and, for
    awm, the pull towards the prox adapter `v_second`). nft's `v_second` is the old (sampling) adapter's velocity."""
    if lc.objective == "nft":
        r = optimality_probability(batch.advantages, lc.advantage_clip)
        policy = nft_loss(batch.x0, x_t, t, v_theta, v_second, r, beta=lc.nft_beta, clip=lc.advantage_clip,
                          adaptive=lc.nft_weighting == "adaptive")
    elif lc.objective == "awm":
        policy = awm_loss(v_theta, v, t, batch.advantages, clip=lc.advantage_clip, v_prox=v_second)
    else:
        raise ValueError(f"{lc.objective!r} is not a forward-process objective; expected nft or awm")
    if lc.beta > 0:
        if v_ref is None:
            raise ValueError("learner.beta > 0 needs the velocity with the adapter disabled")
        kl = ((v_theta - v_ref.detach()) ** 2).mean()
    else:
        kl = torch.zeros((), dtype=policy.dtype, device=policy.device)
    none = RatioStats(torch.zeros(len(RatioStats.SUMS), dtype=torch.float64), torch.zeros((), dtype=torch.float64))
    return StepLoss(policy + lc.beta * kl, policy, kl, none)
