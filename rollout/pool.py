"""`RolloutPool`: N `RolloutWorker` actors that take whole prompt groups as they free up and deliver each group as soon
as it finishes, by reference (`SampledGroup`: the summary fetched, record and images left where they were sampled);
the pool can grow or shrink while groups are in flight.

Every submitted group is delivered exactly once: a group is either queued or held by one worker; a worker that dies
or becomes unreachable while holding one hands it back to the front of the queue whole, and a worker being removed
finishes its group first. A worker that becomes unreachable (its node left) gets no group until it answers again:
Ray restarts it once its bundle is placed on a node with room. A call not back within `rollout.call_timeout_s` counts
as unreachable too (its late result is ignored). When every worker has been unreachable for `rollout.node_wait_s`,
the pool gives up with a message saying so.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError
from tqdm import tqdm

from cluster.config import JobConfig
from cluster.errors import first_line
from cluster.pools import ActorPool, describe
from rollout.models.contract import PromptEmbeds
from rollout.prompts.groups import PromptGroup
from rollout.sampled import SampledGroup
from rollout.sampling.trajectory import SamplerSettings
from rollout.weights import PackedState
from rollout.worker import RolloutWorker

PROBE_INTERVAL_S = 1.0  # between two attempts to reach an unreachable worker


class RolloutPoolLost(RuntimeError):
    """Every rollout worker stayed unreachable for `rollout.node_wait_s`."""


@dataclass(eq=False)
class _Slot:
    """One worker actor and its pool state."""

    handle: Any
    name: str
    retiring: bool = False  # removed by resize: no new groups, killed once its group is delivered
    failures: int = 0
    lost_since: float | None = None  # unreachable since (monotonic seconds): no groups until it answers
    probe_at: float = 0.0  # when to try to reach it next
    node: Any = None  # ref to the id of its node
    policy_version: int | None = None  # the version of the last group it delivered


class RolloutPool:
    """Rollout actors with the job's per-actor resources, fed from one queue of groups."""

    def __init__(self, cfg: JobConfig, settings: SamplerSettings, store_name: str | None = None,
                 num_workers: int | None = None, *, actors: ActorPool | None = None,
                 report: Callable[[str, str], None] | None = None) -> None:
        """`settings`: how the training rollouts sample and what they return (the objective's `rollout_settings`).
        `store_name`: the job's WeightStore (`weight_store_name(key)`), None for fixed base weights.
        `actors`: the rollout pool's reserved placement (made here when not given). `report(event, message)` hears of
        every worker death and re-queued group."""
        if not ray.is_initialized():
            raise RuntimeError("start Ray before the rollout pool (cluster.runtime.start_ray), or it starts one of its "
                               "own that listens on every network address")
        self._cfg = cfg
        self._settings = settings
        self._store_name = store_name
        self._actors = actors or ActorPool("rollout", RolloutWorker, cfg.rollout,
                                           placement_timeout_s=cfg.ray.placement_timeout_s)
        self._report = report or (lambda event, message: None)
        self._slots: list[_Slot] = []
        self._queue: deque[PromptGroup] = deque()
        # summary ref -> the worker, the group, and the refs of its record and images
        self._in_flight: dict[ray.ObjectRef, tuple[_Slot, PromptGroup, ray.ObjectRef, ray.ObjectRef]] = {}
        self._deadlines: dict[ray.ObjectRef, float] = {}  # summary ref -> when its call counts as lost (monotonic)
        self._probes: dict[ray.ObjectRef, _Slot] = {}
        self._done: deque[SampledGroup] = deque()  # sampled, not yet taken by next_result
        self._attempts: dict[int, int] = {}
        self.requeued = 0  # groups queued again because their worker died or became unreachable
        self.resize(num_workers if num_workers is not None else cfg.rollout.num_actors)

    @property
    def num_workers(self) -> int:
        """Workers that take new groups (those being removed not counted)."""
        return len(self.workers)

    @property
    def workers(self) -> list[Any]:
        """Handles of the workers that take new groups, e.g. to call a method on each."""
        return [slot.handle for slot in self._slots if not slot.retiring]

    @property
    def pending(self) -> int:
        """Groups submitted and not yet delivered (queued, being sampled, or sampled and not taken yet)."""
        return len(self._queue) + len(self._in_flight) + len(self._done)

    def pending_groups(self) -> list[PromptGroup]:
        """The groups submitted and not yet delivered: queued, being sampled, sampled and not taken yet."""
        done = [sampled.summary.prompt_group() for sampled in self._done]
        return list(self._queue) + [group for _, group, _, _ in self._in_flight.values()] + done

    def submit(self, groups: Iterable[PromptGroup]) -> None:
        """Queue groups; idle workers start on them at once."""
        self._queue.extend(groups)
        self._dispatch()

    def next_result(self, timeout: float | None = None, until: Sequence[ray.ObjectRef] = ()) -> SampledGroup | None:
        """The next finished group, in completion order; None after `timeout` seconds, when nothing is pending, or as
        soon as one of `until` (the learner's update, say) is ready. The workers keep sampling meanwhile.

        A group whose worker died or became unreachable is queued again and never returned twice; an error raised
        while sampling is raised here; RolloutPoolLost when no worker has answered for `rollout.node_wait_s`.
        """
        end = None if timeout is None else time.monotonic() + timeout
        while not self._done and self.pending:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0 or until and ray.wait(list(until), timeout=0)[0]:
                return None
            self._receive(left, also=until)
        return self._done.popleft() if self._done else None

    def _receive(self, timeout: float | None, also: Sequence[ray.ObjectRef] = ()) -> None:
        """Wait (at most `timeout` s) until a call returns, a probe answers or one of `also` is ready, and handle a
        returned call: its group is kept for next_result, or queued again if its worker died or went away."""
        self._probe_lost()
        self._time_out_calls()
        waiting = list(self._in_flight) + list(self._probes) + list(also)
        wait_s = PROBE_INTERVAL_S if any(s.lost_since is not None for s in self._slots) else None
        if self._deadlines:
            due = max(0.0, min(self._deadlines.values()) - time.monotonic())
            wait_s = due if wait_s is None else min(wait_s, due)
        if timeout is not None:
            wait_s = timeout if wait_s is None else min(wait_s, timeout)
        if not self._in_flight and not self._probes:  # every worker unreachable and none due for a probe yet
            time.sleep(wait_s or 0.0)
            return
        ready, _ = ray.wait(waiting, num_returns=1, timeout=wait_s)
        if not ready or ready[0] not in self._in_flight and ready[0] not in self._probes:
            return
        if ready[0] in self._probes:
            self._probed(ready[0])
            return
        slot, group, record, images = self._in_flight.pop(ready[0])
        self._deadlines.pop(ready[0], None)
        try:
            summary = ray.get(ready[0])
        except (ActorUnavailableError, ObjectLostError):  # its node left, with the result maybe
            self._unreachable(slot, group)
            return
        except RayActorError as err:
            self._worker_failed(slot, group, err)
            return
        self._attempts.pop(group.group_id, None)
        slot.policy_version = summary.policy_version
        if slot.retiring:
            self._remove(slot)
        self._done.append(SampledGroup(summary, record, images))
        self._dispatch()

    def results(self) -> Iterator[SampledGroup]:
        """Every pending group, as it finishes."""
        while self.pending:
            result = self.next_result()
            if result is not None:
                yield result

    def resize(self, num_workers: int) -> None:
        """Grow (new workers load the current weights) or shrink (idle workers go now, busy ones after their group).
        Growing reserves the bundles first: cluster.pools.PlacementError leaves the pool as it was."""
        if num_workers < 1:
            raise ValueError(f"a rollout pool needs at least 1 worker, got {num_workers}")
        active = [slot for slot in self._slots if not slot.retiring]
        if num_workers - len(active) > self._actors.free_bundles:
            self._actors.reserve(num_workers - len(active) - self._actors.free_bundles)
        for _ in range(num_workers - len(active)):
            self._slots.append(self._spawn())
        busy = {id(slot) for slot, *_ in self._in_flight.values()}
        # idle workers first, newest first among equals
        order = sorted(reversed(active), key=lambda slot: id(slot) in busy)
        for slot in order[:max(0, len(active) - num_workers)]:
            slot.retiring = True
            if id(slot) not in busy:
                self._remove(slot)
        self._dispatch()

    def sample_eval(self, prompts: Sequence[str], seeds: Sequence[int],
                    weights: PackedState | None = None) -> list[ray.ObjectRef]:
        """Evaluation images for (prompt, seed) pairs in batches of eval.batch_size spread over the workers; once all
        are sampled, one ref per batch in order, each to uint8 (b, H, W, 3) images left where they were sampled.

        `weights`: a packed state (rollout.weights.PackedState), e.g. the EMA weights, used instead of the policy.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} evaluation prompts but {len(seeds)} seeds")
        reachable = [slot.handle for slot in self._slots if not slot.retiring and slot.lost_since is None]
        workers = reachable or self.workers  # with none reachable, the calls wait for the workers' restart
        size = self._cfg.eval.batch_size
        batches = {workers[i % len(workers)].sample_eval.remote(list(prompts[at:at + size]), list(seeds[at:at + size]),
                                                                weights): len(prompts[at:at + size])
                   for i, at in enumerate(range(0, len(prompts), size))}
        with tqdm(total=len(prompts), desc="evaluation", unit="image", leave=False, disable=None) as bar:
            pending = list(batches)
            while pending:
                done, pending = ray.wait(pending, num_returns=1, fetch_local=False)
                bar.update(batches[done[0]])
        return list(batches)

    def describe(self) -> list[dict[str, Any]]:
        """Each worker that takes groups: its name, node (short id; "starting" until known, "unreachable" when
        lost) and the policy version of the last group it delivered."""
        described = []
        for slot in self._slots:
            if slot.retiring:
                continue
            node = "starting"
            if slot.lost_since is not None:
                node = "unreachable"
            elif ray.wait([slot.node], timeout=0)[0]:
                try:
                    node = ray.get(slot.node)[:8]
                except RayActorError:
                    node = "unreachable"
            described.append({"name": slot.name, "node": node, "policy_version": slot.policy_version})
        return described

    def negative_embeds(self) -> PromptEmbeds | None:
        """The empty prompt's embeddings the learner needs for true CFG (None for FLUX); ask once per job."""
        return ray.get(self.workers[0].negative_embeds.remote())

    def shutdown(self) -> None:
        """End every worker and give the pool's reserved resources back; groups still queued or in flight are
        dropped."""
        self._actors.shutdown()
        self._slots.clear()
        self._queue.clear()
        self._in_flight.clear()
        self._deadlines.clear()
        self._probes.clear()
        self._done.clear()

    # -----------------------------------------------------------------------------------------------------------------

    def _spawn(self) -> _Slot:
        name = f"rollout-{self._actors.spawned}"
        handle = self._actors.spawn(self._cfg, self._settings, self._store_name, name)
        return _Slot(handle, name, node=handle.node.remote())

    def _remove(self, slot: _Slot) -> None:
        self._slots.remove(slot)
        self._actors.release(slot.handle)

    def _dispatch(self) -> None:
        """Give each idle, reachable, non-retiring worker the next queued group."""
        busy = {id(slot) for slot, *_ in self._in_flight.values()}
        for slot in self._slots:
            if not self._queue:
                return
            if slot.retiring or slot.lost_since is not None or id(slot) in busy:
                continue
            group = self._queue.popleft()
            summary, record, images = slot.handle.sample_group.remote(group)
            self._in_flight[summary] = (slot, group, record, images)
            self._deadlines[summary] = time.monotonic() + self._cfg.rollout.call_timeout_s

    def _time_out_calls(self) -> None:
        """Calls past `rollout.call_timeout_s`: their groups go back to the queue and their workers count as
        unreachable until they answer a probe (a late result is not waited for, so never delivered)."""
        now = time.monotonic()
        for ref in [ref for ref, due in self._deadlines.items() if due <= now]:
            del self._deadlines[ref]
            slot, group, _, _ = self._in_flight.pop(ref)
            self._unreachable(slot, group, f"gave no result within {self._cfg.rollout.call_timeout_s:g} s "
                                            f"(rollout.call_timeout_s)")

    def _requeue(self, slot: _Slot, group: PromptGroup, event: str, why: str) -> None:
        """Put a group whose call was lost back at the front of the queue, and say so."""
        self._queue.appendleft(group)
        self.requeued += 1
        self._report(event, f"rollout actor {slot.name} {why}; group {group.group_id} ({group.prompt!r}) is "
                            f"queued again ({self.requeued} re-queued so far)")

    def _unreachable(self, slot: _Slot, group: PromptGroup,
                     why: str = "became unreachable (its node left, or its process is being restarted)") -> None:
        """A worker's call was cut off or timed out: the group goes back to the queue, and the worker gets nothing
        more until it answers a probe."""
        self._requeue(slot, group, "rollout_actor_lost", why)
        if slot.lost_since is None:
            slot.lost_since = time.monotonic()
        slot.probe_at = 0.0
        self._dispatch()

    def _probe_lost(self) -> None:
        """Try to reach each unreachable worker again (at most once a PROBE_INTERVAL_S each); give up when every
        worker has been unreachable for rollout.node_wait_s."""
        now = time.monotonic()
        probing = set(map(id, self._probes.values()))
        for slot in self._slots:
            if slot.lost_since is not None and id(slot) not in probing and now >= slot.probe_at:
                slot.probe_at = now + PROBE_INTERVAL_S
                self._probes[slot.handle.policy_version.remote()] = slot
        active = [slot for slot in self._slots if not slot.retiring]
        lost = [slot.lost_since for slot in active if slot.lost_since is not None]
        wait_s = self._cfg.rollout.node_wait_s
        if active and len(lost) == len(active) and now - min(lost) > wait_s:
            raise RolloutPoolLost(
                f"no rollout actor has answered for {now - min(lost):.0f} s (rollout.node_wait_s = {wait_s:g}): their "
                f"node(s) left and no node that can hold a rollout bundle ({describe(self._cfg.rollout.bundle())}) "
                f"has taken them. Add such a node (or raise rollout.node_wait_s) and resume with --resume auto")

    def _probed(self, ref: ray.ObjectRef) -> None:
        slot = self._probes.pop(ref)
        try:
            ray.get(ref)
        except ActorUnavailableError:
            return  # still unreachable: probed again later
        except RayActorError as err:  # out of restarts: a new actor takes its place
            self._replace(slot, err)
            return
        if slot in self._slots and slot.lost_since is not None:
            self._report("rollout_actor_back", f"rollout actor {slot.name} answers again after "
                                               f"{time.monotonic() - slot.lost_since:.0f} s")
            slot.lost_since = None
        self._dispatch()

    def _worker_failed(self, slot: _Slot, group: PromptGroup, err: Exception) -> None:
        """A worker died holding `group`: queue the group again (whole) and replace a worker out of restarts."""
        attempts = self._attempts[group.group_id] = self._attempts.get(group.group_id, 0) + 1
        if attempts > self._cfg.rollout.max_restarts + 1:
            raise RuntimeError(f"group {group.group_id} ({group.prompt!r}): its rollout worker died {attempts} times; "
                               f"giving up (rollout.max_restarts = {self._cfg.rollout.max_restarts})")
        self._requeue(slot, group, "rollout_actor_died", f"died ({first_line(err)})")
        slot.failures += 1
        if slot.retiring or slot.failures > self._cfg.rollout.max_restarts:
            self._replace(slot, err)
        self._dispatch()

    def _replace(self, slot: _Slot, err: Exception) -> None:
        """Remove a worker that cannot come back; a new one takes its place unless it was being removed anyway."""
        if slot not in self._slots:
            return
        self._remove(slot)
        if not slot.retiring:
            fresh = self._spawn()
            self._slots.append(fresh)
            self._report("rollout_actor_replaced", f"rollout actor {slot.name} is gone for good ({first_line(err)}); "
                                                   f"{fresh.name} takes its place")
