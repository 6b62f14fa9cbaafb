"""The DeepSpeed learner as Ray actors on CPU: one rank end to end, resume from its state, two ranks against one."""

from __future__ import annotations

import pytest
import torch

from cluster.config import PoolConfig
from cluster.config_loading import validate_config
from learner.objectives.batch import batch_advantages, sample_order, sort_batch, update_plan
from learner.objectives.grpo import micro_batch, score_recorded_step, step_loss
from learner.ranks.actor import LearnerActor
from learner.ranks.engine import deepspeed_config
from learner.ranks.process_group import RankGroup
from rollout.models.loading import load_flow_model
from rollout.policy import adapter_disabled, add_lora
from rollout.prompts.groups import PromptGroup
from rollout.sampling.loop import RolloutSampler
from rollout.sampling.trajectory import SamplerSettings
from rollout.weights import fetch_state, weight_store

LORA = {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def _config(model_dir, *, num_actors: int, micro_batch_size: int):
    """Tiny FLUX, CPS with 3 steps (2 trained), groups of 4 sampled in chunks of 2, 8 images per iteration."""
    return validate_config(dict(
        run_name="learner-test",
        model=dict(family="flux", path=str(model_dir), dtype="float32", resolution=64, max_sequence_length=32),
        sampler=dict(kind="cps", noise_level=0.9, num_steps=3, guidance_scale=3.5),
        rollout=dict(samples_per_forward=2),
        rewards=dict(scorers=[dict(name="jpeg_compressibility")]),
        learner=dict(num_actors=num_actors, num_cpus_per_actor=0.5, zero_stage=2, precision="fp32", lora=LORA,
                     lr=1e-3, kl_beta=0.04, clip_range=1e-4, updates_per_iteration=1, micro_batch_size=micro_batch_size,
                     ema=dict(enabled=True, every=1)),
        data=dict(group_size=4, images_per_iteration=8),
    ))


@pytest.fixture(scope="module")
def batch(tiny_model_dirs):
    return sample_batch(tiny_model_dirs["flux"])


def sample_batch(model_dir):
    """Two groups sampled as a rollout worker does (the job's LoRA, version 0) and their rewards."""
    cfg = _config(model_dir, num_actors=1, micro_batch_size=2)
    model = load_flow_model(cfg.model.path, "flux", max_sequence_length=32)
    torch.manual_seed(123)  # the worker's adapter differs from the learner's; B = 0 makes both the base model
    add_lora(model.transformer, cfg.learner.lora)
    sampler = RolloutSampler(model, SamplerSettings.from_config(cfg), run_seed=0)
    groups = [sampler.sample_group(PromptGroup(gid, f"prompt {gid}", {}, tuple(range(10 * gid, 10 * gid + 4))), 0)
              for gid in (4, 1)]
    rewards = [torch.tensor([0.1, 0.5, 0.3, 0.9]), torch.tensor([0.2, 0.2, 0.7, 0.0])]
    return groups, rewards


def _train(ray, group, batch, iterations):
    """Run iterations on all ranks; per iteration rank 0's metrics, the weights after it and every rank's updates."""
    refs = ray.put(batch[0]), ray.put(batch[1])
    results = []
    for _ in range(iterations):
        per_rank = ray.get(group.run("train_iteration", *refs))
        results.append({**per_rank[0], "weights": ray.get(group.run("trainable_state"))[0],
                        "rank_updates": [r["updates"] for r in per_rank]})
    return results


@pytest.fixture(scope="module")
def one_rank(ray_local, tiny_model_dirs, batch):
    """One learner rank (ZeRO-2, fp32, LoRA, β = 0.04) trained for two iterations, with what it published."""
    ray = ray_local
    cfg = _config(tiny_model_dirs["flux"], num_actors=1, micro_batch_size=2)
    store = weight_store("test-learner-one-rank")
    group = RankGroup(LearnerActor, PoolConfig(num_actors=1, num_cpus_per_actor=0.5))
    info = ray.get(group.run("setup", cfg, store=store))[0]
    initial = ray.get(group.run("trainable_state"))[0]
    first = _train(ray, group, batch, 1)[0]
    version, refs, metas = ray.get(store.latest.remote())
    published = (version, fetch_state((refs, metas)))
    state_after_first = ray.get(group.run("state"))[0]
    second = _train(ray, group, batch, 1)[0]
    yield dict(cfg=cfg, group=group, info=info, initial=initial, first=first, second=second, published=published,
               state_after_first=state_after_first, ema=ray.get(group.run("state"))[0]["ema"]["weights"],
               counters=ray.get(group.run("counters"))[0])
    group.kill()
    ray.kill(store)


@pytest.mark.slow
def test_one_rank_trains_the_lora_and_publishes_it(one_rank):
    info, initial, first, second = one_rank["info"], one_rank["initial"], one_rank["first"], one_rank["second"]
    assert info["gradient_accumulation_steps"] == 4 * 2  # 4 micro-batches of 2 x 2 trained steps
    assert initial and all(".lora_A." in k or ".lora_B." in k for k in initial)
    assert all(float(v.abs().sum()) == 0.0 for k, v in initial.items() if ".lora_B." in k)

    update = first["updates"][0]
    # micro-batch = rollout chunk, same samples and order: the recomputed log-probs are the recorded ones
    assert update["ratio_mean"] == 1.0 and update["ratio_std"] == 0.0 and update["ratio_max_dev"] == 0.0
    assert update["clip_frac"] == 0.0 and update["kl"] == 0.0  # B = 0: the policy is the reference
    assert update["step_applied"] == 1.0 and 0.0 < update["grad_norm"] < float("inf")
    assert first["policy_version"] == 1 and first["published"] == 1 and first["samples"] == 8

    changed = [k for k in initial if not torch.equal(initial[k], first["weights"][k])]
    assert any(".lora_B." in k for k in changed)

    version, state = one_rank["published"]
    assert version == 1 and state.keys() == first["weights"].keys()
    assert all(torch.equal(state[k], first["weights"][k]) for k in state)

    later = second["updates"][0]
    assert second["policy_version"] == 2 and second["published"] == 2
    assert later["kl"] > 0.0 and later["ratio_max_dev"] > 0.0
    assert one_rank["counters"] == {"optimizer_steps": 2, "iterations": 2, "ema_updates": 2}


@pytest.mark.slow
def test_gradient_is_the_mean_over_micro_batches_and_steps(one_rank, batch):
    """DeepSpeed divides by its M·K accumulation count once: the first update's norm is that of the plain mean loss."""
    cfg = one_rank["cfg"]
    model = load_flow_model(cfg.model.path, "flux", parts=("transformer",), max_sequence_length=32)
    torch.manual_seed(cfg.seed)  # the learner's initial adapter
    model.transformer.requires_grad_(False)
    add_lora(model.transformer, cfg.learner.lora)
    groups, rewards = sort_batch(*batch, cfg.trained_steps)
    adv, _ = batch_advantages(groups, rewards, std="global", clip=5.0)
    samples = sample_order(groups)
    [[micro_batches]] = update_plan(len(samples), num_updates=1, num_ranks=1, micro_batches=4)
    calls = [(micro_batch(groups, [samples[i] for i in positions], adv[positions]), k)
             for positions in micro_batches for k in range(cfg.trained_steps)]
    total = 0.0
    for mb, k in calls:
        with torch.no_grad(), adapter_disabled(model.transformer):
            reference = score_recorded_step(model, mb, k, None).mean
        scored = score_recorded_step(model, mb, k, None)
        total = total + step_loss(scored, mb, k, clip_range=1e-4, kl_beta=0.04, reference_mean=reference)[0] / len(calls)
    total.backward()
    norm = torch.cat([p.grad.reshape(-1) for p in model.transformer.parameters() if p.grad is not None]).norm()
    assert one_rank["first"]["updates"][0]["grad_norm"] == pytest.approx(float(norm), rel=1e-4)


@pytest.mark.slow
def test_ema_follows_the_decay_schedule_over_updates(one_rank):
    w0, w1, w2 = one_rank["initial"], one_rank["first"]["weights"], one_rank["second"]["weights"]
    ema = one_rank["ema"]
    for k in w0:  # decays 1/10 then 2/11
        expected = 2 / 11 * (0.1 * w0[k] + 0.9 * w1[k]) + 9 / 11 * w2[k]
        assert torch.allclose(ema[k], expected, rtol=1e-6, atol=1e-9), k


@pytest.mark.slow
def test_loading_a_state_resumes_exactly(ray_local, one_rank, batch):
    group = one_rank["group"]
    ray_local.get(group.run("load_state", one_rank["state_after_first"]))
    assert ray_local.get(group.run("counters"))[0]["optimizer_steps"] == 1
    again = _train(ray_local, group, batch, 1)[0]
    assert again["updates"] == one_rank["second"]["updates"]
    assert all(torch.equal(again["weights"][k], one_rank["second"]["weights"][k]) for k in again["weights"])


@pytest.mark.slow
def test_two_ranks_train_the_same_lora_as_one(ray_local, one_rank, tiny_model_dirs, batch):
    one_rank["group"].kill()
    cfg = _config(tiny_model_dirs["flux"], num_actors=2, micro_batch_size=2)
    assert deepspeed_config(cfg, cfg.trained_steps)["gradient_accumulation_steps"] == 2 * 2  # each rank: 2 micro-batches x 2 steps
    group = RankGroup(LearnerActor, PoolConfig(num_actors=2, num_cpus_per_actor=0.5))
    try:
        ray_local.get(group.run("setup", cfg))
        first, second = _train(ray_local, group, batch, 2)
    finally:
        group.kill()
    assert first["rank_updates"][0] == first["rank_updates"][1]  # reduced over ranks: the same on every rank
    assert first["updates"][0]["ratio_max_dev"] == 0.0  # each rank's micro-batches are still rollout chunks
    reference = one_rank["first"]["weights"], one_rank["second"]["weights"]
    for got, want in zip((first["weights"], second["weights"]), reference):
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-7), k
    assert first["updates"][0]["grad_norm"] == pytest.approx(one_rank["first"]["updates"][0]["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_a_nonfinite_update_is_skipped_on_every_rank_alike(ray_local, tiny_model_dirs, batch):
    """A NaN recorded log-prob in one sample of rank 1 only: both ranks skip the update (DeepSpeed's overflow check is
    all-reduced), weights, optimizer moments and version stay as they were, and the next clean update applies."""
    import dataclasses

    cfg = _config(tiny_model_dirs["flux"], num_actors=2, micro_batch_size=2)
    groups, rewards = sort_batch(*batch, cfg.trained_steps)
    samples = sample_order(groups)
    [plan] = update_plan(len(samples), num_updates=1, num_ranks=2, micro_batches=2)
    g, i = samples[plan[1][0][0]]  # the first sample of rank 1's first micro-batch
    log_probs = groups[g].log_probs.clone()
    log_probs[i, 0] = float("nan")
    poisoned = list(groups)
    poisoned[g] = dataclasses.replace(groups[g], log_probs=log_probs)
    assert (g, i) not in {samples[q] for micro in plan[0] for q in micro}  # rank 0 never sees the NaN

    group = RankGroup(LearnerActor, PoolConfig(num_actors=2, num_cpus_per_actor=0.5))
    try:
        ray_local.get(group.run("setup", cfg))
        _train(ray_local, group, batch, 1)  # a clean update first: the optimizer has moments to keep
        before = ray_local.get(group.run("state"))
        bad = ray_local.get(group.run("train_iteration", ray_local.put(poisoned), ray_local.put(rewards)))
        after = ray_local.get(group.run("state"))
        good = _train(ray_local, group, batch, 1)[0]
    finally:
        group.kill()
    for rank in range(2):
        [update] = bad[rank]["updates"]
        assert update["step_applied"] == 0.0 and bad[rank]["policy_version"] == 1
        assert after[rank]["counters"]["optimizer_steps"] == 1
        for k, v in before[rank]["weights"].items():
            assert torch.equal(after[rank]["weights"][k], v), k
        moments = [(b, a) for b, a in zip(_tensors(before[rank]["optimizer"]), _tensors(after[rank]["optimizer"]))]
        assert moments and all(torch.equal(b, a) for b, a in moments)
    assert good["updates"][0]["step_applied"] == 1.0 and good["policy_version"] == 2


@pytest.mark.slow
def test_a_record_lost_before_one_rank_fetched_it_stops_every_rank_before_the_update(ray_local, tiny_model_dirs,
                                                                                     batch):
    """Rank 1's group comes by a reference whose owner is gone (as a record on a node that left): both ranks answer
    the lost group and train nothing, though rank 0's record is there."""
    from rollout.sampled import SampledGroup
    from tests.reward_helpers import ImageHolder

    cfg = _config(tiny_model_dirs["flux"], num_actors=2, micro_batch_size=2)
    groups, rewards = sort_batch(*batch, cfg.trained_steps)  # group 1 is rank 0's, group 4 rank 1's
    holder = ray_local.remote(num_cpus=0)(ImageHolder).remote()
    [lost] = ray_local.get(holder.put.remote(groups[1].without_images()))
    ray_local.kill(holder)
    with pytest.raises(ray_local.exceptions.RayActorError):
        ray_local.get(holder.put.remote(None), timeout=60)
    sampled = [SampledGroup(groups[0].summary(), ray_local.put(groups[0].without_images()), None),
               SampledGroup(groups[1].summary(), lost, None)]
    group = RankGroup(LearnerActor, PoolConfig(num_actors=2, num_cpus_per_actor=0.5))
    try:
        ray_local.get(group.run("setup", cfg))
        before = ray_local.get(group.run("state"))
        answers = ray_local.get(group.run("train_iteration", sampled, rewards))
        after = ray_local.get(group.run("state"))
    finally:
        group.kill()
    assert answers == [{"lost_groups": [groups[1].group_id], "policy_version": 0}] * 2
    for rank in range(2):
        assert after[rank]["counters"] == before[rank]["counters"]
        for k, v in before[rank]["weights"].items():
            assert torch.equal(after[rank]["weights"][k], v), k


def _tensors(tree) -> list[torch.Tensor]:
    """Every tensor of a nested optimizer state, in order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


@pytest.mark.slow
def test_zero3_with_true_cfg_recomputes_exactly_and_publishes_the_gathered_lora(ray_local, tiny_model_dirs):
    cfg = validate_config(dict(
        run_name="learner-test-zero3",
        model=dict(family="sd3", path=str(tiny_model_dirs["sd3"]), dtype="float32", resolution=64,
                   max_sequence_length=32),
        sampler=dict(kind="sde", noise_level=0.7, num_steps=3, guidance_scale=4.5),
        rollout=dict(samples_per_forward=4),
        rewards=dict(scorers=[dict(name="jpeg_compressibility")]),
        learner=dict(num_actors=1, num_cpus_per_actor=0.5, zero_stage=3, precision="fp32", lora=LORA, lr=1e-3,
                     kl_beta=0.04, updates_per_iteration=1, micro_batch_size=4),
        data=dict(group_size=4, images_per_iteration=4),
    ))
    model = load_flow_model(cfg.model.path, "sd3", max_sequence_length=32)
    add_lora(model.transformer, cfg.learner.lora)
    sampler = RolloutSampler(model, SamplerSettings.from_config(cfg), run_seed=0)
    groups = [sampler.sample_group(PromptGroup(9, "a red cube", {}, (1, 2, 3, 4)), 0)]
    store = weight_store("test-learner-zero3")
    group = RankGroup(LearnerActor, PoolConfig(num_actors=1, num_cpus_per_actor=0.5))
    try:
        ray_local.get(group.run("setup", cfg, negative=sampler.negative, store=store))
        initial = ray_local.get(group.run("trainable_state"))[0]
        result = _train(ray_local, group, (groups, [torch.tensor([0.0, 1.0, 0.5, 0.2])]), 1)[0]
        version, refs, metas = ray_local.get(store.latest.remote())
        published = fetch_state((refs, metas))  # while its owner, the learner rank, lives
    finally:
        group.kill()
        ray_local.kill(store)
    update = result["updates"][0]
    assert update["ratio_max_dev"] == 0.0 and update["kl"] == 0.0 and update["step_applied"] == 1.0
    assert version == 1 and published.keys() == initial.keys()
    assert all(torch.equal(published[k], result["weights"][k]) for k in published)
    assert any(not torch.equal(initial[k], published[k]) for k in initial)


@pytest.mark.slow
def test_full_fine_tuning_is_published_in_buckets_and_the_rollout_model_equals_the_learners(
        ray_local, tiny_model_dirs, batch):
    from rollout.pool import RolloutPool
    from rollout.weights import weight_store_name

    data = _config(tiny_model_dirs["flux"], num_actors=1, micro_batch_size=2).model_dump()
    data["learner"].update(finetune="full", kl_beta=0.0, publish_bucket_mb=0.05, lr=1e-4)
    data["rollout"].update(num_actors=1, num_cpus_per_actor=0.5)
    cfg = validate_config(data)
    store = weight_store("test-full-buckets")
    group = RankGroup(LearnerActor, PoolConfig(num_actors=1, num_cpus_per_actor=0.5))
    try:
        ray_local.get(group.run("setup", cfg, store=store))
        result = _train(ray_local, group, (batch[0], batch[1]), 1)[0]
        learner_state = result["weights"]
        version, refs, metas = ray_local.get(store.latest.remote())
        pool = RolloutPool(cfg, SamplerSettings.from_config(cfg), weight_store_name("test-full-buckets"))  # loads the latest version as it starts
        try:
            worker = pool.workers[0]
            held = ray_local.get(worker.__ray_call__.remote(
                lambda self: {k: v.clone() for k, v in self._sampler.model.transformer.state_dict().items()}))
            assert ray_local.get(worker.policy_version.remote()) == version == 1
        finally:
            pool.shutdown()
    finally:
        group.kill()
        ray_local.kill(store)
    total = sum(t.numel() * t.element_size() for t in learner_state.values())
    assert len(refs) == len(metas) > 1 and total > 0.05 * 2**20  # several buckets of at most 0.05 MB each
    for meta in metas:
        sizes = [entry[4] for entry in meta]
        assert len(sizes) == 1 or sum(sizes) <= 0.05 * 2**20  # a bucket holds one big tensor or fits the size
    assert held.keys() == learner_state.keys()
    assert all(torch.equal(held[k], learner_state[k]) for k in held)  # exactly the learner's weights
