"""The rollout sampling loop without Ray: record shapes, exact log-prob recompute, seeding, Fast window, evaluation."""

from __future__ import annotations

import pickle

import pytest
import torch

from cluster.config import JobConfig
from cluster.config_loading import load_config
from learner.objectives.registry import objective_for
from rollout.models.loading import load_flow_model
from rollout.prompts.groups import PromptGroup, sample_seed
from rollout.sampling.forward import score_step
from rollout.sampling.loop import RolloutSampler, fast_window_start, recorded_steps
from rollout.sampling.trajectory import Trajectories

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
MODES = {
    "full": ["sampler.num_steps=4"],
    "fast": ["sampler.num_steps=6", "sampler.fast_window={size: 2}", "sampler.noise_level=0.8"],
}


def _config(path, family: str, *overrides: str) -> JobConfig:
    """cluster/tiny.yaml on a tiny model folder; group size 4 sampled in chunks of 3 (an uneven last chunk)."""
    return load_config("cluster/tiny.yaml", [
        f"model.family={family}", f"model.path={path}", "model.build_tiny=false",
        "data.group_size=4", "rollout.samples_per_forward=3", "sampler.guidance_scale=4.5", *overrides,
    ])


def _group(group_id: int = 7, size: int = 4, prompt: str = "a red circle") -> PromptGroup:
    return PromptGroup(group_id, prompt, {"tag": "test"}, tuple(sample_seed(0, group_id, i) for i in range(size)))


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    return {f: load_flow_model(str(tiny_model_dirs[f]), f, max_sequence_length=32) for f in ("flux", "sd3")}


def _sampler(models, tiny_model_dirs, family: str, *overrides: str) -> RolloutSampler:
    cfg = _config(tiny_model_dirs[family], family, *overrides)
    return RolloutSampler(models[family], objective_for(cfg).rollout_settings(), cfg.seed)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_trajectory_shapes_and_dtypes(models, tiny_model_dirs, family, mode):
    sampler = _sampler(models, tiny_model_dirs, family, *MODES[mode])
    traj = sampler.sample_group(_group(), policy_version=3)
    latent = models[family].latent_shape(1, SIZE, SIZE)[1:]
    k = 2 if mode == "fast" else 3  # the window, or all 4 steps but the last
    assert traj.states.shape == traj.next_states.shape == (4, k, *latent)
    assert traj.states.dtype == traj.next_states.dtype == traj.log_probs.dtype == torch.float32
    assert traj.log_probs.shape == (4, k) and torch.isfinite(traj.log_probs).all()
    assert traj.step_indices.dtype == torch.long and traj.step_indices.shape == (k,)
    assert traj.sigmas.dtype == torch.float32 and traj.sigmas.shape == (sampler.settings.num_steps + 1,)
    assert traj.images.dtype == torch.uint8 and traj.images.shape == (4, SIZE, SIZE, 3)
    assert len(traj.prompt_embeds) == 1 and traj.prompt_embeds.prompt_embeds.device.type == "cpu"
    assert (traj.group_id, traj.policy_version, traj.seeds) == (7, 3, _group().seeds)
    assert traj.settings.samples_per_forward == 3 and traj.settings.chunks(4) == [range(0, 3), range(3, 4)]
    assert traj.settings.log_prob_form == "squared"  # the CPS default
    if mode == "full":
        assert traj.step_indices.tolist() == [0, 1, 2]
    else:
        start = int(traj.step_indices[0])
        assert traj.step_indices.tolist() == [start, start + 1] and start + 2 <= 6 // 2
    # consecutive recorded steps chain: the next state of one is the state of the next
    assert torch.equal(traj.next_states[:, 0], traj.states[:, 1])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_recomputed_log_probs_equal_the_recorded_ones(models, tiny_model_dirs, family, mode):
    sampler = _sampler(models, tiny_model_dirs, family, *MODES[mode], "sampler.kind=sde", "sampler.noise_level=0.7")
    traj = sampler.sample_group(_group())
    negative = models[family].negative_embeds() if family == "sd3" else None
    same_layout = recompute_log_probs(models[family], traj, negative)
    assert torch.equal(same_layout, traj.log_probs)  # ratio exactly 1 with the identical batch
    one_by_one = recompute_log_probs(models[family], _relaid(traj, samples_per_forward=1), negative)
    ratio = torch.exp(one_by_one.double() - traj.log_probs.double())
    assert (ratio - 1).abs().max() < 1e-6


@torch.no_grad()
def recompute_log_probs(model, traj: Trajectories, negative) -> torch.Tensor:
    """Every recorded log-prob of a group recomputed by the learner's `score_step` in the record's batch layout."""
    out = torch.empty_like(traj.log_probs)
    for k, index in enumerate(traj.step_indices.tolist()):
        for chunk in traj.settings.chunks(traj.group_size):
            rows = slice(chunk.start, chunk.stop)
            scored = score_step(model, traj.settings, traj.sigmas, index, traj.states[rows, k].contiguous(),
                                traj.next_states[rows, k].contiguous(), traj.prompt_embeds, negative)
            out[rows, k] = scored.log_prob.float()
    return out


