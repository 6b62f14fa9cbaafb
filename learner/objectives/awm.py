"""AWM, advantage-weighted matching (docs/math.md "AWM"): the flow-matching likelihood surrogate weighted by the
advantage, pulled towards a prox adapter that trails θ by soft updates."""

from __future__ import annotations

import torch

from learner.objectives.final_sample_math import awm_loss, awm_timestep_indices, prox_adapter_decay
from learner.objectives.final_samples import FinalBatch, FinalSampleObjective


class Awm(FinalSampleObjective):
    """AWM on final samples; the trailing adapter is the prox adapter, and θ is published."""

    name = "awm"
    trailing_adapter = "prox"

    def level_indices(self, num_steps: int, levels: int, generator: torch.Generator) -> torch.Tensor:
        """One index from each of `levels` strata of the indices below t = 1."""
        return awm_timestep_indices(num_steps, 1, levels, generator)[0]

    def loss_term(self, batch: FinalBatch, t: torch.Tensor, x_t: torch.Tensor, v: torch.Tensor,
                  v_theta: torch.Tensor, v_trailing: torch.Tensor) -> torch.Tensor:
        return awm_loss(v_theta, v, t, batch.advantages, clip=self.cfg.learner.advantage_clip, v_prox=v_trailing)

    def trailing_decay(self, step: int) -> float:
        return prox_adapter_decay(step)
