"""Step rules: schedules, log-prob forms, Euler limits, the first Flow-SDE std, exact replay on the training path."""

import math

import pytest
import torch

from cluster.config import STEP_KINDS
from rollout.models.schedules import sigmas
from rollout.sampling.steps import DEFAULT_LOG_PROB_FORM, step

SD3_10 = [1, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0]
FLUX_6_512PX = [1, 0.9037, 0.7897, 0.6525, 0.4842, 0.2730, 0]
STOCHASTIC = ("sde", "dance", "cps", "sde_exact")


def _inputs(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


def test_sd3_and_flux_schedules_match_math_md():
    assert sigmas("sd3", 10).tolist() == pytest.approx(SD3_10, abs=5e-5)
    # FLUX at 512 px: 64x64 latent, packed 2x2 -> 1024 image tokens (mu = 0.63).
    assert sigmas("flux", 6, image_seq_len=1024).tolist() == pytest.approx(FLUX_6_512PX, abs=5e-5)


@pytest.mark.parametrize("kind", STOCHASTIC)
@pytest.mark.parametrize("index", [0, 4, 8])
def test_gaussian_log_prob_is_the_normal_density_averaged_over_elements(kind, index):
    x, v = _inputs((3, 4, 5))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = step(kind, x, v, sigmas("sd3", 10), index, noise_level=0.7, noise=z, log_prob_form="gaussian")
    normal = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean))
    expected = normal.log_prob(out.prev_sample).mean(dim=(1, 2))
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-12, atol=1e-12)
    assert out.log_prob.shape == (3,)


@pytest.mark.parametrize("kind", STOCHASTIC)
def test_squared_log_prob_is_minus_the_mean_squared_deviation(kind):
    x, v = _inputs((3, 2, 6))
    other = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = step(kind, x, v, sigmas("sd3", 10), 3, noise_level=0.7, prev_sample=other, log_prob_form="squared")
    expected = torch.stack([-((other[b] - out.mean[b]) ** 2).sum() / 12 for b in range(3)])
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-12, atol=1e-15)


def test_default_log_prob_forms():
    x, v = _inputs((2, 3))
    sched = sigmas("sd3", 10)
    for kind in ("sde", "dance", "sde_exact"):
        out = step(kind, x, v, sched, 2, noise_level=0.7, log_prob_form=DEFAULT_LOG_PROB_FORM[kind])
        ref = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean)).log_prob(out.prev_sample).mean(1)
        torch.testing.assert_close(out.log_prob, ref)
    out = step("cps", x, v, sched, 2, noise_level=0.7, log_prob_form="squared")
    torch.testing.assert_close(out.log_prob, -((out.prev_sample - out.mean) ** 2).mean(1))


def test_ode_is_the_euler_step_with_zero_log_prob():
    x, v = _inputs((2, 16, 4, 4))
    sched = sigmas("sd3", 10)
    for index in range(10):
        out = step("ode", x, v, sched, index, noise_level=0.7, log_prob_form="gaussian")
        t, s = float(sched[index]), float(sched[index + 1])
        torch.testing.assert_close(out.prev_sample, x - (t - s) * v, rtol=0, atol=0)
        assert torch.all(out.log_prob == 0) and torch.all(out.std == 0) and torch.all(out.noise_scale == 0)


@pytest.mark.parametrize("kind", ["sde", "dance", "cps", "sde_exact"])
def test_zero_noise_level_is_euler(kind):
    x, v = _inputs((4, 8, 64), dtype=torch.float32)
    sched = sigmas("sd3", 10)
    for index in range(10):
        out = step(kind, x, v, sched, index, noise_level=0.0, log_prob_form=DEFAULT_LOG_PROB_FORM[kind])
        euler = x - (sched[index] - sched[index + 1]) * v
        torch.testing.assert_close(out.prev_sample, euler, rtol=1e-6, atol=1e-6)
        assert torch.all(out.std == 0)


def test_cps_last_step_is_deterministic_and_lands_on_the_predicted_clean_sample():
    x, v = _inputs((3, 5))
    sched = sigmas("sd3", 10)
    a = step("cps", x, v, sched, 9, noise_level=0.7, log_prob_form="squared")
    b = step("cps", x, v, sched, 9, noise_level=0.7, log_prob_form="squared")
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.all(a.std == 0)
    torch.testing.assert_close(a.prev_sample, x - sched[9].double() * v, rtol=1e-12, atol=1e-12)
    assert torch.all(a.log_prob == 0)  # squared form, the sampled state is the mean
    assert torch.all(step("cps", x, v, sched, 9, noise_level=0.7, log_prob_form="gaussian").log_prob == 0)


@pytest.mark.parametrize("a", [0.3, 0.7, 0.9])
def test_first_flow_sde_step_std_is_the_noise_level(a):
    x, v = _inputs((1, 4))
    out = step("sde", x, v, sigmas("sd3", 10), 0, noise_level=a, log_prob_form="gaussian")
    assert float(out.std.flatten()[0]) == pytest.approx(a, rel=1e-6)
    # sigma_t uses the schedule's second value in its denominator at t = 1.
    second = float(sigmas("sd3", 10)[1])
    assert float(out.noise_scale.flatten()[0]) == pytest.approx(a / math.sqrt(1 - second), rel=1e-6)


