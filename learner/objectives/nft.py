"""DiffusionNFT (docs/math.md "DiffusionNFT"): the implicit positive and negative policies around the old adapter,
which the rollouts sample with and which trails θ by soft updates."""

from __future__ import annotations

import torch

from learner.objectives.final_sample_math import nft_loss, nft_timestep_indices, old_adapter_decay, \
    optimality_probability
from learner.objectives.final_samples import FinalBatch, FinalSampleObjective


class Nft(FinalSampleObjective):
    """DiffusionNFT on final samples; the trailing adapter is the old (sampling) policy, and it is what is published."""

    name = "nft"
    trailing_adapter = "old"
    publishes_trailing = True

    def level_indices(self, num_steps: int, levels: int, generator: torch.Generator) -> torch.Tensor:
        """The first `levels` of a random permutation of the schedule's indices."""
        return nft_timestep_indices(num_steps, 1, generator)[0, :levels]

    def loss_term(self, batch: FinalBatch, t: torch.Tensor, x_t: torch.Tensor, v: torch.Tensor,
                  v_theta: torch.Tensor, v_trailing: torch.Tensor) -> torch.Tensor:
        lc = self.cfg.learner
        r = optimality_probability(batch.advantages, lc.advantage_clip)
        return nft_loss(batch.x0, x_t, t, v_theta, v_trailing, r, beta=lc.nft_beta, clip=lc.advantage_clip,
                        adaptive=lc.nft_weighting == "adaptive")

    def trailing_decay(self, step: int) -> float:
        return old_adapter_decay(step, self.cfg.learner.old_adapter_schedule)
