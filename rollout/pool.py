"""`RolloutPool`: N `RolloutWorker` actors that take whole prompt groups as they free up and return each group's
`Trajectories` as soon as it finishes; the pool can grow or shrink while groups are in flight.

Every submitted group is delivered exactly once: a group is either queued or held by one worker; a worker that dies
while holding one hands it back to the front of the queue whole, and a worker being removed finishes its group first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError
from tqdm import tqdm

from cluster.config import JobConfig
from cluster.pools import ActorPool
from rollout.models.contract import PromptEmbeds
from rollout.prompts.groups import PromptGroup
from rollout.sampling.trajectory import Trajectories
from rollout.worker import RolloutWorker


@dataclass(eq=False)
class _Slot:
    """One worker actor and its pool state."""

    handle: Any
    retiring: bool = False  # removed by resize: no new groups, killed once its group is delivered
    failures: int = 0


class RolloutPool:
    """Rollout actors with the job's per-actor resources, fed from one queue of groups."""

    def __init__(self, cfg: JobConfig, store_name: str | None = None, num_workers: int | None = None) -> None:
        """`store_name`: the job's WeightStore (`weight_store_name(cfg.run_name)`), None for fixed base weights."""
        if not ray.is_initialized():
            raise RuntimeError("start Ray before the rollout pool (cluster.runtime.start_ray), or it starts one of its "
                               "own that listens on every network address")
        self._cfg = cfg
        self._store_name = store_name
        self._actors = ActorPool("rollout", RolloutWorker, cfg.rollout)
        self._slots: list[_Slot] = []
        self._queue: deque[PromptGroup] = deque()
        self._in_flight: dict[ray.ObjectRef, tuple[_Slot, PromptGroup]] = {}
        self._attempts: dict[int, int] = {}
        self.requeued = 0  # groups queued again because their worker died
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
        """Groups submitted and not yet delivered (queued or being sampled)."""
        return len(self._queue) + len(self._in_flight)

    def submit(self, groups: Iterable[PromptGroup]) -> None:
        """Queue groups; idle workers start on them at once."""
        self._queue.extend(groups)
        self._dispatch()

    def next_result(self, timeout: float | None = None) -> Trajectories | None:
        """The next finished group, in completion order; None after `timeout` seconds or when nothing is pending.

        A group whose worker died is queued again and never returned twice; an error raised while sampling is raised
        here.
        """
        while self._in_flight:
            ready, _ = ray.wait(list(self._in_flight), num_returns=1, timeout=timeout)
            if not ready:
                return None
            slot, group = self._in_flight.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayActorError:
                self._worker_failed(slot, group)
                continue
            self._attempts.pop(group.group_id, None)
            if slot.retiring:
                self._remove(slot)
            self._dispatch()
            return result
        return None

    def results(self) -> Iterator[Trajectories]:
        """Every pending group's trajectories, as they finish."""
        while self.pending:
            result = self.next_result()
            if result is not None:
                yield result

    def resize(self, num_workers: int) -> None:
        """Grow (new workers load the current weights) or shrink (idle workers go now, busy ones after their group)."""
        if num_workers < 1:
            raise ValueError(f"a rollout pool needs at least 1 worker, got {num_workers}")
        active = [slot for slot in self._slots if not slot.retiring]
        for _ in range(num_workers - len(active)):
            self._slots.append(_Slot(self._spawn()))
        busy = {id(slot) for slot, _ in self._in_flight.values()}
        # idle workers first, newest first among equals
        order = sorted(reversed(active), key=lambda slot: id(slot) in busy)
        for slot in order[:max(0, len(active) - num_workers)]:
            slot.retiring = True
            if id(slot) not in busy:
                self._remove(slot)
        self._dispatch()

    def sample_eval(self, prompts: Sequence[str], seeds: Sequence[int],
                    weights: tuple[list[ray.ObjectRef], list] | None = None) -> torch.Tensor:
        """Evaluation images for (prompt, seed) pairs, batches spread over the workers: uint8 (B, H, W, 3) in order.

        `weights`: a packed state (ref_list, meta), e.g. the EMA weights, used instead of the policy for these images.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} evaluation prompts but {len(seeds)} seeds")
        workers = self.workers
        size = self._cfg.eval.batch_size
        starts = range(0, len(prompts), size)
        refs = [
            workers[i % len(workers)].sample_eval.remote(list(prompts[at:at + size]), list(seeds[at:at + size]), weights)
            for i, at in enumerate(starts)
        ]
        res = self._cfg.model.resolution
        if not refs:
            return torch.empty(0, res, res, 3, dtype=torch.uint8)
        with tqdm(total=len(prompts), desc="evaluation", unit="image", leave=False, disable=None) as bar:
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(ray.get(done[0])))
        return torch.cat(ray.get(refs))

    def negative_embeds(self) -> PromptEmbeds | None:
        """The empty prompt's embeddings the learner needs for true CFG (None for FLUX); ask once per job."""
        return ray.get(self.workers[0].negative_embeds.remote())

    def shutdown(self) -> None:
        """Kill every worker; groups still queued or in flight are dropped."""
        for slot in list(self._slots):
            self._remove(slot)
        self._queue.clear()
        self._in_flight.clear()

    # -----------------------------------------------------------------------------------------------------------------

    def _spawn(self) -> Any:
        return self._actors.spawn(self._cfg, self._store_name, f"rollout-{self._actors.spawned}")

    def _remove(self, slot: _Slot) -> None:
        self._slots.remove(slot)
        ray.kill(slot.handle)

    def _dispatch(self) -> None:
        """Give each idle, non-retiring worker the next queued group."""
        busy = {id(slot) for slot, _ in self._in_flight.values()}
        for slot in self._slots:
            if not self._queue:
                return
            if slot.retiring or id(slot) in busy:
                continue
            group = self._queue.popleft()
            self._in_flight[slot.handle.sample_group.remote(group)] = (slot, group)

    def _worker_failed(self, slot: _Slot, group: PromptGroup) -> None:
        """A worker died holding `group`: queue the group again (whole) and replace a worker out of restarts."""
        attempts = self._attempts[group.group_id] = self._attempts.get(group.group_id, 0) + 1
        if attempts > self._cfg.rollout.max_restarts + 1:
            raise RuntimeError(f"group {group.group_id} ({group.prompt!r}): its rollout worker died {attempts} times; "
                               f"giving up (rollout.max_restarts = {self._cfg.rollout.max_restarts})")
        self._queue.appendleft(group)
        self.requeued += 1
        slot.failures += 1
        if slot.retiring or slot.failures > self._cfg.rollout.max_restarts:
            self._remove(slot)
            if not slot.retiring:
                self._slots.append(_Slot(self._spawn()))
        self._dispatch()
