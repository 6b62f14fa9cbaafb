"""The trajectory record of one prompt group: the only data that rollout hands to the learner.

Plain tensors and Python values only (no model objects), so a record pickles cheaply through the Ray object store.
It carries everything the learner needs to recompute each recorded log-prob with the sampling forward: the states, the
prompt embeddings, the schedule, the step rule and the batch layout. Its `RecordSummary` carries what the driver and
the learner's plan read, without a tensor: a rollout worker returns the summary, the record and the images as three
objects (rollout/sampled.py), and only the summary comes to the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from cluster.config import JobConfig
from rollout.models.contract import PromptEmbeds
from rollout.prompts.groups import PromptGroup
from rollout.sampling.steps import DEFAULT_LOG_PROB_FORM


@dataclass(frozen=True)
class SamplerSettings:
    """How a group was sampled: the step rule and everything a recompute of its log-probs must repeat.

    `samples_per_forward` is the batch layout: a group of G is sampled in consecutive chunks of
    min(samples_per_forward, G) samples, the last chunk possibly smaller; a recompute with the same chunks (same
    samples, order and size) reproduces the recorded log-probs bit for bit.
    """

    kind: str
    noise_level: float
    log_prob_form: str
    guidance_scale: float
    height: int
    width: int
    num_steps: int
    samples_per_forward: int
    trained_steps: int
    fast_window_size: int = 0  # 0: no Fast window
    same_initial_noise: bool = False
    antithetic: bool = False  # the stochastic steps' noise in (z, -z) pairs: samples 2m and 2m+1 of a group
    record_means: bool = False  # keep each recorded step's mean (GRPO-Guard's μ_old)
    record_steps: bool = True  # False: a rollout returns its final samples only (FinalSamples)

    @staticmethod
    def from_config(cfg: JobConfig) -> SamplerSettings:
        """The training rollouts' settings of a job as its sampler section gives them; the one place an unset
        `sampler.log_prob_form` becomes its rule's default. What the rollouts record (steps and means, or final samples
        only) is the objective's choice: learner/objectives/*.py `rollout_settings`."""
        s = cfg.sampler
        return SamplerSettings(
            kind=s.kind,
            noise_level=s.noise_level,
            log_prob_form=s.log_prob_form or DEFAULT_LOG_PROB_FORM[s.kind],
            guidance_scale=s.guidance_scale,
            height=cfg.model.resolution,
            width=cfg.model.resolution,
            num_steps=s.num_steps,
            samples_per_forward=cfg.rollout.samples_per_forward,
            trained_steps=cfg.trained_steps,
            fast_window_size=s.fast_window.size if s.fast_window is not None else 0,
            same_initial_noise=s.same_initial_noise,
            antithetic=s.antithetic,
        )

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels, as `FlowModel.velocity(image_size=...)` takes it."""
        return self.height, self.width

    def chunks(self, group_size: int) -> list[range]:
        """The sample indices of each transformer forward for a group of `group_size` (the batch layout)."""
        size = min(self.samples_per_forward, group_size)
        return [range(start, min(start + size, group_size)) for start in range(0, group_size, size)]


def _check_tensors(record: str, expected: dict[str, tuple[torch.Tensor, torch.dtype, tuple[int, ...]]]) -> None:
    """ValueError naming the first field whose tensor is not of its (dtype, shape)."""
    for name, (tensor, dtype, shape) in expected.items():
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{record}.{name} must be {dtype} of shape {shape}, got {tensor.dtype} "
                             f"{tuple(tensor.shape)}")


@dataclass(frozen=True)
class RecordSummary:
    """One sampled group without its tensors: what the driver needs (ids, prompt, policy version) and what the
    learner's plan checks and splits (group size, recorded steps, settings, schedule), and the record's size."""

    group_id: int
    prompt: str
    metadata: dict = field(hash=False)
    seeds: tuple[int, ...]
    policy_version: int
    settings: SamplerSettings
    group_size: int
    num_recorded_steps: int  # K (0 for final samples)
    sigmas: tuple[float, ...]
    nbytes: int  # the record's tensors, images apart

    def prompt_group(self) -> PromptGroup:
        """The group as it was submitted, to sample it again."""
        return PromptGroup(self.group_id, self.prompt, self.metadata, self.seeds)


@dataclass(frozen=True)
class GroupRecord:
    """What every rollout of one prompt group carries: its id, prompt, metadata, seeds, the policy version that
    sampled it and the prompt's embeddings (one row, CPU)."""

    group_id: int
    prompt: str
    metadata: dict = field(hash=False)
    seeds: tuple[int, ...]
    policy_version: int
    prompt_embeds: PromptEmbeds

    def summary(self) -> RecordSummary:
        """The record without its tensors; `nbytes` counts every tensor but the images."""
        tensors = [getattr(self, f.name) for f in fields(self) if f.name != "images"]
        tensors += [t for t in vars(self.prompt_embeds).values() if isinstance(t, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        return RecordSummary(self.group_id, self.prompt, self.metadata, self.seeds, self.policy_version,
                             self.settings, self.group_size, getattr(self, "num_recorded_steps", 0),
                             tuple(self.sigmas.tolist()), nbytes)

    def without_images(self) -> GroupRecord:
        """The record as the learner receives it: the images travel apart, to the rewards."""
        return replace(self, images=None)


@dataclass(frozen=True)
class Trajectories(GroupRecord):
    """G trajectories of one prompt: K recorded (trained) steps each, and the final images.

    Shapes: states / next_states float32 (G, K, *latent), log_probs float32 (G, K), step_indices long (K,) (the
    sigma index of each recorded step, shared by the whole group: the Fast window is drawn once per group, which is
    this project's "once per sampling batch"), sigmas float32 (N + 1,), images uint8 (G, H, W, 3), and with
    `settings.record_means` means float32 (G, K, *latent), the mean each recorded next state was drawn around.
    `prompt_embeds` holds one row (CPU); the negative "" embeddings needed for true CFG travel once per job, not in
    each record.
    """

    states: torch.Tensor
    next_states: torch.Tensor
    log_probs: torch.Tensor
    step_indices: torch.Tensor
    sigmas: torch.Tensor
    images: torch.Tensor | None
    settings: SamplerSettings
    means: torch.Tensor | None = None  # with settings.record_means: the mean each recorded next state was drawn around

    def __post_init__(self) -> None:
        g, k = self.log_probs.shape if self.log_probs.ndim == 2 else (-1, -1)
        expected = {
            "states": (self.states, torch.float32, (g, k, *self.states.shape[2:])),
            "next_states": (self.next_states, torch.float32, tuple(self.states.shape)),
            "log_probs": (self.log_probs, torch.float32, (g, k)),
            "step_indices": (self.step_indices, torch.long, (k,)),
            "sigmas": (self.sigmas, torch.float32, (self.settings.num_steps + 1,)),
        }
        if self.images is not None:
            expected["images"] = (self.images, torch.uint8, (g, self.settings.height, self.settings.width, 3))
        if self.settings.record_means or self.means is not None:
            if self.means is None:
                raise ValueError("Trajectories.means is required when settings.record_means (GRPO-Guard)")
            expected["means"] = (self.means, torch.float32, tuple(self.states.shape))
        _check_tensors("Trajectories", expected)
        if len(self.seeds) != g:
            raise ValueError(f"Trajectories has {g} samples but {len(self.seeds)} seeds")
        if len(self.prompt_embeds) != 1:
            raise ValueError(
                f"Trajectories.prompt_embeds must hold one row (the group's prompt), got {len(self.prompt_embeds)}"
            )

    @property
    def group_size(self) -> int:
        """G, the samples of this prompt."""
        return self.log_probs.shape[0]

    @property
    def num_recorded_steps(self) -> int:
        """K, the trained steps recorded per trajectory."""
        return self.log_probs.shape[1]


@dataclass(frozen=True)
class FinalSamples(GroupRecord):
    """G final samples of one prompt, for the forward-process objectives (nft, awm): no per-step record, no log-prob.

    latents float32 (G, *latent): the clean samples x0 the rollout ended at; sigmas float32 (N + 1,): the schedule
    whose noise levels the learner trains at; images uint8 (G, H, W, 3) (None once sent apart); `prompt_embeds` one
    row (CPU).
    """

    latents: torch.Tensor
    sigmas: torch.Tensor
    images: torch.Tensor | None
    settings: SamplerSettings

    def __post_init__(self) -> None:
        g = len(self.seeds)
        expected = {
            "latents": (self.latents, torch.float32, (g, *self.latents.shape[1:])),
            "sigmas": (self.sigmas, torch.float32, (self.settings.num_steps + 1,)),
        }
        if self.images is not None:
            expected["images"] = (self.images, torch.uint8, (g, self.settings.height, self.settings.width, 3))
        _check_tensors("FinalSamples", expected)
        if len(self.prompt_embeds) != 1:
            raise ValueError(f"FinalSamples.prompt_embeds must hold one row, got {len(self.prompt_embeds)}")

    @property
    def group_size(self) -> int:
        """G, the samples of this prompt."""
        return self.latents.shape[0]
