"""The learner's update pieces without Ray or DeepSpeed: sample order, recompute of recorded steps, loss, EMA."""

from __future__ import annotations

import pytest
import torch

from cluster.config import LoraConfig
from learner.objectives.base import StepLoss, UpdateStats
from learner.objectives.batch import batch_advantages, groups_of_rank, sample_order, sort_batch, update_plan
from learner.objectives.grpo import micro_batch, score_recorded_step, step_loss
from learner.objectives.grpo_math import policy_loss
from learner.ranks.ema import Ema, ema_decay
from rollout.models.loading import load_flow_model
from rollout.policy import adapter_disabled, add_lora
from rollout.prompts.groups import PromptGroup
from rollout.sampling.forward import score_step
from rollout.sampling.loop import RolloutSampler
from rollout.sampling.trajectory import SamplerSettings

LORA = LoraConfig(rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
SAMPLES_PER_FORWARD, NUM_STEPS = 2, 3


def _settings(family: str) -> SamplerSettings:
    """Tiny sampling: FLUX with CPS (guidance embedding), SD3 with Flow-SDE and true CFG."""
    kind, form, guidance = ("cps", "squared", 3.5) if family == "flux" else ("sde", "gaussian", 4.5)
    return SamplerSettings(kind=kind, noise_level=0.7, log_prob_form=form, guidance_scale=guidance, height=64, width=64,
                           num_steps=NUM_STEPS, samples_per_forward=SAMPLES_PER_FORWARD, trained_steps=NUM_STEPS - 1)


@pytest.fixture(scope="module")
def rollouts(tiny_model_dirs):
    """family -> a tiny model with the job's LoRA (as rollout workers hold it), its negative embeds, two groups of 4."""
    made = {}

    def get(family: str):
        if family not in made:
            model = load_flow_model(str(tiny_model_dirs[family]), family, max_sequence_length=32)
            torch.manual_seed(0)
            add_lora(model.transformer, LORA)
            sampler = RolloutSampler(model, _settings(family), run_seed=0)
            groups = [sampler.sample_group(PromptGroup(gid, f"a photo of prompt {gid}", {},
                                                       tuple(range(10 * gid, 10 * gid + 4))), policy_version=0)
                      for gid in (7, 3)]
            made[family] = model, sampler.negative, groups
        return made[family]

    return get


@pytest.fixture(params=["flux", "sd3"])
def rollout(request, rollouts):
    """Both families: FLUX (guidance embedding, CPS) and SD3 (true CFG, Flow-SDE)."""
    return rollouts(request.param)


@pytest.fixture
def flux_rollout(rollouts):
    return rollouts("flux")


def _rewards(groups):
    return [torch.linspace(0.0, 1.0, g.group_size) * (1 + g.group_id) for g in groups]


def _plan_log_probs(model, negative, groups, plan):
    """(recomputed, recorded) log-probs of every trained (sample, step), following one update plan."""
    groups, rewards = sort_batch(groups, _rewards(groups), NUM_STEPS - 1)
    adv, _ = batch_advantages(groups, rewards, std="global", clip=5.0)
    samples = sample_order(groups)
    new, old = [], []
    with torch.no_grad():
        for update in plan:
            for rank in update:
                for positions in rank:
                    mb = micro_batch(groups, [samples[i] for i in positions], adv[positions])
                    for k in range(mb.num_steps):
                        new.append(score_recorded_step(model, mb, k, negative).log_prob)
                        old.append(mb.old_log_probs[:, k])
    return torch.cat(new), torch.cat(old)


def test_recompute_with_the_rollout_layout_is_bit_exact(rollout):
    model, negative, groups = rollout
    # one update, one rank, micro-batches of samples_per_forward: each micro-batch is one rollout chunk
    plan = update_plan(8, num_updates=1, num_ranks=1, micro_batches=8 // SAMPLES_PER_FORWARD)
    new, old = _plan_log_probs(model, negative, groups, plan)
    assert new.shape == (8 * (NUM_STEPS - 1),)
    assert torch.equal(new, old)


@pytest.mark.parametrize("num_updates,num_ranks,micro_batches", [(1, 1, 8), (1, 1, 3), (2, 2, 1)])
def test_recompute_with_another_layout_is_within_1e6(rollout, num_updates, num_ranks, micro_batches):
    model, negative, groups = rollout
    plan = update_plan(8, num_updates=num_updates, num_ranks=num_ranks, micro_batches=micro_batches)
    new, old = _plan_log_probs(model, negative, groups, plan)
    ratio = torch.exp(new.double() - old.double())
    assert new.numel() == 8 * (NUM_STEPS - 1)
    assert (ratio - 1).abs().max() < 1e-6


def test_reference_with_adapter_disabled_gives_zero_kl_then_positive(flux_rollout):
    model, negative, groups = flux_rollout
    groups, rewards = sort_batch(groups, _rewards(groups), NUM_STEPS - 1)
    adv, _ = batch_advantages(groups, rewards, std="global", clip=5.0)
    mb = micro_batch(groups, sample_order(groups)[:3], adv[:3])
    with torch.no_grad(), adapter_disabled(model.transformer):
        reference = score_recorded_step(model, mb, 1, negative).mean
    scored = score_recorded_step(model, mb, 1, negative)
    _, _, kl_start, _ = step_loss(scored, mb, 1, clip_range=1e-4, kl_beta=0.04, reference_mean=reference)
    assert float(kl_start.detach()) == 0.0  # B = 0: the policy is the reference

    lora_b = [p for n, p in model.transformer.named_parameters() if "lora_B" in n]
    saved = [p.detach().clone() for p in lora_b]
    try:
        with torch.no_grad():
            for p in lora_b:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
        scored = score_recorded_step(model, mb, 1, negative)
        with torch.no_grad(), adapter_disabled(model.transformer):
            assert torch.equal(score_recorded_step(model, mb, 1, negative).mean, reference)
        loss, policy, kl_after, _ = step_loss(scored, mb, 1, clip_range=1e-4, kl_beta=0.04, reference_mean=reference)
        assert float(kl_after.detach()) > 0.0
        assert torch.allclose(loss, policy + 0.04 * kl_after)

        model.transformer.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad for n, p in model.transformer.named_parameters()}
        assert all(g is None for n, g in grads.items() if "lora_" not in n)  # the base weights get no gradient
        assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if "lora_" in n)
    finally:
        with torch.no_grad():
            for p, s in zip(lora_b, saved):
                p.copy_(s)
        model.transformer.zero_grad(set_to_none=True)


