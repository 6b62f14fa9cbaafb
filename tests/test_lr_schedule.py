"""Learning-rate schedules: the decay against transformers' own schedules, the warm-up by hand, the config's refusal,
and a DeepSpeed learner that really steps with the scheduled rate."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from cluster.config import PoolConfig
from cluster.config_loading import ConfigError, validate_config
from learner.ranks.actor import LearnerActor
from learner.ranks.lr_schedule import lr_at
from learner.ranks.process_group import RankGroup
from test_learner_group import _train, sample_batch

LR, WARMUP, TOTAL = 2e-3, 3, 11


@pytest.mark.parametrize("schedule,factory", [("linear", get_linear_schedule_with_warmup),
                                              ("cosine", get_cosine_schedule_with_warmup)])
def test_decay_after_the_warm_up_equals_transformers(schedule, factory):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    reference = factory(optimizer, num_warmup_steps=WARMUP, num_training_steps=TOTAL)
    for k in range(TOTAL):
        if k >= WARMUP:  # transformers' warm-up starts from 0 (lr·k/W); ours from lr/W
            assert lr_at(k, lr=LR, schedule=schedule, warmup=WARMUP, total=TOTAL) == pytest.approx(
                optimizer.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        optimizer.step()
        reference.step()


def test_warm_up_and_constant_by_hand():
    got = [lr_at(k, lr=LR, schedule="constant", warmup=WARMUP, total=TOTAL) for k in range(5)]
    assert got == pytest.approx([LR / 3, 2 * LR / 3, LR, LR, LR])
    assert lr_at(0, lr=LR, schedule="cosine", warmup=0, total=4) == LR
    assert lr_at(2, lr=LR, schedule="cosine", warmup=0, total=4) == pytest.approx(LR * (1 + math.cos(math.pi / 2)) / 2)
    assert lr_at(3, lr=LR, schedule="linear", warmup=0, total=4) == pytest.approx(LR / 4)


def _config(model_dir, **learner):
    return validate_config(dict(
        run_name="lr-test", iterations=4,
        model=dict(family="flux", path=str(model_dir), dtype="float32", resolution=64, max_sequence_length=32),
        sampler=dict(kind="cps", noise_level=0.9, num_steps=3, guidance_scale=3.5),
        rollout=dict(samples_per_forward=2),
        rewards=dict(scorers=[dict(name="jpeg_compressibility")]),
        learner=dict(num_actors=1, num_cpus_per_actor=0.5, zero_stage=2, precision="fp32",
                     lora={"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
                     kl_beta=0.04, clip_range=1e-4, updates_per_iteration=1, micro_batch_size=2,
                     ema=dict(enabled=True, every=1), **learner),
        data=dict(group_size=4, images_per_iteration=8),
    ))


def test_a_warm_up_longer_than_the_job_is_refused(tiny_model_dirs):
    with pytest.raises(ConfigError, match="lr_warmup_updates = 4: the warm-up must end before"):
        _config(tiny_model_dirs["flux"], lr=1e-3, lr_warmup_updates=4)


@pytest.mark.slow
def test_the_learner_steps_with_the_scheduled_rate_and_resumes_it(ray_local, tiny_model_dirs):
    """Warm-up over 2 updates at lr 2e-3 trains exactly as a constant 1e-3 for the first update; a learner resumed
    after it continues the schedule as the uninterrupted one does."""
    ray = ray_local
    scheduled = dict(lr=2e-3, lr_schedule="cosine", lr_warmup_updates=2)
    groups = {}
    for name, learner in (("constant", dict(lr=1e-3)), ("cosine", scheduled), ("resumed", scheduled)):
        group = RankGroup(LearnerActor, PoolConfig(num_actors=1, num_cpus_per_actor=0.5))
        ray.get(group.run("setup", _config(tiny_model_dirs["flux"], **learner)))
        groups[name] = group
    sample = sample_batch(tiny_model_dirs["flux"])
    first = {name: _train(ray, groups[name], sample, 1)[0] for name in ("constant", "cosine")}
    assert first["constant"]["updates"][0]["lr"] == 1e-3 and first["cosine"]["updates"][0]["lr"] == 1e-3
    for k, v in first["constant"]["weights"].items():
        assert torch.equal(v, first["cosine"]["weights"][k]), k

    state = ray.get(groups["cosine"].run("state"))[0]
    later = _train(ray, groups["cosine"], sample, 3)  # k = 1 (warm-up), 2 (p = 0), 3 (p = 1/2 of T - W = 2)
    assert [r["updates"][0]["lr"] for r in later] == pytest.approx([2e-3, 2e-3, 2e-3 * (1 + math.cos(math.pi / 2)) / 2])
    ray.get(groups["resumed"].run("load_state", state))
    resumed = _train(ray, groups["resumed"], sample, 3)
    assert [r["updates"] for r in resumed] == [r["updates"] for r in later]
    for group in groups.values():
        group.kill()
