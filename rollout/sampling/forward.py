"""The one forward that sampling and training share: the guided velocity, and the log-prob of a recorded step.

The rollout samples with `guided_velocity`; the learner scores each recorded next state with `score_step`, which runs
the same forward and step rule, so an unchanged model reproduces the recorded log-probs.
"""

from __future__ import annotations

import torch

from rollout.models.contract import Conditioning, FlowModel, PromptEmbeds
from rollout.sampling.steps import StepOutput, step
from rollout.sampling.trajectory import SamplerSettings


def guided_velocity(
    model: FlowModel,
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    embeds: PromptEmbeds | Conditioning,
    negative: PromptEmbeds | None,
    settings: SamplerSettings,
) -> torch.Tensor:
    """The model's velocity with the configured guidance (the negative prompt only for true-CFG models); `embeds` may
    be a `Conditioning` the caller built once for many steps."""
    return model.velocity(
        x, sigma, embeds,
        guidance_scale=settings.guidance_scale,
        negative=negative if model.true_cfg else None,
        image_size=settings.image_size,
    )


def score_step(
    model: FlowModel,
    settings: SamplerSettings,
    sigmas: torch.Tensor,
    index: int,
    states: torch.Tensor,
    next_states: torch.Tensor,
    embeds: PromptEmbeds,
    negative: PromptEmbeds | None,
) -> StepOutput:
    """The learner's path: the log-prob (and mean) of recorded next states under the current model, differentiable.

    With the states of one chunk of the recorded batch layout and the group's one-row `embeds`, this is the sampling
    computation itself, so an unchanged model reproduces the recorded log-probs bit for bit.
    """
    v = guided_velocity(model, states, sigmas[index], embeds, negative, settings)
    return step(
        settings.kind, states, v, sigmas, index,
        noise_level=settings.noise_level, prev_sample=next_states, log_prob_form=settings.log_prob_form,
    )
