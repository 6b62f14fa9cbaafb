"""Branching at the Fast window and antithetic window noise (docs/math.md "Branching at the window, and antithetic
window noise"): a branched rollout equals the same rollout computed one sample at a time from the start, with the prefix
computed once; antithetic pairs draw exact negatives of each other's step noise."""

from __future__ import annotations

import pytest
import torch

from cluster.config_loading import load_config
from rollout.models.loading import load_flow_model
from rollout.prompts.groups import PromptGroup, sample_seed
from rollout.sampling import loop
from rollout.sampling.forward import guided_velocity
from rollout.sampling.loop import RolloutSampler, fast_window_start, noise_streams, recorded_steps
from rollout.sampling.steps import step
from rollout.sampling.trajectory import SamplerSettings

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, STEPS = 64, 8
WINDOW = ["sampler.num_steps=8", "sampler.fast_window={size: 2}", "sampler.same_initial_noise=true"]


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    return {f: load_flow_model(str(tiny_model_dirs[f]), f, max_sequence_length=32) for f in ("flux", "sd3")}


def _sampler(models, tiny_model_dirs, family: str, *overrides: str) -> RolloutSampler:
    cfg = load_config("cluster/tiny.yaml", [
        f"model.family={family}", f"model.path={tiny_model_dirs[family]}", "model.build_tiny=false",
        "data.group_size=4", "rollout.samples_per_forward=3", "sampler.guidance_scale=4.5", *overrides])
    return RolloutSampler(models[family], SamplerSettings.from_config(cfg), cfg.seed)


def _group_with_window_at(start: int, size: int = 4) -> PromptGroup:
    """A group whose Fast window (8 steps, size 2) starts at `start`."""
    group_id = next(g for g in range(100) if fast_window_start(0, g, STEPS, 2) == start)
    return PromptGroup(group_id, "a red circle", {}, tuple(sample_seed(0, group_id, i) for i in range(size)))


def _one_at_a_time(sampler: RolloutSampler, group: PromptGroup) -> dict[str, torch.Tensor]:
    """Every sample from the shared initial noise through all steps on its own (no branching, no chunks)."""
    s, model = sampler.settings, sampler.model
    recorded = recorded_steps(s, sampler.run_seed, group.group_id)
    embeds = model.encode_prompts([group.prompt])
    latent = tuple(model.latent_shape(1, s.height, s.width)[1:])
    start = torch.randn(latent, generator=torch.Generator().manual_seed(group.seeds[0]))
    states, nexts, log_probs, images = [], [], [], []
    for seed in group.seeds:
        generator = torch.Generator().manual_seed(seed)
        torch.randn(latent, generator=generator)  # its own initial noise, replaced by the shared one
        x, visited, reached, logp = start[None], [], [], []
        for index in range(s.num_steps):
            kind = s.kind if index in recorded else "ode"
            v = guided_velocity(model, x, sampler.sigmas[index], embeds, sampler.negative, s)
            noise = torch.randn(latent, generator=generator)[None] if kind != "ode" else None
            out = step(kind, x, v, sampler.sigmas, index, noise_level=s.noise_level, noise=noise,
                       log_prob_form=s.log_prob_form)
            if index in recorded:
                visited.append(x[0])
                reached.append(out.prev_sample[0])
                logp.append(out.log_prob[0])
            x = out.prev_sample
        states.append(torch.stack(visited))
        nexts.append(torch.stack(reached))
        log_probs.append(torch.stack(logp))
        images.append(model.decode(x, s.height, s.width)[0])
    return {"states": torch.stack(states), "next_states": torch.stack(nexts), "log_probs": torch.stack(log_probs),
            "images": torch.stack(images)}


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_branched_rollout_equals_the_rollout_computed_per_sample(models, tiny_model_dirs, family, monkeypatch):
    sampler = _sampler(models, tiny_model_dirs, family, *WINDOW)
    group = _group_with_window_at(2)
    forwards = []  # samples per velocity call

    def counted(model, x, *args, **kwargs):
        forwards.append(x.shape[0])
        return guided_velocity(model, x, *args, **kwargs)

    monkeypatch.setattr(loop, "guided_velocity", counted)
    traj = sampler.sample_group(group)
    monkeypatch.undo()
    assert sum(forwards) == 2 + 4 * (STEPS - 2)  # j + G (N - j) sample-forwards instead of G N
    reference = _one_at_a_time(sampler, group)
    for name in ("states", "next_states", "log_probs"):
        torch.testing.assert_close(getattr(traj, name), reference[name], atol=2e-5, rtol=0, msg=name)
    assert (traj.images.int() - reference["images"].int()).abs().max() <= 1


def test_noise_streams_pair_exact_negatives_and_keep_the_initial_noise():
    seeds, latent = [11, 12, 13, 14], (3, 5)
    plain_initial, plain, plain_signs = noise_streams(seeds, latent, antithetic=False)
    initial, generators, signs = noise_streams(seeds, latent, antithetic=True)
    assert signs == [1.0, -1.0, 1.0, -1.0] and plain_signs == [1.0] * 4
    assert all(torch.equal(a, b) for a, b in zip(initial, plain_initial))  # each sample's own initial noise
    for _ in range(3):  # three stochastic steps
        draws = [sign * torch.randn(latent, generator=g) for g, sign in zip(generators, signs)]
        reference = [torch.randn(latent, generator=g) for g in plain]
        for m in (0, 2):
            assert torch.equal(draws[m + 1], -draws[m])
            assert torch.equal(draws[m], reference[m])  # the first of a pair keeps its own stream
        assert not torch.equal(draws[0].abs(), draws[2].abs())  # pairs are independent of each other


@pytest.mark.parametrize("kind,level", [("cps", 0.8), ("sde", 0.7)])
def test_an_antithetic_pair_leaves_the_shared_window_state_symmetrically(models, tiny_model_dirs, kind, level):
    sampler = _sampler(models, tiny_model_dirs, "flux", *WINDOW, f"sampler.kind={kind}",
                       f"sampler.noise_level={level}", "sampler.antithetic=true")
    s, model = sampler.settings, sampler.model
    group = _group_with_window_at(1)
    traj = sampler.sample_group(group)
    index = int(traj.step_indices[0])
    x = traj.states[0, 0][None]
    v = guided_velocity(model, x, sampler.sigmas[index], model.encode_prompts([group.prompt]), sampler.negative, s)
    mean = step(kind, x, v, sampler.sigmas, index, noise_level=level, noise=torch.zeros_like(x),
                log_prob_form=s.log_prob_form).prev_sample[0]
    for m in (0, 2):
        assert torch.equal(traj.states[m, 0], traj.states[m + 1, 0])  # one shared prefix
        away, back = traj.next_states[m, 0] - mean, traj.next_states[m + 1, 0] - mean
        assert away.abs().max() > 1e-2
        torch.testing.assert_close(back, -away, atol=2e-5, rtol=0)  # +z and -z around the same mean
        torch.testing.assert_close(traj.log_probs[m, 0], traj.log_probs[m + 1, 0], atol=1e-4, rtol=1e-5)
    assert not torch.allclose(traj.next_states[0, 0], traj.next_states[2, 0], atol=1e-2)
