"""GRPO maths: advantages by hand, where the clipped loss passes gradient, its statistics, and the KL term."""

import statistics

import pytest
import torch

from learner.objectives.grpo_math import advantages, nonzero_advantage_indices, policy_loss
from rollout.models.schedules import sigmas
from rollout.sampling.steps import kl, step

REWARDS = [1.0, 2.0, 6.0, 4.0, 4.0, 4.0, 0.0, 10.0]
GROUPS = [0, 0, 0, 1, 1, 1, 2, 2]


def _by_hand(rewards, groups, mode, eps=1e-4):
    out = []
    for r, g in zip(rewards, groups):
        members = [x for x, h in zip(rewards, groups) if h == g]
        scale = statistics.pstdev(rewards) if mode == "global" else statistics.pstdev(members)
        out.append((r - statistics.fmean(members)) / (scale + eps))
    return out


@pytest.mark.parametrize("mode", ["global", "group"])
def test_advantages_match_hand_computation(mode):
    got = advantages(torch.tensor(REWARDS), torch.tensor(GROUPS), std=mode, clip=None)
    assert got.tolist() == pytest.approx(_by_hand(REWARDS, GROUPS, mode), rel=1e-6)
    assert got[3:6].tolist() == [0.0, 0.0, 0.0]  # a zero-variance group carries no signal


def test_advantages_accept_lists_and_non_integer_group_ids():
    prompts = ["a cat", "a cat", "a cat", "a dog", "a dog", "a dog", "two cups", "two cups"]
    by_int = advantages(torch.tensor(REWARDS), torch.tensor(GROUPS), std="group")
    torch.testing.assert_close(advantages(REWARDS, prompts, std="group"), by_int)


def test_advantages_are_clipped():
    rewards = [0.0] * 49 + [1.0]  # group std 0.14: the lone success has A = 7
    got = advantages(rewards, [0] * 50, std="group")
    assert float(got[-1]) == 5.0
    assert float(got[0]) == pytest.approx(-0.02 / (0.14 + 1e-4), rel=1e-6)


def test_advantages_reject_bad_arguments():
    with pytest.raises(ValueError, match="global, group"):
        advantages(REWARDS, GROUPS, std="batch")
    with pytest.raises(ValueError, match="group ids"):
        advantages(REWARDS, GROUPS[:-1])


def test_nonzero_advantage_indices_drop_zero_variance_groups():
    a = advantages(REWARDS, GROUPS, std="group")
    assert nonzero_advantage_indices(a).tolist() == [0, 1, 2, 6, 7]


def test_gradient_is_zero_exactly_where_clipping_stops_it():
    eps = 0.1
    old = torch.zeros(8)
    log_ratio = torch.log(torch.tensor([1.2, 1.2, 0.8, 0.8, 1.05, 0.95, 1.05, 0.95]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0])
    log_prob = log_ratio.clone().requires_grad_(True)
    loss, stats = policy_loss(log_prob, old, adv, clip_range=eps)
    loss.backward()
    stopped = torch.tensor([True, False, False, True, False, False, False, False])  # A > 0, ρ > 1 + ε; A < 0, ρ < 1 − ε
    assert torch.all(log_prob.grad[stopped] == 0)
    assert torch.all(log_prob.grad[~stopped] != 0)
    ratio = torch.exp(log_ratio)
    torch.testing.assert_close(log_prob.grad[~stopped], -adv[~stopped] * ratio[~stopped] / 8)
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps)).mean()
    torch.testing.assert_close(loss.detach(), expected)
    stats = stats.means()
    assert stats["clip_frac"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx(float(ratio.mean()))
    assert stats["ratio_std"] == pytest.approx(float(ratio.std(correction=0)))
    assert stats["approx_kl"] == pytest.approx(0.5 * float((log_ratio**2).mean()))
    assert all(isinstance(v, float) for v in stats.values())


def test_on_policy_loss_is_minus_the_mean_advantage_with_ratio_one():
    lp = torch.randn(6)
    adv = torch.randn(6)
    loss, stats = policy_loss(lp, lp.clone(), adv, clip_range=1e-4)
    stats = stats.means()
    assert float(loss) == pytest.approx(-float(adv.mean()))
    assert (stats["ratio_mean"], stats["ratio_std"], stats["clip_frac"], stats["approx_kl"]) == (1.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("form", ["gaussian", "squared"])
def test_kl_is_zero_when_the_means_agree(form):
    mean = torch.randn(3, 4, 5)
    assert torch.equal(kl(mean, mean.clone(), 0.3, form=form), torch.zeros(3))


def test_gaussian_kl_is_the_closed_form_with_the_noise_scale():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    mean_ref = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    scale = torch.tensor([0.2, 0.5, 1.3], dtype=torch.float64)
    per_element = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, scale.reshape(3, 1, 1).expand_as(mean)),
        torch.distributions.Normal(mean_ref, scale.reshape(3, 1, 1).expand_as(mean)),
    )
    torch.testing.assert_close(kl(mean, mean_ref, scale, form="gaussian"), per_element.mean(dim=(1, 2)))
    per_sample_shape = kl(mean, mean_ref, scale.reshape(3, 1, 1), form="gaussian")
    torch.testing.assert_close(per_sample_shape, per_element.mean(dim=(1, 2)))
    torch.testing.assert_close(kl(mean, mean_ref, 0.0, form="gaussian"), torch.zeros(3, dtype=torch.float64))


def test_squared_kl_is_the_mean_squared_difference():
    mean, mean_ref = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(kl(mean, mean_ref, 0.4, form="squared"), ((mean - mean_ref) ** 2).mean(dim=1))


def test_kl_with_a_steps_noise_scale_divides_by_sigma_t_without_sqrt_delta():
    x, v = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    sched = sigmas("sd3", 10)
    out = step("sde", x, v, sched, 3, noise_level=0.7, log_prob_form="gaussian")
    ref = step("sde", x, v + 0.01, sched, 3, noise_level=0.7, log_prob_form="gaussian")
    sigma_t = float(out.noise_scale.flatten()[0])
    expected = ((out.mean - ref.mean) ** 2).mean(dim=1) / (2 * sigma_t**2)
    torch.testing.assert_close(kl(out.mean, ref.mean, out.noise_scale, form="gaussian"), expected)
    with pytest.raises(ValueError, match="gaussian, squared"):
        kl(out.mean, ref.mean, out.noise_scale, form="sum")