def _relaid(traj: Trajectories, samples_per_forward: int) -> Trajectories:
    from dataclasses import replace

    return replace(traj, settings=replace(traj.settings, samples_per_forward=samples_per_forward))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_same_seeds_give_identical_trajectories_and_new_seeds_do_not(models, tiny_model_dirs, family):
    sampler = _sampler(models, tiny_model_dirs, family)
    first, again = sampler.sample_group(_group()), sampler.sample_group(_group())
    for name in ("states", "next_states", "log_probs", "images"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    other = sampler.sample_group(_group(group_id=8))
    assert not torch.equal(first.states, other.states)
    assert not torch.equal(first.states[0], first.states[1])  # each sample its own noise


def test_batch_layout_does_not_change_the_noise(models, tiny_model_dirs):
    chunked = _sampler(models, tiny_model_dirs, "flux").sample_group(_group())
    single = _sampler(models, tiny_model_dirs, "flux", "rollout.samples_per_forward=1").sample_group(_group())
    assert torch.equal(chunked.states[:, 0], single.states[:, 0])  # the initial noise, per sample
    torch.testing.assert_close(chunked.next_states, single.next_states, atol=1e-5, rtol=0)


def test_same_initial_noise_shares_the_start_but_not_the_step_noise(models, tiny_model_dirs):
    traj = _sampler(models, tiny_model_dirs, "flux", "sampler.same_initial_noise=true").sample_group(_group())
    for i in range(1, 4):
        assert torch.equal(traj.states[i, 0], traj.states[0, 0])
        assert not torch.equal(traj.next_states[i, 0], traj.next_states[0, 0])


def test_fast_window_is_ode_outside_and_drawn_per_group(models, tiny_model_dirs):
    overrides = ["sampler.num_steps=8", "sampler.fast_window={size: 2}", "sampler.same_initial_noise=true"]
    sampler = _sampler(models, tiny_model_dirs, "flux", *overrides)
    starts = {fast_window_start(0, g, 8, 2) for g in range(40)}
    assert starts == {0, 1, 2}  # uniform over [0, 8 // 2 - 2]
    assert fast_window_start(0, 5, 8, 2) == fast_window_start(0, 5, 8, 2)
    group = next(_group(g) for g in range(40) if fast_window_start(0, g, 8, 2) > 0)
    traj = sampler.sample_group(group)
    assert traj.step_indices.tolist() == recorded_steps(sampler.settings, 0, group.group_id)
    # a shared initial noise and an ODE prefix: every sample reaches the window in the same state ...
    torch.testing.assert_close(traj.states[1:, 0], traj.states[:1, 0].expand_as(traj.states[1:, 0]), atol=1e-6, rtol=0)
    # ... and branches inside it
    assert (traj.next_states[1:, 0] - traj.next_states[0, 0]).abs().max() > 1e-2


def test_trained_steps_setting_limits_the_record(models, tiny_model_dirs):
    traj = _sampler(models, tiny_model_dirs, "flux", "sampler.trained_steps=2").sample_group(_group())
    assert traj.step_indices.tolist() == [0, 1]


def test_evaluation_is_deterministic_ode_with_fixed_seeds(models, tiny_model_dirs):
    sampler = _sampler(models, tiny_model_dirs, "sd3")
    prompts, seeds = ["a red circle", "two blue stars", "a red circle"], [1, 2, 3]
    images = sampler.sample_eval(prompts, seeds, num_steps=6, batch_size=2)
    assert images.dtype == torch.uint8 and images.shape == (3, SIZE, SIZE, 3)
    assert torch.equal(images, sampler.sample_eval(prompts, seeds, num_steps=6, batch_size=2))
    one_by_one = sampler.sample_eval(prompts, seeds, num_steps=6, batch_size=1)
    assert (one_by_one.int() - images.int()).abs().max() <= 1
    assert not torch.equal(images[0], images[2])  # same prompt, another seed


def test_record_holds_only_tensors_and_plain_values(models, tiny_model_dirs):
    traj = _sampler(models, tiny_model_dirs, "sd3").sample_group(_group())
    blob = pickle.dumps(traj)
    tensors = (traj.states, traj.next_states, traj.log_probs, traj.step_indices, traj.sigmas, traj.images,
               traj.prompt_embeds.prompt_embeds, traj.prompt_embeds.pooled)
    assert len(blob) < sum(t.numel() * t.element_size() for t in tensors) + 20_000  # no model objects ride along
    back = pickle.loads(blob)
    assert torch.equal(back.states, traj.states) and back.settings == traj.settings


def test_record_refuses_inconsistent_shapes(models, tiny_model_dirs):
    from dataclasses import replace

    traj = _sampler(models, tiny_model_dirs, "flux").sample_group(_group())
    with pytest.raises(ValueError, match="next_states"):
        replace(traj, next_states=traj.next_states[:, :1])
    with pytest.raises(ValueError, match="images"):
        replace(traj, images=traj.images.float())


def test_forward_objectives_get_final_samples_equal_to_the_ode_evaluation(models, tiny_model_dirs):
    from rollout.sampling.trajectory import FinalSamples

    sampler = _sampler(models, tiny_model_dirs, "sd3", "learner.objective=nft", "sampler.kind=ode")
    group = _group()
    final = sampler.sample_group(group, policy_version=2)
    assert isinstance(final, FinalSamples) and final.policy_version == 2
    assert final.latents.shape == (4, *models["sd3"].latent_shape(1, SIZE, SIZE)[1:])
    # the same ODE from the same seeds as the evaluation path, in another batch layout
    evaluated = sampler.sample_eval([group.prompt] * 4, list(group.seeds), num_steps=sampler.settings.num_steps,
                                    batch_size=4)
    assert (final.images.int() - evaluated.int()).abs().max() <= 1
    decoded = models["sd3"].decode(final.latents, SIZE, SIZE)  # the latents are those the images were decoded from
    assert (decoded.int() - final.images.int()).abs().max() <= 1
