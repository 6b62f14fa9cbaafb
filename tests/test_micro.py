"""The micro-benchmark's job config runs end to end (a few iterations) on a quickly built shapes base model."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config_loading import load_config
from tests.jobs import run_job

ROOT = Path(__file__).resolve().parents[1]


def test_micro_config_fits_the_base_model_and_two_cores():
    cfg = load_config(ROOT / "cluster" / "micro.yaml")
    assert cfg.model.family == "sd3" and cfg.model.resolution == 64 and cfg.model.max_sequence_length == 8
    assert [s.name for s in cfg.rewards.scorers] == ["shapes"] and cfg.data.source == "shapes_train"
    assert cfg.learner.log_prob_reduction == "sum" and cfg.learner.clip_range == 0.2
    assert cfg.sampler.fast_window.size == 3 and cfg.trained_steps == 3 and cfg.sampler.same_initial_noise
    assert cfg.data.images_per_iteration // cfg.data.group_size == 8 and cfg.learner.updates_per_iteration == 1


def test_every_method_of_the_race_is_a_valid_micro_config():
    from tests.bench_helpers import load_bench

    rules = load_bench("micro").RULES
    assert {"sde", "cps", "sde_exact", "guard", "nft", "awm"} <= set(rules)
    for name, (_, overrides) in rules.items():
        cfg = load_config(ROOT / "cluster" / "micro.yaml", overrides)
        assert cfg.data == load_config(ROOT / "cluster" / "micro.yaml").data, name  # the same budget of images
    assert load_config(ROOT / "cluster" / "micro.yaml", rules["nft"][1]).trained_steps == 9
    assert load_config(ROOT / "cluster" / "micro.yaml", rules["guard"][1]).learner.ratio_norm


@pytest.fixture(scope="module")
def shapes_base(tmp_path_factory) -> Path:
    """The shapes base model at its quick settings, built once for the module's runs."""
    from rollout.shapes.base_model import quick_settings
    from tests.bench_helpers import load_bench

    base = tmp_path_factory.mktemp("shapes") / "base"
    load_bench("shapes_base").shapes_base(base, quick_settings())
    return base


@pytest.mark.slow
@pytest.mark.parametrize("method", [[], ["learner.objective=nft", "sampler.kind=ode", "sampler.fast_window=null",
                                         "sampler.same_initial_noise=false"]], ids=["grpo", "nft"])
def test_a_short_micro_run_trains_on_the_shapes_reward(shapes_base, tmp_path, method):
    rows = run_job("micro", f"model.path={shapes_base}", "iterations=2", "metrics.port=0",
                   "data.images_per_iteration=16", "learner.micro_batch_size=4", "eval.every_n_iterations=2",
                   "eval.source=shapes_heldout", "eval.batch_size=12", "checkpoint.every_n_iterations=0",
                   "sampler.num_steps=4", *(method or ["sampler.fast_window.size=2"]), out=tmp_path / "run").history
    assert [h["iteration"] for h in rows] == [1, 2] and rows[-1]["policy_version"] == 2  # 1 update per iteration
    assert set(rows[0]["rewards"]) == {"shapes"} and 0.0 <= rows[0]["rewards"]["shapes"] <= 1.0
    assert rows[-1]["samples"] == 16 and rows[-1]["eval"]["grid"].endswith("iter-000002.png")