def test_mixed_step_indices_are_scored_per_index_and_kept_in_order(flux_rollout):
    model, negative, groups = flux_rollout
    groups, rewards = sort_batch(groups, _rewards(groups), NUM_STEPS - 1)
    adv, _ = batch_advantages(groups, rewards, std="global", clip=5.0)
    samples = sample_order(groups)
    picked = [samples[1], samples[5], samples[2]]  # two groups
    mb = micro_batch(groups, picked, adv[[1, 5, 2]])
    # pretend the second sample recorded other steps (a Fast window elsewhere): slot 0 then mixes indices 0 and 1
    shifted = mb.step_indices.clone()
    shifted[1] = torch.tensor([1, 0])
    mixed = type(mb)(**{**mb.__dict__, "step_indices": shifted})
    with torch.no_grad():
        out = score_recorded_step(model, mixed, 0, negative)
        first, third = (score_recorded_step(model, micro_batch(groups, [samples[i]], adv[[i]]), 0, negative)
                        for i in (1, 2))
        g, _ = picked[1]
        second_at_1 = score_step(model, mb.settings, mb.sigmas, 1, mb.states[1:2, 0], mb.next_states[1:2, 0],
                                 groups[g].prompt_embeds, negative)
    assert (out.log_prob[0] - first.log_prob[0]).abs() < 1e-6
    assert (out.log_prob[2] - third.log_prob[0]).abs() < 1e-6
    assert (out.log_prob[1] - second_at_1.log_prob[0]).abs() < 1e-6
    assert (out.log_prob[1] - score_recorded_step(model, mb, 0, negative).log_prob[1]).abs() > 1e-3  # index 0 differs


def test_update_plan_is_round_robin_over_updates_and_contiguous_over_ranks():
    plan = update_plan(12, num_updates=2, num_ranks=2, micro_batches=2)
    assert plan[0] == [[[0, 2], [4]], [[6, 8], [10]]]
    assert plan[1] == [[[1, 3], [5]], [[7, 9], [11]]]
    flat = sorted(i for u in plan for r in u for m in r for i in m)
    assert flat == list(range(12))
    assert update_plan(8, num_updates=1, num_ranks=1, micro_batches=4) == [[[[0, 1], [2, 3], [4, 5], [6, 7]]]]


def test_update_plan_keeps_the_micro_batch_count_when_samples_are_dropped():
    keep = torch.tensor([0, 2, 3, 5, 6, 7])  # samples 1 and 4 dropped
    plan = update_plan(8, num_updates=1, num_ranks=1, micro_batches=4, keep=keep)
    assert plan == [[[[0, 2], [3, 5], [6], [7]]]]
    with pytest.raises(ValueError, match="cannot fill"):
        update_plan(8, num_updates=2, num_ranks=2, micro_batches=2, keep=keep)


