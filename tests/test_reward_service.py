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

    def make(*scorers: tuple[str, float, dict], num_actors: int = 2, report=None, **fields) -> RewardService:
        cfg = RewardsConfig(scorers=[dict(name=n, weight=w, options=o) for n, w, o in scorers],
                            num_actors=num_actors, num_cpus_per_actor=0.25, **fields)
        made.append(RewardService(cfg, report=report))
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


def lives(pid_file) -> list[int]:
    """The process ids a SlowMean actor wrote, one per life, once built."""
    return [int(line) for line in pid_file.read_text().split()] if pid_file.exists() else []


def pump_until(service: RewardService, handles, condition, timeout: float = 60.0) -> None:
    """Drive the service (nothing is done meanwhile) until `condition()` holds."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "the condition did not hold in time"
        assert service.wait(handles, timeout=0.1) == []


def kill_when_built(pid_file, life: int, timeout: float = 60.0) -> None:
    """SIGKILL the actor's `life`-th process (1: the first) once it is built."""
    end = time.monotonic() + timeout
    while len(lives(pid_file)) < life:
        assert time.monotonic() < end, f"life {life} of the actor was not built in time"
        time.sleep(0.05)
    os.kill(lives(pid_file)[life - 1], signal.SIGKILL)


@pytest.mark.slow
def test_a_slow_starting_actor_killed_twice_is_waited_for_and_every_group_scored(make_service, tmp_path):
    pid_file, events = tmp_path / "pids", []
    start_delay_s = 3.0
    service = make_service(("slow_mean", 1.0, {"sleep_s": 0.5, "start_delay_s": start_delay_s,
                                               "pid_file": str(pid_file)}),
                           num_actors=1, report=lambda kind, message: events.append((kind, message)))
    groups = {gid: group(4, seed=gid) for gid in range(30, 34)}
    handles = [service.submit(*groups[gid], group_id=gid) for gid in groups]  # 4 calls queued on the one actor
    time.sleep(0.2)
    killed_at = time.monotonic()
    kill_when_built(pid_file, 1)  # in the middle of the first call: all four are cut off
    pump_until(service, handles, lambda: service.counters.retries == 4)  # sent again once it answers
    kill_when_built(pid_file, 2)  # the second life, in the middle of its first call again
    results = [service.collect(h, timeout=120) for h in handles]

    for result in results:
        images, prompts, _ = groups[result.group_id]
        np.testing.assert_allclose(result.scores["slow_mean"], in_process("slow_mean", images, prompts), rtol=1e-6)
        assert result.retries == 2  # once per restart, not once per failed attempt
    assert time.monotonic() - killed_at >= 2 * start_delay_s  # the retries waited for both restarts
    counters = service.counters
    assert counters.actor_failures == 2 and counters.retries == 8
    assert counters.groups_failed == 0 and counters.groups_scored == 4 and counters.timeouts == 0
    assert [kind for kind, _ in events].count("reward_actor_failed") == 2
    assert [kind for kind, _ in events].count("reward_retry") == 8 and len(events) == 10
    failed = [message for kind, message in events if kind == "reward_actor_failed"]
    assert all("no 'slow_mean' reward actor answers now: its batches wait until one does" in m for m in failed)
    assert len(lives(pid_file)) == 3 and service.actor_pids() == {"slow_mean": [lives(pid_file)[2]]}


@pytest.mark.slow
def test_an_actor_out_of_ray_restarts_is_replaced_and_its_group_completes(make_service, tmp_path):
    pid_file, events = tmp_path / "pids", []
    # Ray restarts it once; two deaths 1 s apart or more are within the budget of 1 per 1 s window
    service = make_service(("slow_mean", 1.0, {"sleep_s": 1.0, "start_delay_s": 2.0, "pid_file": str(pid_file)}),
                           num_actors=1, max_restarts=1, restart_window_s=1.0,
                           report=lambda kind, message: events.append((kind, message)))
    images, prompts, metadata = group(4, seed=40)
    expected = in_process("slow_mean", images, prompts)
    for life, group_id in ((1, 41), (2, 42)):  # the second kill leaves Ray no restart
        handle = service.submit(images, prompts, metadata, group_id=group_id)
        time.sleep(0.3)
        kill_when_built(pid_file, life)
        result = service.collect(handle, timeout=120)
        np.testing.assert_allclose(result.scores["slow_mean"], expected, rtol=1e-6)
        assert result.retries == 1

    assert service.counters.actor_failures == 2 and service.counters.groups_failed == 0
    kinds = [kind for kind, _ in events]
    assert kinds.count("reward_actor_replaced") == 1 and "reward_actor_retired" not in kinds
    [replaced] = [message for kind, message in events if kind == "reward_actor_replaced"]
    assert replaced.startswith("reward actor slow_mean-0 is gone for good (")
    assert len(lives(pid_file)) == 3 and service.actor_pids() == {"slow_mean": [lives(pid_file)[2]]}
    pool = service._pools["slow_mean"]
    assert pool.spawned == 2 and pool.free_bundles == 0  # the new actor took the old one's bundle
    np.testing.assert_allclose(service.score(images, prompts, metadata, group_id=43).scores["slow_mean"], expected,
                               rtol=1e-6)


@pytest.mark.slow
def test_more_restarts_than_the_window_allows_fail_the_scorer_loudly(make_service, tmp_path):
    pid_file, events = tmp_path / "pids", []
    service = make_service(("slow_mean", 1.0, {"sleep_s": 1.0, "pid_file": str(pid_file)}), num_actors=1,
                           max_restarts=1, restart_window_s=600.0,
                           report=lambda kind, message: events.append((kind, message)))
    images, prompts, metadata = group(4, seed=50)
    handle = service.submit(images, prompts, metadata, group_id=51)
    time.sleep(0.3)
    kill_when_built(pid_file, 1)
    assert service.collect(handle, timeout=120).retries == 1  # one restart: within the budget
    handle = service.submit(images, prompts, metadata, group_id=52)
    time.sleep(0.3)
    kill_when_built(pid_file, 2)
    loud = (r"scorer 'slow_mean' has no reward actor left: reward actor slow_mean-0 died 2 times within 600 s "
            r"\(rewards.max_restarts = 1 within rewards.restart_window_s; last: ")
    with pytest.raises(RewardError, match=r"group 52: " + loud):
        service.collect(handle, timeout=120)
    with pytest.raises(RewardError, match=r"group 53: " + loud):  # later groups fail at once
        service.score(images, prompts, metadata, group_id=53)

    assert service.counters.actor_failures == 2 and service.counters.groups_failed == 2
    assert service.num_alive() == 0 and service.describe() == {"rewards/slow_mean": [
        {"name": "slow_mean-0", "node": "retired"}]}
    [retired] = [message for kind, message in events if kind == "reward_actor_retired"]
    assert retired.endswith("no 'slow_mean' actor is left: its groups fail")
