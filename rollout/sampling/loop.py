"""The rollout sampling loop as plain code (no Ray): whole groups with recorded log-probs, and evaluation images.

Noise never comes from a process's own RNG: sample i of a group draws its initial noise and then, step by step, its
fresh noise from a generator on the model's device seeded with `seeds[i]`, one sample at a time, so neither the worker
nor the batch layout changes a trajectory's noise. With antithetic noise, sample 2m+1 takes sample 2m's step noise
negated. The Fast window's position comes from (run seed, group_id).

Branching: when the group shares its initial noise and a Fast window is set, the ODE steps before the window are the
same for every sample; they are computed once per group and the latent is repeated at the window (docs/math.md
"Branching at the window, and antithetic window noise").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rollout.models.contract import Conditioning, FlowModel, PromptEmbeds
from rollout.prompts.groups import PromptGroup
from rollout.sampling.forward import guided_velocity
from rollout.sampling.steps import step
from rollout.sampling.trajectory import FinalSamples, SamplerSettings, Trajectories
from rollout.seeds import seeded_generator


def fast_window_start(run_seed: int, group_id: int, num_steps: int, size: int) -> int:
    """First step of the Fast window: uniform in [0, num_steps // 2 − size], drawn from (run seed, group_id)."""
    last = num_steps // 2 - size
    if last < 0:
        raise ValueError(f"a Fast window of {size} steps does not fit in the first half of {num_steps} steps")
    generator = seeded_generator("fast_window", run_seed, group_id)
    return int(torch.randint(0, last + 1, (1,), generator=generator))


def recorded_steps(settings: SamplerSettings, run_seed: int, group_id: int) -> list[int]:
    """Sigma indices of the steps that are stochastic and recorded: the Fast window, or the first `trained_steps`."""
    if settings.fast_window_size:
        start = fast_window_start(run_seed, group_id, settings.num_steps, settings.fast_window_size)
        return list(range(start, start + settings.fast_window_size))
    return list(range(settings.trained_steps))


def noise_streams(seeds: Sequence[int], latent: Sequence[int], antithetic: bool,
                  device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], list[torch.Generator], list[float]]:
    """Per sample of a group: its initial noise (the first draw of its seed's generator), the generator its step noise
    comes from and the sign that noise takes. Sample i's own generator, sign +1; with `antithetic`, sample 2m+1 draws
    from a generator seeded as sample 2m's, past the initial noise, with sign -1: the two step-noise streams are exact
    negatives. The generators live on `device` and the noise is drawn there (a device's stream differs from the CPU's
    but, like it, depends only on the seed)."""
    def generator(seed: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    generators = [generator(seed) for seed in seeds]
    initial = [torch.randn(tuple(latent), generator=g, device=device) for g in generators]
    signs = [1.0] * len(seeds)
    if antithetic:
        for i in range(1, len(seeds), 2):
            partner = generator(seeds[i - 1])
            torch.randn(tuple(latent), generator=partner, device=device)  # past the partner's initial noise
            generators[i], signs[i] = partner, -1.0
    return initial, generators, signs


class RolloutSampler:
    """Samples whole prompt groups with one loaded model and records the trained steps.

    Nothing crosses between host and device inside the step loop: the noise is drawn on the device, the noise levels
    the transformer takes are moved there once per sampler, each batch size's conditioning (guidance rows included) is
    built once per group, and the recorded steps and images stay on the device until the group is done.
    """

    def __init__(self, model: FlowModel, settings: SamplerSettings, run_seed: int) -> None:
        self.model = model
        self.settings = settings
        self.run_seed = run_seed
        self.sigmas = model.sigmas(settings.num_steps, settings.height, settings.width)
        self.levels = self.sigmas.to(model.device)  # the noise levels the transformer takes, on its device
        self.negative = model.negative_embeds() if model.true_cfg else None

    def _velocity(self, x: torch.Tensor, index: int, conditioning: dict[int, Conditioning],
                  embeds: PromptEmbeds) -> torch.Tensor:
        """The guided velocity at step `index`, with the batch size's conditioning built on first use."""
        if len(x) not in conditioning:
            conditioning[len(x)] = self.model.conditioning(embeds, self.negative, len(x),
                                                           self.settings.guidance_scale)
        return guided_velocity(self.model, x, self.levels[index], conditioning[len(x)], self.negative, self.settings)

    @torch.no_grad()
    def sample_group(self, group: PromptGroup, policy_version: int = 0) -> Trajectories | FinalSamples:
        """G trajectories of one prompt (encoded once), sampled in chunks of `samples_per_forward`; only their final
        samples when the settings record no steps (nft, awm)."""
        s, model = self.settings, self.model
        device = model.device
        size = len(group.seeds)
        recorded = recorded_steps(s, self.run_seed, group.group_id) if s.record_steps else []
        position = {index: k for k, index in enumerate(recorded)}
        kinds = [s.kind if (index in position or not s.fast_window_size) else "ode" for index in range(s.num_steps)]
        embeds = model.encode_prompts([group.prompt])
        conditioning: dict[int, Conditioning] = {}

        latent = model.latent_shape(1, s.height, s.width)[1:]
        initial, generators, signs = noise_streams(group.seeds, latent, s.antithetic, device)
        if s.same_initial_noise:
            initial = [initial[0]] * size
        first = recorded[0] if s.fast_window_size and s.same_initial_noise else 0  # the first step not shared
        shared = initial[0][None]
        for index in range(first):  # the group's common ODE prefix, once
            v = self._velocity(shared, index, conditioning, embeds)
            shared = step("ode", shared, v, self.sigmas, index, noise_level=0.0,
                          log_prob_form=s.log_prob_form).prev_sample

        states = torch.empty(size, len(recorded), *latent, device=device)
        next_states = torch.empty_like(states)
        log_probs = torch.empty(size, len(recorded), device=device)
        means = torch.empty_like(states) if s.record_means else None
        images, finals = [], []
        for chunk in s.chunks(size):
            rows = slice(chunk.start, chunk.stop)
            x = shared.expand(len(chunk), *latent).clone() if first else torch.stack([initial[i] for i in chunk])
            for index in range(first, s.num_steps):
                kind = kinds[index]
                v = self._velocity(x, index, conditioning, embeds)
                noise = None
                if kind != "ode":
                    noise = torch.stack([signs[i] * torch.randn(latent, generator=generators[i], device=device)
                                         for i in chunk])
                out = step(kind, x, v, self.sigmas, index, noise_level=s.noise_level, noise=noise,
                           log_prob_form=s.log_prob_form)
                if index in position:
                    states[rows, position[index]] = x
                    next_states[rows, position[index]] = out.prev_sample
                    log_probs[rows, position[index]] = out.log_prob
                    if means is not None:
                        means[rows, position[index]] = out.mean
                x = out.prev_sample
            images.append(model.decode(x, s.height, s.width))
            finals.append(x.float())

        # the group leaves the device here, once
        images = torch.cat(images).cpu()
        record = dict(group_id=group.group_id, prompt=group.prompt, metadata=group.metadata, seeds=tuple(group.seeds),
                      policy_version=policy_version, prompt_embeds=embeds.to("cpu"), sigmas=self.sigmas.clone(),
                      images=images, settings=s)
        if not s.record_steps:
            return FinalSamples(latents=torch.cat(finals).cpu(), **record)
        return Trajectories(
            states=states.cpu(),
            next_states=next_states.cpu(),
            log_probs=log_probs.cpu(),
            step_indices=torch.tensor(recorded, dtype=torch.long),
            means=None if means is None else means.cpu(),
            **record,
        )

    @torch.no_grad()
    def sample_eval(self, prompts: Sequence[str], seeds: Sequence[int], *, num_steps: int,
                    batch_size: int) -> torch.Tensor:
        """Evaluation images: the ODE with `num_steps` steps, one fixed seed per prompt; uint8 (B, H, W, 3)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} evaluation prompts but {len(seeds)} seeds")
        s, model = self.settings, self.model
        sigmas = model.sigmas(num_steps, s.height, s.width)
        levels = sigmas.to(model.device)
        latent = model.latent_shape(1, s.height, s.width)[1:]
        images = []
        for start in range(0, len(prompts), batch_size):
            batch = range(start, min(start + batch_size, len(prompts)))
            embeds = model.encode_prompts([prompts[i] for i in batch])
            x = torch.stack([torch.randn(latent, generator=torch.Generator().manual_seed(seeds[i])) for i in batch])
            x = x.to(model.device)
            conditioning = model.conditioning(embeds, self.negative, len(x), s.guidance_scale)
            for index in range(num_steps):
                v = guided_velocity(model, x, levels[index], conditioning, self.negative, s)
                x = step("ode", x, v, sigmas, index, noise_level=0.0, log_prob_form=s.log_prob_form).prev_sample
            images.append(model.decode(x, s.height, s.width).cpu())
        if not images:
            return torch.empty(0, s.height, s.width, 3, dtype=torch.uint8)
        return torch.cat(images)