def test_batch_is_sorted_by_group_id_and_checked(flux_rollout):
    _, _, groups = flux_rollout
    rewards = _rewards(groups)
    ordered, ordered_rewards = sort_batch(groups, rewards, NUM_STEPS - 1)
    assert [g.group_id for g in ordered] == [3, 7]
    assert torch.equal(ordered_rewards[0], rewards[1].double())
    adv_a, stats = batch_advantages(ordered, ordered_rewards, std="global", clip=5.0)
    reversed_groups, reversed_rewards = sort_batch(groups[::-1], rewards[::-1], NUM_STEPS - 1)
    assert torch.equal(adv_a, batch_advantages(reversed_groups, reversed_rewards, std="global", clip=5.0)[0])
    assert stats["zero_std_group_frac"] == 0.0 and abs(stats["advantage_mean"]) < 1e-6
    flat_groups, flat_rewards = sort_batch(groups, [torch.ones(4), rewards[1]], NUM_STEPS - 1)
    assert batch_advantages(flat_groups, flat_rewards, std="global", clip=5.0)[1]["zero_std_group_frac"] == 1 / 2
    with pytest.raises(ValueError, match="3 rewards for 4 samples"):
        sort_batch(groups, [r[:3] for r in rewards], NUM_STEPS - 1)
    with pytest.raises(ValueError, match="non-finite"):
        sort_batch(groups, [torch.tensor([0.0, float("nan"), 1.0, 2.0])] + rewards[1:], NUM_STEPS - 1)
    with pytest.raises(ValueError, match="records 2 steps but the learner trains 3"):
        sort_batch(groups, rewards, 3)
    with pytest.raises(ValueError, match="repeat"):
        sort_batch([groups[0], groups[0]], rewards[:2], NUM_STEPS - 1)


def test_update_stats_match_policy_loss_statistics():
    torch.manual_seed(0)
    old = torch.randn(6)
    new = old + 1e-4 * torch.randn(6)
    adv = torch.randn(6)
    expected = policy_loss(new, old, adv, clip_range=1e-4)[1].means()
    stats = UpdateStats()
    loss = torch.tensor(0.5)
    for part in (slice(0, 4), slice(4, 6)):  # two calls, as two (micro-batch, step) calls of one update add up
        ratio = policy_loss(new[part], old[part], adv[part], clip_range=1e-4)[1]
        stats.add(StepLoss(loss, loss, torch.tensor(0.0), ratio))
    summary = stats.summary()
    for key in ("clip_frac", "ratio_mean", "ratio_std", "approx_kl"):
        assert summary[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-12), key
    assert summary["loss"] == 0.5
    assert summary["ratio_max_dev"] == pytest.approx(float((torch.exp(new.double() - old.double()) - 1).abs().max()))


def test_ema_decay_schedule_matches_hand_computed_values():
    assert [ema_decay(n) for n in (0, 1, 2, 8)] == [pytest.approx(v) for v in (1 / 10, 2 / 11, 3 / 12, 9 / 18)]
    assert ema_decay(79) == pytest.approx(80 / 89) and ema_decay(80) == 0.9 and ema_decay(1000) == 0.9

    ema = Ema({"w": torch.tensor([0.0, 2.0], dtype=torch.bfloat16)})
    assert ema.weights["w"].dtype == torch.float32
    assert ema.update({"w": torch.tensor([1.0, 0.0])}) == pytest.approx(0.1)
    assert torch.allclose(ema.weights["w"], torch.tensor([0.9, 0.2]))
    ema.update({"w": torch.tensor([1.0, 1.0])})
    expected = torch.tensor([2 / 11 * 0.9 + 9 / 11, 2 / 11 * 0.2 + 9 / 11])
    assert torch.allclose(ema.weights["w"], expected)
    restored = Ema({"w": torch.zeros(2)})
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 2 and torch.equal(restored.weights["w"], ema.weights["w"])
    with pytest.raises(ValueError, match="other tensors"):
        ema.update({"v": torch.zeros(2)})


def test_each_rank_fetches_the_groups_of_its_own_samples_only():
    samples = [(g, i) for g in range(4) for i in range(4)]  # 4 groups of 4, in batch order
    two = update_plan(16, num_updates=1, num_ranks=2, micro_batches=2)  # samples 0-7 and 8-15
    assert [groups_of_rank(two, samples, r) for r in range(2)] == [[0, 1], [2, 3]]
    # round-robin over 2 updates: update 0 holds samples 0, 2, .., 14; each rank takes a half of each update
    assert [groups_of_rank(update_plan(16, num_updates=2, num_ranks=2, micro_batches=1), samples, r)
            for r in range(2)] == [[0, 1], [2, 3]]
    three = update_plan(16, num_updates=1, num_ranks=3, micro_batches=1)  # runs of 6, 5, 5 samples
    assert [groups_of_rank(three, samples, r) for r in range(3)] == [[0, 1], [1, 2], [2, 3]]
