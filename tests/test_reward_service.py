"""RewardService scores whole groups on actor pools, survives a killed or hung actor, and fails NaN groups loudly."""

from __future__ import annotations

import itertools
import os
import signal
import time

import numpy as np
import pytest

from cluster.config import RewardsConfig
import rewards
from rewards.registry import REGISTRY
from rewards.service import ImagesLost, RewardError, RewardService
from tests.reward_helpers import ImageHolder

HELPERS = {"slow_mean": "tests.reward_helpers:SlowMean", "nan_where_asked": "tests.reward_helpers:NanWhereAsked"}


@pytest.fixture
def make_service(ray_local, monkeypatch):
    """Builds services on the shared Ray with the test scorers registered; shuts them down afterwards."""
    for name, target in HELPERS.items():
        monkeypatch.setitem(REGISTRY, name, target)
    made = []

    def make(*scorers: tuple[str, float, dict], num_actors: int = 2, **fields) -> RewardService:
        cfg = RewardsConfig(scorers=[dict(name=n, weight=w, options=o) for n, w, o in scorers],
                            num_actors=num_actors, num_cpus_per_actor=0.25, **fields)
        made.append(RewardService(cfg))
        return made[-1]

    yield make
    for service in made:
        service.shutdown()


def group(n: int, seed: int) -> tuple[np.ndarray, list[str], list[dict]]:
    images = np.random.default_rng(seed).integers(0, 256, (n, 24, 20, 3), dtype=np.uint8)
    prompts = ["a cat" if i % 2 else "a red cube on a wooden table" for i in range(n)]
    return images, prompts, [{"index": i} for i in range(n)]


def in_process(name: str, images: np.ndarray, prompts: list[str], **options) -> np.ndarray:
    return rewards.build(name, **options)(images, prompts).scores


@pytest.mark.slow
def test_groups_are_scored_per_scorer_with_the_weighted_total(make_service):
    service = make_service(("jpeg_compressibility", 2.0, {}), ("slow_mean", 0.0, {}), ("nan_where_asked", -0.5, {}),
                           num_actors=1)
    groups = {gid: group(n, seed=gid) for gid, n in ((3, 5), (4, 1), (5, 8))}
    handles = [service.submit(*groups[gid], group_id=gid) for gid in groups]
    assert service.wait(handles, timeout=60)  # at least one is done
    for handle in reversed(handles):  # collected in any order
        images, prompts, _ = groups[handle.group_id]
        result = service.collect(handle, timeout=60)
        jpeg, mean = in_process("jpeg_compressibility", images, prompts), in_process("slow_mean", images, prompts)
        assert result.group_id == handle.group_id and set(result.scores) == set(HELPERS) | {"jpeg_compressibility"}
        np.testing.assert_allclose(result.scores["jpeg_compressibility"], jpeg, rtol=1e-6)
        np.testing.assert_allclose(result.scores["slow_mean"], mean, rtol=1e-6)  # weight 0: kept for logging
        np.testing.assert_allclose(result.total, 2.0 * jpeg - 0.5 * mean, rtol=1e-5)
        assert result.total.dtype == np.float32 and result.retries == 0
        assert result.metrics["slow_mean/chars"].tolist() == [len(p) for p in prompts]
        assert set(result.latency_s) == set(result.scores) and all(t > 0 for t in result.latency_s.values())
    assert service.counters.groups_scored == 3 and service.counters.groups_failed == 0


@pytest.mark.slow
def test_an_actor_killed_mid_batch_is_retried_on_another_actor(make_service):
    service = make_service(("slow_mean", 1.0, {"sleep_s": 1.5}))
    pids = service.actor_pids()["slow_mean"]
    images, prompts, metadata = group(6, seed=1)
    handle = service.submit(images, prompts, metadata, group_id=11)  # 3 images to each actor
    time.sleep(0.5)
    os.kill(pids[0], signal.SIGKILL)
    result = service.collect(handle, timeout=60)

    np.testing.assert_allclose(result.scores["slow_mean"], in_process("slow_mean", images, prompts), rtol=1e-6)
    assert result.retries == 1
    assert service.counters.actor_failures == 1 and service.counters.retries == 1
    again = service.score(images, prompts, metadata, group_id=12)  # the killed actor was restarted
    np.testing.assert_allclose(again.scores["slow_mean"], result.scores["slow_mean"])
    new_pids = service.actor_pids()["slow_mean"]
    assert new_pids[0] != pids[0] and new_pids[1] == pids[1]


