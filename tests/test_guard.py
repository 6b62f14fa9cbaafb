"""GRPO-Guard (docs/math.md "GRPO-Guard"): the normalised log-ratio equals mean_D(z ⊙ δ), its spread over the noise is
that of a centred ratio, the 1/Δ weight gives every Flow-SDE step the same gradient scale on v, and a rollout that
records its means reproduces a zero log-ratio through the learner's own recompute."""

from __future__ import annotations

import math

import pytest
import torch

from learner.objectives.batch import sample_order
from learner.objectives.grpo import MicroBatch, micro_batch, score_recorded_step, step_loss
from learner.objectives.grpo_math import guard_log_ratio
from learner.objectives.registry import objective_for
from rollout.models.loading import load_flow_model
from rollout.prompts.groups import PromptGroup
from rollout.sampling.loop import RolloutSampler
from rollout.sampling.steps import gaussian_log_prob, step
from rollout.sampling.trajectory import SamplerSettings

SIGMAS = torch.tensor([1.0, 0.9, 0.75, 0.55, 0.3, 0.0], dtype=torch.float64)
A = 0.7


def _pair(kind: str, index: int, batch: int = 4, seed: int = 0):
    """A sampled step with the old velocity and the same next state scored with another one; and z, δ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 4, 4, generator=g, dtype=torch.float64)
    v_old = torch.randn(x.shape, generator=g, dtype=torch.float64)
    v_new = v_old + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
    old = step(kind, x, v_old, SIGMAS, index, noise_level=A, noise=z, log_prob_form="gaussian")
    new = step(kind, x, v_new, SIGMAS, index, noise_level=A, prev_sample=old.prev_sample, log_prob_form="gaussian")
    return old, new, z, new.mean - old.mean


@pytest.mark.parametrize("kind", ["sde", "sde_exact"])
@pytest.mark.parametrize("index", [1, 3])
def test_the_normalised_log_ratio_is_the_mean_of_z_times_delta(kind, index):
    old, new, z, delta = _pair(kind, index)
    log_ratio = guard_log_ratio(new.log_prob, old.log_prob, new.mean, old.mean, new.std)
    expected = (z * delta).reshape(z.shape[0], -1).mean(dim=1)
    torch.testing.assert_close(log_ratio, expected, atol=1e-12, rtol=1e-10)


def test_over_the_noise_the_normalised_log_ratio_is_centred_and_plain_flow_grpos_is_not():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 8, 8, generator=g, dtype=torch.float64).expand(4000, -1, -1, -1)
    v_old = torch.randn(x.shape[1:], generator=g, dtype=torch.float64).expand_as(x)
    v_new = v_old + 0.2 * torch.randn(x.shape[1:], generator=g, dtype=torch.float64).expand_as(x)
    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
    old = step("sde", x, v_old, SIGMAS, 2, noise_level=A, noise=z, log_prob_form="gaussian")
    new = step("sde", x, v_new, SIGMAS, 2, noise_level=A, prev_sample=old.prev_sample, log_prob_form="gaussian")
    guard = guard_log_ratio(new.log_prob, old.log_prob, new.mean, old.mean, new.std)
    plain = new.log_prob - old.log_prob
    delta, s = (new.mean - old.mean)[0], float(new.std.reshape(-1)[0])
    d = delta.numel()
    spread = float(delta.pow(2).mean().sqrt()) / math.sqrt(d)  # rms(δ)/√D
    se = spread / math.sqrt(len(guard))
    assert abs(float(guard.mean())) < 4 * se
    assert float(guard.std()) == pytest.approx(spread, rel=0.05)
    bias = -float(delta.pow(2).mean()) / (2 * s * s)  # plain Flow-GRPO: mean −mean_D δ²/(2s²), spread rms(δ)/(s√D)
    assert float(plain.mean()) == pytest.approx(bias, abs=4 * se / s)
    assert float(plain.std()) == pytest.approx(spread / s, rel=0.05)


def _micro_batch(old, index: int, advantages: torch.Tensor) -> MicroBatch:
    b = advantages.shape[0]
    settings = SamplerSettings(kind="sde", noise_level=A, log_prob_form="gaussian", guidance_scale=1.0, height=8,
                               width=8, num_steps=len(SIGMAS) - 1, samples_per_forward=b, trained_steps=1,
                               record_means=True)
    return MicroBatch(samples=tuple((0, i) for i in range(b)), states=old.prev_sample[:, None],
                      next_states=old.prev_sample[:, None], old_log_probs=old.log_prob[:, None],
                      advantages=advantages, step_indices=torch.full((b, 1), index), embeds=None,
                      sigmas=SIGMAS, settings=settings, old_means=old.mean[:, None])


@pytest.mark.parametrize("index", [1, 2, 3])
def test_on_policy_the_gradient_on_v_is_the_same_at_every_flow_sde_step(index):
    """At v_θ = v_old, ∂L/∂v_i = A_i·(1 + a²/2)·z_i/(B·D) for t < 1: the 1/Δ weight cancels the step size."""
    g = torch.Generator().manual_seed(index)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    v_old = torch.randn(x.shape, generator=g, dtype=torch.float64)
    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
    advantages = torch.tensor([1.5, -0.5, 0.25], dtype=torch.float64)
    old = step("sde", x, v_old, SIGMAS, index, noise_level=A, noise=z, log_prob_form="gaussian")
    v = v_old.clone().requires_grad_(True)
    new = step("sde", x, v, SIGMAS, index, noise_level=A, prev_sample=old.prev_sample, log_prob_form="gaussian")
    call = step_loss(new, _micro_batch(old, index, advantages), 0, clip_range=2e-6, kl_beta=0.0, ratio_norm=True)
    call.loss.backward()
    b, d = x.shape[0], x[0].numel()
    expected = advantages.reshape(-1, 1, 1, 1) * (1 + A * A / 2) * z / (b * d)
    torch.testing.assert_close(v.grad, expected, atol=1e-12, rtol=1e-9)
    assert call.ratio.means()["ratio_mean"] == 1.0  # on-policy: log ρ_G = 0 exactly
    delta_t = float(SIGMAS[index] - SIGMAS[index + 1])
    assert float(call.policy.detach()) == pytest.approx(-float(advantages.mean()) / delta_t, rel=1e-12)


def test_a_recorded_rollout_gives_a_zero_normalised_log_ratio_through_the_learner(tiny_model_dirs):
    model = load_flow_model(str(tiny_model_dirs["sd3"]), "sd3", max_sequence_length=32)
    settings = SamplerSettings(kind="sde", noise_level=A, log_prob_form="gaussian", guidance_scale=4.5, height=64,
                               width=64, num_steps=3, samples_per_forward=2, trained_steps=2, record_means=True)
    sampler = RolloutSampler(model, settings, run_seed=0)
    traj = sampler.sample_group(PromptGroup(5, "a red circle", {}, (1, 2, 3, 4)))
    assert traj.means.shape == traj.states.shape
    for k, index in enumerate(traj.step_indices.tolist()):  # each next state's log-prob is around the recorded mean
        old = step("sde", traj.states[:, k], torch.zeros_like(traj.states[:, k]), traj.sigmas, index,
                   noise_level=A, prev_sample=traj.next_states[:, k], log_prob_form="gaussian")
        std = float(old.std.reshape(-1)[0])
        torch.testing.assert_close(traj.log_probs[:, k], gaussian_log_prob(traj.next_states[:, k], traj.means[:, k],
                                                                           std), atol=1e-5, rtol=1e-6)
    samples = sample_order([traj])[:2]  # the rollout's first chunk: its layout, so the recompute is bit-exact
    mb = micro_batch([traj], samples, torch.tensor([1.0, -1.0]))
    with torch.no_grad():
        for k in range(mb.num_steps):
            scored = score_recorded_step(model, mb, k, sampler.negative)
            assert torch.equal(scored.mean.float(), mb.old_means[:, k])
            log_ratio = guard_log_ratio(scored.log_prob, mb.old_log_probs[:, k], scored.mean, mb.old_means[:, k],
                                        scored.std)
            assert torch.equal(log_ratio, torch.zeros_like(log_ratio))


@pytest.mark.slow
def test_the_learner_trains_with_the_normalised_ratio(ray_local, tiny_model_dirs):
    """The whole learner path (DeepSpeed, micro-batches, the recorded means through the object store): the first
    update is on-policy (ratio exactly 1) and moves the LoRA; the second sees a normalised ratio off 1."""
    from cluster.config import PoolConfig
    from cluster.config_loading import validate_config
    from learner.ranks.actor import LearnerActor
    from learner.ranks.process_group import RankGroup
    from rollout.policy import add_lora

    lora = {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    cfg = validate_config(dict(
        run_name="guard-test",
        model=dict(family="sd3", path=str(tiny_model_dirs["sd3"]), dtype="float32", resolution=64,
                   max_sequence_length=32),
        sampler=dict(kind="sde", noise_level=A, num_steps=3, guidance_scale=4.5),
        rollout=dict(samples_per_forward=2),
        rewards=dict(scorers=[dict(name="jpeg_compressibility")]),
        learner=dict(num_actors=1, num_cpus_per_actor=0.5, zero_stage=2, precision="fp32", lora=lora, lr=1e-3,
                     kl_beta=0.0, clip_range=0.2, ratio_norm=True, advantage_std="group", micro_batch_size=2),
        data=dict(group_size=4, images_per_iteration=8),
    ))
    model = load_flow_model(cfg.model.path, "sd3", max_sequence_length=32)
    torch.manual_seed(0)
    add_lora(model.transformer, cfg.learner.lora)
    sampler = RolloutSampler(model, objective_for(cfg).rollout_settings(), run_seed=0)
    groups = [sampler.sample_group(PromptGroup(g, f"prompt {g}", {}, tuple(range(10 * g, 10 * g + 4)))) for g in (1, 2)]
    assert all(t.means is not None for t in groups)
    rewards = [torch.tensor([0.1, 0.5, 0.3, 0.9]), torch.tensor([0.2, 0.2, 0.7, 0.0])]
    group = RankGroup(LearnerActor, PoolConfig(num_actors=1, num_cpus_per_actor=0.5))
    try:
        ray_local.get(group.run("setup", cfg, negative=sampler.negative))
        before = ray_local.get(group.run("trainable_state"))[0]
        refs = ray_local.put(groups), ray_local.put(rewards)
        first = ray_local.get(group.run("train_iteration", *refs))[0]
        after = ray_local.get(group.run("trainable_state"))[0]
        second = ray_local.get(group.run("train_iteration", *refs))[0]
    finally:
        group.kill()
    first, second = first["updates"][0], second["updates"][0]
    assert first["ratio_mean"] == 1.0 and first["ratio_max_dev"] == 0.0 and first["step_applied"] == 1.0
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert second["ratio_max_dev"] > 0 and math.isfinite(second["loss"])
