"""RolloutPool and RolloutWorker on the session's local Ray: placement-independent results, policy versions, resizing
while groups are in flight, and a worker dying with a group in hand."""

from __future__ import annotations


import time

import pytest
import torch

from cluster.config import JobConfig
from cluster.config_loading import load_config
from rollout.pool import RolloutPool
from rollout.prompts.files import builtin_prompts
from rollout.prompts.groups import GroupSampler
from rollout.sampling.trajectory import SamplerSettings
from rollout.weights import pack_state, publish_weights, weight_store, weight_store_name

RUN_NAME = "test-rollout-pool"


def _config(path) -> JobConfig:
    """cluster/tiny.yaml on the tiny FLUX folder: groups of 2, 3 steps, 0.5 CPU per worker."""
    return load_config("cluster/tiny.yaml", [
        f"run_name={RUN_NAME}", f"model.path={path}", "model.build_tiny=false", "data.group_size=2",
        "sampler.num_steps=3", "rollout.num_cpus_per_actor=0.5", "rollout.samples_per_forward=2",
        "rollout.max_restarts=1", "eval.num_steps=4", "eval.batch_size=2",
    ])


def _groups(first: int, count: int):
    return GroupSampler(builtin_prompts(), group_size=2, seed=0).take(first + count)[first:]


@pytest.fixture(scope="module")
def store(ray_local):
    store = weight_store(RUN_NAME)
    yield store
    ray_local.kill(store)


@pytest.fixture(scope="module")
def pool(ray_local, store, tiny_model_dirs):
    cfg = _config(tiny_model_dirs["flux"])
    pool = RolloutPool(cfg, SamplerSettings.from_config(cfg), weight_store_name(RUN_NAME), num_workers=2)
    yield pool
    pool.shutdown()


def _collect(pool: RolloutPool, groups) -> dict:
    """group id -> its whole record (fetched here; the driver never does)."""
    pool.submit(groups)
    results = {}
    for sampled in pool.results():
        assert sampled.group_id not in results, f"group {sampled.group_id} delivered twice"
        record = sampled.fetch()
        assert sampled.summary == record.summary()  # the summary the driver reads describes the record
        results[sampled.group_id] = record
    assert sorted(results) == sorted(g.group_id for g in groups)
    return results


@pytest.mark.slow
def test_placement_does_not_change_results(pool):
    pool.resize(2)
    groups = _groups(0, 4)
    on_two = _collect(pool, groups)
    pool.resize(1)
    on_one = _collect(pool, groups)
    for gid, traj in on_two.items():
        for name in ("states", "next_states", "log_probs", "step_indices", "images"):
            assert torch.equal(getattr(traj, name), getattr(on_one[gid], name)), (gid, name)
        assert traj.seeds == on_one[gid].seeds


@pytest.mark.slow
def test_evaluation_images_come_back_in_order(pool, ray_local):
    prompts, seeds = ["a red circle", "two blue stars", "a green square"], [5, 6, 7]
    images = torch.cat(ray_local.get(pool.sample_eval(prompts, seeds)))
    assert images.dtype == torch.uint8 and images.shape == (3, 64, 64, 3)
    alone = ray_local.get(pool.sample_eval(prompts[1:2], seeds[1:2])[0])[0]  # in a batch of 1 instead of 2: equal up to rounding
    assert (alone.int() - images[1].int()).abs().max() <= 1 and (alone.int() - images[0].int()).abs().max() > 1
    assert pool.negative_embeds() is None  # FLUX has no true CFG


@pytest.mark.slow
def test_a_new_policy_version_changes_images_and_an_older_one_is_ignored(pool, store, ray_local):
    ray = ray_local
    pool.resize(1)
    group = _groups(30, 1)
    before = _collect(pool, group)[30]
    version = before.policy_version + 1
    worker = pool.workers[0]  # the one worker, to drive load_weights directly
    state = {k: v.clone() for k, v in _lora_state(ray, worker).items()}
    for name, tensor in state.items():
        if "lora_B" in name:
            tensor.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    assert publish_weights(store, version, [state])
    after = _collect(pool, group)[30]
    assert after.policy_version == version
    assert not torch.equal(after.images, before.images)

    stale, meta = pack_state({k: torch.zeros_like(v) for k, v in state.items()})
    assert ray.get(worker.load_weights.remote(version - 1, [ray.put(stale)], [meta])) == version
    assert torch.equal(_collect(pool, group)[30].images, after.images)


def _lora_state(ray, worker) -> dict[str, torch.Tensor]:
    """The worker's LoRA state under its peft names, read inside the actor."""
    from rollout.policy import policy_state

    return ray.get(worker.__ray_call__.remote(lambda self: policy_state(self._sampler.model.transformer, "lora")))


@pytest.mark.slow
def test_resize_while_groups_are_in_flight_delivers_each_group_once(pool, store, ray_local):
    latest = ray_local.get(store.latest.remote())
    version = latest[0] if latest is not None else 0
    pool.resize(1)
    groups = _groups(10, 10)
    pool.submit(groups)
    delivered = [pool.next_result()]
    pool.resize(3)  # the new workers start from the current weights
    assert pool.num_workers == 3
    delivered += [pool.next_result() for _ in range(3)]
    pool.resize(1)  # the busy ones finish their group first
    assert pool.num_workers == 1
    delivered += list(pool.results())
    assert sorted(sampled.group_id for sampled in delivered) == [g.group_id for g in groups]
    assert {sampled.summary.policy_version for sampled in delivered} == {version}
    assert pool.pending == 0 and pool.num_workers == 1


@pytest.mark.slow
def test_a_group_held_by_a_dying_worker_is_delivered_once(pool, ray_local):
    pool.resize(1)
    groups = _groups(40, 3)
    pool.submit(groups)
    victim = pool.workers[0]  # the one worker, holding the first group
    ray_local.kill(victim, no_restart=False)  # Ray restarts it (max_restarts = 1); its group is queued again
    delivered = [sampled.group_id for sampled in pool.results()]
    assert sorted(delivered) == [g.group_id for g in groups]
    assert pool.num_workers == 1


@pytest.mark.slow
def test_a_call_past_its_deadline_is_sampled_again_elsewhere_and_delivered_once(ray_local, tiny_model_dirs, tmp_path):
    from cluster.pools import ActorPool
    from tests.rollout_helpers import HangsOnce

    cfg = _config(tiny_model_dirs["flux"])
    cfg = cfg.model_copy(update={"output_dir": str(tmp_path),
                                 "rollout": cfg.rollout.model_copy(update={"call_timeout_s": 5.0})})
    said = []
    pool = RolloutPool(cfg, SamplerSettings.from_config(cfg), None, num_workers=2,
                       actors=ActorPool("rollout", HangsOnce, cfg.rollout), report=lambda event, line: said.append(line))
    try:
        groups = _groups(50, 3)  # group 50 hangs on the worker that takes it first
        started = time.monotonic()
        delivered = _collect(pool, groups)
        waited = time.monotonic() - started
    finally:
        pool.shutdown()
    assert sorted(delivered) == [50, 51, 52]  # each once (the late result of the hung call is never delivered)
    assert [line for line in said if "gave no result within 5 s (rollout.call_timeout_s)" in line]
    assert waited < 60, waited  # not waited out: sampled again on the other worker