@pytest.mark.slow
def test_images_by_reference_are_scored_and_lost_ones_fail_the_group_as_lost(make_service, ray_local):
    service = make_service(("jpeg_compressibility", 1.0, {}), num_actors=1)
    images, prompts, metadata = group(4, seed=7)
    holder = ray_local.remote(num_cpus=0)(ImageHolder).remote()
    [ref] = ray_local.get(holder.put.remote(images))
    result = service.collect(service.submit(ref, prompts, metadata, group_id=1), timeout=60)
    np.testing.assert_allclose(result.scores["jpeg_compressibility"], in_process("jpeg_compressibility", images,
                                                                                  prompts), rtol=1e-6)
    ray_local.kill(holder)  # the owner gone: the images are lost, the scorer actor is not
    end = time.monotonic() + 60
    for group_id in itertools.count(2):
        try:
            service.collect(service.submit(ref, prompts, metadata, group_id=group_id), timeout=60)
        except ImagesLost as e:  # the scorer could not fetch them
            assert str(e).startswith(f"group {group_id}: its images are lost (OwnerDiedError"), str(e)
            break
        assert time.monotonic() < end, "the images of a dead owner were still scored after 60 s"
        time.sleep(0.5)  # scored while the news of the owner's death was on its way
    assert service.counters.actor_failures == 0 and service.counters.retries == 0
    assert service.counters.groups_failed == 0  # sampled again by the driver, not failed


@pytest.mark.slow
def test_a_hung_actor_is_killed_after_the_timeout_and_its_batch_retried(make_service, tmp_path):
    hang_file = tmp_path / "hang-once"
    hang_file.touch()
    service = make_service(("slow_mean", 1.0, {"hang_file": str(hang_file)}), timeout_s=2.0)
    images, prompts, metadata = group(4, seed=2)
    began = time.monotonic()
    result = service.score(images, prompts, metadata, group_id=21)

    assert not hang_file.exists() and time.monotonic() - began >= 2.0
    np.testing.assert_allclose(result.scores["slow_mean"], in_process("slow_mean", images, prompts), rtol=1e-6)
    assert result.retries == 1 and service.counters.timeouts == 1


@pytest.mark.slow
def test_a_nan_score_fails_the_group_with_its_scorer_indices_and_prompt(make_service):
    service = make_service(("jpeg_compressibility", 1.0, {}), ("nan_where_asked", 1.0, {}))
    images, prompts, metadata = group(6, seed=3)
    metadata[1]["nan"] = metadata[2]["nan"] = True  # both in the first actor's batch
    with pytest.raises(RewardError) as failure:
        service.score(images, prompts, metadata, group_id=7)
    message = str(failure.value)
    assert "group 7" in message and "'nan_where_asked'" in message and "[1, 2]" in message
    assert "'a cat'" in message and "'a red cube on a wooden table'" in message
    assert service.counters.groups_failed == 1 and service.counters.nonfinite == 1

    metadata[1]["nan"] = metadata[2]["nan"] = False  # the same group id can be scored again, and never as 0
    result = service.score(images, prompts, metadata, group_id=7)
    assert np.isfinite(result.total).all() and (result.scores["nan_where_asked"] > 0).all()


@pytest.mark.slow
def test_a_scorer_exception_fails_the_group_without_retries(make_service):
    service = make_service(("nan_where_asked", 1.0, {}))
    images, prompts, metadata = group(4, seed=4)
    metadata[3]["raise"] = True
    with pytest.raises(RewardError, match=r"group 8: scorer 'nan_where_asked' raised on images 2..3: "
                                          r"RewardInputError: asked to raise"):
        service.score(images, prompts, metadata, group_id=8)
    assert service.counters.retries == 0 and service.counters.groups_failed == 1


@pytest.mark.slow
def test_a_scorer_that_cannot_start_is_reported_by_name(make_service):
    with pytest.raises(RewardError, match="'jpeg_compressibility' reward actors could not start.*quality"):
        make_service(("jpeg_compressibility", 1.0, {"quality": 0}), num_actors=1)


@pytest.mark.slow
def test_an_unknown_scorer_lists_the_registered_ones(make_service):
    with pytest.raises(ValueError, match="unknown reward 'nope'; registered: .*jpeg_compressibility"):
        make_service(("nope", 1.0, {}))
