"""`learner.log_prob_reduction: sum` trains on the log-density summed over the latent, not its per-element mean."""

from types import SimpleNamespace

import torch

from learner.objectives.grpo import step_loss
from rollout.sampling.steps import step


def test_sum_reduction_is_the_summed_gaussian_log_density():
    torch.manual_seed(0)
    b, shape = 3, (4, 5)
    d = 4 * 5
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.0], dtype=torch.float64)
    x = torch.randn(b, *shape, dtype=torch.float64)
    v_old, v_new = torch.randn_like(x), torch.randn_like(x)
    old = step("sde", x, v_old, sigmas, 1, noise_level=0.7, generator=torch.Generator().manual_seed(1),
               log_prob_form="gaussian")
    new = step("sde", x, v_new * 0.999 + v_old * 0.001, sigmas, 1, noise_level=0.7, prev_sample=old.prev_sample,
               log_prob_form="gaussian")
    advantages = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mb = SimpleNamespace(old_log_probs=old.log_prob[:, None], advantages=advantages,
                         settings=SimpleNamespace(log_prob_form="gaussian"))

    loss, policy, _, _ = step_loss(new, mb, 0, clip_range=0.2, kl_beta=0.0, log_prob_scale=float(d))

    def summed(mean):
        return torch.distributions.Normal(mean, float(old.std.flatten()[0])).log_prob(old.prev_sample).sum(dim=(1, 2))

    ratio = torch.exp(summed(new.mean) - summed(old.mean))
    expected = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2)).mean()
    assert torch.allclose(policy, expected, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3)  # the case is not trivial
    # the mean reduction (scale 1) is a different, much flatter objective
    _, policy_mean, _, _ = step_loss(new, mb, 0, clip_range=0.2, kl_beta=0.0)
    assert not torch.allclose(policy_mean, expected)


def test_sum_reduction_sums_the_kl_over_the_latent_too():
    """With `sum`, β multiplies the KL of the whole step distribution (summed over D), as the ratio is whole too."""
    torch.manual_seed(0)
    b, shape = 3, (4, 5)
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.0], dtype=torch.float64)
    x = torch.randn(b, *shape, dtype=torch.float64)
    ref = step("sde", x, torch.randn_like(x), sigmas, 1, noise_level=0.7, generator=torch.Generator().manual_seed(1),
               log_prob_form="gaussian")
    new = step("sde", x, torch.randn_like(x), sigmas, 1, noise_level=0.7, prev_sample=ref.prev_sample,
               log_prob_form="gaussian")
    mb = SimpleNamespace(old_log_probs=new.log_prob[:, None].detach(), advantages=torch.zeros(b, dtype=torch.float64),
                         settings=SimpleNamespace(log_prob_form="gaussian"))
    sigma = torch.as_tensor(new.noise_scale, dtype=torch.float64).reshape(-1)
    # the KL's σ: the step's noise scale σ_t, without √Δ (docs/math.md "Log-probabilities and KL")
    sigma = sigma.expand(b).reshape(b, 1, 1)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(new.mean, sigma),
                                                 torch.distributions.Normal(ref.mean, sigma)).sum(dim=(1, 2)).mean()

    loss, policy, kl_sum, _ = step_loss(new, mb, 0, clip_range=0.2, kl_beta=0.5, reference_mean=ref.mean,
                                     log_prob_scale=float(4 * 5))
    assert torch.allclose(kl_sum, expected, rtol=1e-9)
    assert torch.allclose(loss, policy + 0.5 * expected, rtol=1e-9)
    _, _, kl_mean, _ = step_loss(new, mb, 0, clip_range=0.2, kl_beta=0.5, reference_mean=ref.mean)
    assert torch.allclose(kl_mean, expected / 20, rtol=1e-9)  # `mean`: the per-element average
