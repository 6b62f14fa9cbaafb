"""DiffusionNFT and AWM losses against docs/math.md's closed forms ("Forward-process objectives"): the reward →
optimality probability map, v⁺ + v⁻ = 2·v_old, the NFT gradient at v_θ = v_old (advantage-weighted flow matching, any
β), the minimiser without weighting, the soft-update schedules, AWM's gradient and timestep strata."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learner.objectives.final_sample_math import (
    AWM_EPS,
    awm_loss,
    awm_timestep_indices,
    forward_process,
    implicit_velocities,
    nft_loss,
    nft_timestep_indices,
    old_adapter_decay,
    optimality_probability,
    prox_adapter_decay,
    reference_distance,
    soft_update,
)

ROOT = Path(__file__).resolve().parents[1]
C = 5.0


def _batch(seed: int = 0, b: int = 4, shape=(2, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    noise = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.6, 0.35, 0.1], dtype=torch.float64)[:b]
    v_old = noise - x0 + 0.4 * torch.randn(b, *shape, generator=g, dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0, 7.0, -0.5], dtype=torch.float64)[:b]
    return x0, noise, t, v_old, adv


def test_optimality_probability_maps_clipped_advantages_to_0_1():
    a = torch.tensor([0.0, 5.0, -5.0, 2.5, -1.0, 12.0, -7.0], dtype=torch.float64)
    assert optimality_probability(a, C).tolist() == [0.5, 1.0, 0.0, 0.75, 0.4, 1.0, 0.0]


def test_implicit_velocities_average_to_the_old_one():
    _, _, _, v_old, _ = _batch()
    v_theta = torch.randn_like(v_old)
    for beta in (1.0, 0.1, 0.37):
        pos, neg = implicit_velocities(v_old, v_theta, beta)
        torch.testing.assert_close(pos + neg, 2 * v_old, atol=1e-12, rtol=0)


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_gradient_at_the_old_policy_is_advantage_weighted_flow_matching(beta):
    x0, noise, t, v_old, adv = _batch()
    x_t, v = forward_process(x0, noise, t)
    r = optimality_probability(adv, C)
    v_theta = v_old.clone().requires_grad_(True)
    nft_loss(x0, x_t, t, v_theta, v_old, r, beta=beta, clip=C).backward()

    # A_c·∇[t·mean_D (v_θ − v)² / mean_D |v_old − v|] per sample, averaged over the batch
    w = torch.zeros_like(v_old).requires_grad_(True)
    theta = v_old + w
    norm = (v_old - v).abs().reshape(4, -1).mean(dim=1)
    target = adv.clamp(-C, C) * t * ((theta - v) ** 2).reshape(4, -1).mean(dim=1) / norm
    target.mean().backward()
    torch.testing.assert_close(v_theta.grad, w.grad, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_without_weighting_gradient_descent_reaches_the_closed_form_minimiser(beta):
    x0, noise, _, v_old, adv = _batch(seed=3)
    t = torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=torch.float64)
    x_t, v = forward_process(x0, noise, t)
    r = optimality_probability(adv, C)
    v_theta = v_old.clone().requires_grad_(True)
    d = v_old[0].numel()
    # per element the loss is quadratic with curvature 2·C·β·t²/(B·D): steps of 1/(largest curvature) converge
    opt = torch.optim.SGD([v_theta], lr=4 * d / (2 * C * beta * float(t.max()) ** 2))
    for _ in range(200):
        opt.zero_grad()
        nft_loss(x0, x_t, t, v_theta, v_old, r, beta=beta, clip=C, adaptive=False).backward()
        opt.step()
    expected = v_old + (2 * r - 1).reshape(-1, 1, 1, 1) * (v - v_old) / beta
    torch.testing.assert_close(v_theta.detach(), expected, atol=1e-8, rtol=0)


def test_reference_distance_and_bad_nft_beta():
    x0, noise, t, v_old, adv = _batch()
    x_t, _ = forward_process(x0, noise, t)
    r = optimality_probability(adv, C)
    v_theta = v_old.clone().requires_grad_(True)
    distance = reference_distance(v_theta, v_old + 0.5)
    assert float(distance.detach()) == pytest.approx(0.25, rel=1e-12)  # every element 0.5 away
    distance.backward()  # d/dv mean (v − v_ref)² = 2 (v − v_ref) / n, and none into v_ref
    torch.testing.assert_close(v_theta.grad, torch.full_like(v_old, -1.0 / v_old.numel()))
    with pytest.raises(ValueError, match="beta"):
        nft_loss(x0, x_t, t, v_old, v_old, r, beta=0.0, clip=C)


def test_soft_update_schedules_and_the_update_itself():
    assert [old_adapter_decay(k) for k in (0, 100, 1000, 5000)] == [0.0, 0.1, 0.5, 0.5]
    assert [old_adapter_decay(k, "ocr") for k in (0, 74, 75, 76, 1000)] == [0.0, 0.0, 0.0, 0.0075, 0.999]
    assert [prox_adapter_decay(k) for k in (0, 100, 300, 1000)] == [0.0, 0.1, 0.3, 0.3]
    target, source = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -2.0])]
    soft_update(target, source, 0.25)
    assert target[0].tolist() == [0.25 * 1 + 0.75 * 3, 0.25 * 2 - 0.75 * 2]


def test_awm_gradient_is_advantage_times_t_times_l_to_the_p_minus_1():
    x0, noise, t, v_old, adv = _batch(seed=5)
    _, v = forward_process(x0, noise, t)
    v_theta = v_old.clone().requires_grad_(True)
    awm_loss(v_theta, v, t, adv, clip=C).backward()
    b, d = 4, v_old[0].numel()
    big_l = ((v_old - v) ** 2).reshape(b, -1).mean(dim=1)
    a = adv.clamp(-C, C) / C
    scale = a * t * (big_l + AWM_EPS) ** (0.25 - 1)
    expected = scale.reshape(-1, 1, 1, 1) * 2 * (v_old - v) / (d * b)
    torch.testing.assert_close(v_theta.grad, expected, atol=1e-12, rtol=1e-9)


def test_awm_prox_term_pulls_towards_the_prox_adapter():
    x0, noise, t, v_old, adv = _batch()
    _, v = forward_process(x0, noise, t)
    zero = torch.zeros(4, dtype=torch.float64)
    base = awm_loss(v_old, v, t, zero)
    assert float(base) == 0.0
    assert float(awm_loss(v_old, v, t, zero, v_prox=v_old - 2.0)) == pytest.approx(4.0)


def test_timestep_indices_nft_permutation_and_awm_strata():
    g = torch.Generator().manual_seed(0)
    nft = nft_timestep_indices(10, 6, g)
    assert nft.shape == (6, 9)  # ⌊0.99·10⌋ of 10 levels per image
    assert all(len(set(row.tolist())) == 9 and set(row.tolist()) <= set(range(10)) for row in nft)
    assert len({tuple(row.tolist()) for row in nft}) > 1  # drawn per image
    awm = awm_timestep_indices(10, 200, 3, g)
    assert awm.shape == (200, 3) and int(awm.min()) >= 1  # never t = 1 (index 0)
    for column, (lo, hi) in enumerate([(1, 4), (4, 7), (7, 10)]):
        assert set(awm[:, column].tolist()) == set(range(lo, hi))


@pytest.mark.parametrize("name", ["nft", "awm"])
def test_noised_inputs_follow_the_forward_process_and_are_reproducible(name):
    from cluster.config_loading import load_config
    from learner.objectives.final_samples import FinalBatch
    from learner.objectives.registry import objective_for
    from rollout.sampling.trajectory import SamplerSettings

    cfg = load_config(ROOT / "cluster/tiny.yaml", [f"learner.objective={name}", "sampler.kind=ode",
                                                   "sampler.fast_window=null", "sampler.num_steps=10"])
    objective = objective_for(cfg)
    settings = SamplerSettings(kind="ode", noise_level=0.0, log_prob_form="squared", guidance_scale=1.0, height=8,
                               width=8, num_steps=10, samples_per_forward=4, trained_steps=9, record_steps=False)
    sigmas = torch.linspace(1.0, 0.0, 11)
    x0 = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    batch = FinalBatch(samples=((0, 0), (0, 1), (1, 0)), keys=((7, 0), (7, 1), (9, 0)), x0=x0,
                       advantages=torch.zeros(3), embeds=None, sigmas=sigmas, settings=settings)
    inputs = objective.noised_inputs(batch, version=4)
    assert len(inputs) == objective.calls_per_micro_batch == 9  # ⌊0.99·10⌋
    levels = torch.stack([t for t, _, _ in inputs], dim=1)  # (B, 9)
    for t, x_t, v in inputs:
        noise = v + x0
        torch.testing.assert_close(x_t, (1 - t)[:, None, None] * x0 + t[:, None, None] * noise)
        assert all(torch.isclose(value, sigmas[:10]).any() for value in t)  # the schedule's own levels
    if objective.publishes_trailing:  # nft: each sample 9 distinct levels of the 10
        assert all(len(set(row.tolist())) == 9 for row in levels)
        assert not torch.equal(levels[0], levels[1])
    else:  # awm: one per stratum, never t = 1
        assert float(levels.max()) < 1.0
    again = objective.noised_inputs(batch, version=4)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(inputs, again))
    other = objective.noised_inputs(batch, version=5)
    assert not torch.equal(inputs[0][1], other[0][1])