@pytest.mark.parametrize("kind", ["sde", "dance"])
def test_flow_sde_mean_equals_its_clean_and_noise_prediction_form(kind):
    """μ = (1 − s)·x̂0 + (s − σ_t²Δ/(2t))·x̂1, the second form of docs/math.md's Flow-SDE mean."""
    x, v = _inputs((2, 7))
    sched = sigmas("sd3", 10).double()
    for index in range(10):
        out = step(kind, x, v, sched, index, noise_level=0.5, log_prob_form=DEFAULT_LOG_PROB_FORM[kind])
        t, s = float(sched[index]), float(sched[index + 1])
        sigma_t = float(out.noise_scale.flatten()[0])
        expected = (1 - s) * (x - t * v) + (s - sigma_t**2 * (t - s) / (2 * t)) * (x + (1 - t) * v)
        torch.testing.assert_close(out.mean, expected, rtol=1e-12, atol=1e-12)
        assert float(out.std.flatten()[0]) == pytest.approx(sigma_t * math.sqrt(t - s), rel=1e-12)
    assert float(step("dance", x, v, sched, 5, noise_level=0.3,
                      log_prob_form="gaussian").noise_scale.flatten()[0]) == 0.3


def test_cps_and_sde_exact_noise_scale_is_their_std():
    x, v = _inputs((2, 3))
    sched = sigmas("sd3", 10)
    for kind in ("cps", "sde_exact"):
        out = step(kind, x, v, sched, 4, noise_level=0.7, log_prob_form=DEFAULT_LOG_PROB_FORM[kind])
        assert torch.equal(out.std, out.noise_scale) and float(out.std.flatten()[0]) > 0
    s = float(sched[5])
    cps_std = float(step("cps", x, v, sched, 4, noise_level=0.7, log_prob_form="squared").std.flatten()[0])
    assert cps_std == pytest.approx(s * math.sin(0.35 * math.pi))


@pytest.mark.parametrize("form", ["gaussian", "squared"])
@pytest.mark.parametrize("kind", STEP_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_path_replays_the_sampling_log_prob_exactly(kind, form, dtype):
    x, v = _inputs((3, 16, 64), dtype=dtype)
    sched = sigmas("flux", 6, image_seq_len=16)
    for index in range(6):
        sampled = step(kind, x, v, sched, index, noise_level=0.9, log_prob_form=form,
                       generator=torch.Generator().manual_seed(index))
        assert sampled.prev_sample.dtype == torch.float32
        v_train = v.clone().requires_grad_(True)
        replay = step(kind, x, v_train, sched, index, noise_level=0.9, log_prob_form=form,
                      prev_sample=sampled.prev_sample)
        assert torch.equal(replay.log_prob.detach(), sampled.log_prob)
        assert torch.equal(torch.exp(replay.log_prob.detach() - sampled.log_prob), torch.ones(3))
        if kind != "ode" and float(sampled.std.flatten()[0]) > 0:
            (grad,) = torch.autograd.grad(replay.log_prob.sum(), v_train)
            assert grad.abs().sum() > 0  # the recorded state is a constant, the mean carries the gradient


def test_any_latent_shape_and_sigmas_as_list_or_tensor():
    sched = sigmas("sd3", 10)
    for shape in [(2, 64, 64), (2, 16, 8, 8), (5,)]:
        x, v = _inputs(shape, dtype=torch.float32)
        z = torch.randn(shape)
        a = step("sde", x, v, sched, 1, noise_level=0.7, noise=z, log_prob_form="gaussian")
        b = step("sde", x, v, sched.tolist(), 1, noise_level=0.7, noise=z, log_prob_form="gaussian")
        assert a.prev_sample.shape == shape and a.log_prob.shape == (shape[0],)
        assert a.std.shape == (shape[0],) + (1,) * (len(shape) - 1)
        torch.testing.assert_close(a.prev_sample, b.prev_sample)


def test_given_noise_is_the_fresh_z():
    x, v = _inputs((2, 6))
    z = torch.randn(2, 6, dtype=torch.float64)
    out = step("sde_exact", x, v, sigmas("sd3", 10), 3, noise_level=0.7, noise=z, log_prob_form="gaussian")
    torch.testing.assert_close(out.prev_sample, out.mean + out.std * z, rtol=0, atol=0)


def test_bad_arguments_are_reported():
    x, v = _inputs((2, 3))
    sched = sigmas("sd3", 10)
    with pytest.raises(ValueError, match="ode, sde, dance, cps, sde_exact"):
        step("euler", x, v, sched, 0, noise_level=0.7, log_prob_form="gaussian")
    for index in (-1, 10, 11):
        with pytest.raises(ValueError, match="out of range"):
            step("sde", x, v, sched, index, noise_level=0.7, log_prob_form="gaussian")
    with pytest.raises(ValueError, match="gaussian, squared"):
        step("sde", x, v, sched, 0, noise_level=0.7, log_prob_form="sum")
    with pytest.raises(ValueError, match="shape"):
        step("sde", x, v[:, :2], sched, 0, noise_level=0.7, log_prob_form="gaussian")
    with pytest.raises(ValueError, match="not both"):
        step("sde", x, v, sched, 0, noise_level=0.7, noise=x, prev_sample=x, log_prob_form="gaussian")
