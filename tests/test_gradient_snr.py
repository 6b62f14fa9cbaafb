"""bench/micro_snr.py's estimator of a gradient's signal and noise, against closed forms for Gaussian gradients."""

from __future__ import annotations

import math

import pytest
import torch

from tests.bench_helpers import load_bench

micro_snr = load_bench("micro_snr")


def test_the_estimates_are_the_pairwise_products_and_the_sample_variance():
    g = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 1.0
    r = micro_snr.signal_to_noise(g, batch_groups=8)
    pairs = [float(g[i] @ g[j]) for i in range(7) for j in range(7) if i != j]
    assert r["mu2"] > 0
    assert math.isclose(r["mu2"], sum(pairs) / len(pairs), rel_tol=1e-12)
    assert math.isclose(r["S"], float(g.var(0, correction=1).sum()), rel_tol=1e-12)
    assert math.isclose(r["snr"], 8 * r["mu2"] / r["S"], rel_tol=1e-12)
    assert math.isclose(r["groups_for_snr1"], r["S"] / r["mu2"], rel_tol=1e-12)
    assert math.isclose(r["cosine"], r["snr"] / (1 + r["snr"]), rel_tol=1e-12)


def test_gaussian_gradients_give_the_true_signal_noise_and_spread():
    # g_j ~ N(μ, σ²I) in P dimensions: E[mu2] = |μ|², E[S] = Pσ², and the estimator's variance is
    # 4 μᵀΣμ / J + 2 tr(Σ²) / (J(J − 1)) (the U-statistic of the pairwise products).
    P, J, sigma, trials = 50, 50, 1.0, 400
    mu = torch.zeros(P, dtype=torch.float64)
    mu[:4] = 1.0  # |μ|² = 4
    gen = torch.Generator().manual_seed(1)
    estimates, ses, noises = [], [], []
    for _ in range(trials):
        g = mu + sigma * torch.randn(J, P, generator=gen, dtype=torch.float64)
        r = micro_snr.signal_to_noise(g, batch_groups=J)
        estimates.append(r["mu2"])
        ses.append(r["mu2_se"])
        noises.append(r["S"])
    true_sd = math.sqrt(4 * sigma**2 * 4 / J + 2 * P * sigma**4 / (J * (J - 1)))
    est = torch.tensor(estimates)
    assert abs(float(est.mean()) - 4.0) < 4 * true_sd / math.sqrt(trials)
    assert abs(float(est.std()) / true_sd - 1) < 0.15
    assert abs(sum(ses) / trials / true_sd - 1) < 0.15
    assert abs(sum(noises) / trials / (P * sigma**2) - 1) < 0.01


def test_no_signal_reads_as_no_batch_reaching_snr_one():
    g = torch.randn(40, 30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = torch.cat([g, -g])  # the mean is exactly 0, so the unbiased |μ|² is negative
    r = micro_snr.signal_to_noise(g, batch_groups=8)
    assert r["mu2"] < 0 and r["groups_for_snr1"] == math.inf and math.isnan(r["cosine"])


@pytest.mark.parametrize("overrides", [
    ["sampler.antithetic=true", "sampler.fast_window.size=2"],
    ["learner.objective=nft", "sampler.kind=ode", "sampler.fast_window=null", "sampler.same_initial_noise=false"],
    ["learner.objective=awm", "sampler.kind=ode", "sampler.fast_window=null", "sampler.same_initial_noise=false"],
], ids=["grpo-antithetic", "nft", "awm"])
def test_per_group_gradients_of_each_objective_on_a_quick_base_model(tmp_path, overrides, one_thread):
    from cluster.config_loading import load_config
    from rollout.models.loading import load_flow_model
    from rollout.shapes.base_model import quick_settings
    from rollout.policy import add_lora

    load_bench("shapes_base").shapes_base(tmp_path / "base", quick_settings())
    cfg = load_config(micro_snr.CONFIG, [f"model.path={tmp_path / 'base'}", "data.group_size=4",
                                         "data.images_per_iteration=16", "learner.micro_batch_size=4",
                                         "sampler.num_steps=4", *overrides])
    model = load_flow_model(cfg.model.path, "sd3", max_sequence_length=cfg.model.max_sequence_length)
    torch.manual_seed(0)
    add_lora(model.transformer, cfg.learner.lora)
    for name, p in model.transformer.named_parameters():  # B ≠ 0, so that every LoRA tensor gets a gradient
        if p.requires_grad and "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    g, stats = micro_snr.group_gradients(cfg, model, params, groups=4)
    assert g.shape == (4, sum(p.numel() for p in params)) and torch.isfinite(g).all()
    assert (g.norm(dim=1) > 0).any() or stats["zero_std_group_frac"] == 1.0  # a group with no reward spread: 0
