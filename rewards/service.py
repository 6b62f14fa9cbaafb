"""RewardService: a pool of Ray actors per scorer that scores whole groups, with timeouts, retries and loud failures.

For each scorer of `rewards.scorers`, a pool of ScorerActor processes (`rewards.num_actors` of `num_cpus_per_actor`
and `num_gpus_per_actor` each, unless the scorer's own entry overrides them) build the scorer once. A group's images
go into the object store once; each scorer's pool gets the group as contiguous batches, one per actor, sent to the
least busy actors; images already in the object store (a rollout's, by reference) are fetched by the actors on their
own nodes. Each call gets `timeout_s` of its own: it must answer within timeout_s × (1 + calls queued ahead
of it on its actor) of being sent, or its actor is killed (Ray restarts it, up to `rewards.max_restarts`); a batch
whose actor died or hung is retried on another actor, at most `max_retries` times. A NaN/inf score, a scorer
exception or exhausted retries fail the whole group with a RewardError that names it: a group is never scored 0. The
driver either calls `score` (blocking) or `submit`s groups as they arrive and `wait`s / `collect`s them; the
failures, retries and timeouts it survives are reported as they happen (`report`).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cluster.config import RewardsConfig, RewardSpec
from cluster.pools import ActorPool
from rewards.base import RewardInputError, ScorerUnavailable, as_uint8_images


class RewardError(RuntimeError):
    """A group could not be scored: a scorer raised, returned NaN/inf, or its actors failed every retry."""


class ImagesLost(RewardError):
    """A group's images, submitted by reference, are gone from the object store (the node that held them left): the
    group must be sampled again, not dropped."""


@dataclass
class GroupRewards:
    """The rewards of one group of N images."""

    group_id: int
    scores: dict[str, np.ndarray]  # scorer -> float32 (N,), every configured scorer, zero weights included
    total: np.ndarray  # float32 (N,): sum of weight * score over the scorers with a non-zero weight
    metrics: dict[str, np.ndarray] = field(default_factory=dict)  # "scorer/metric" -> (N,), e.g. "pickscore/raw"
    latency_s: dict[str, float] = field(default_factory=dict)  # scorer -> submit to last batch back, seconds
    compute_s: dict[str, float] = field(default_factory=dict)  # scorer -> seconds inside the scorer, all batches
    retries: int = 0  # batches re-sent after an actor died or timed out


@dataclass
class ServiceCounters:
    """Running totals since the service started."""

    groups_scored: int = 0
    groups_failed: int = 0
    retries: int = 0
    actor_failures: int = 0  # calls lost to a dead actor
    timeouts: int = 0  # calls that hung past timeout_s (their actor was killed)
    nonfinite: int = 0  # groups failed for NaN/inf scores


@dataclass(frozen=True)
class RewardHandle:
    """What `submit` returns: the group it stands for."""

    group_id: int


class ScorerActor:
    """One scorer in one actor process; `target` is the driver's registry entry, so run-time registrations work."""

    def __init__(self, name: str, target: str, options: Mapping[str, Any], metrics: bool = True):
        import inspect

        import ray

        from cluster.metrics import Recorder
        from rewards.registry import REGISTRY, build, scorer_class

        self.name = name
        self.metrics = Recorder(metrics)
        self.metrics.zero("reward_images_total", scorer=name)
        REGISTRY[name] = target
        options = dict(options)
        # An actor given a GPU puts its model there unless the scorer's options say otherwise.
        if ray.get_gpu_ids() and "device" not in options and "device" in inspect.signature(scorer_class(name)).parameters:
            options["device"] = "cuda"
        self.scorer = build(name, **options)

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        """The id of the Ray node the actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def score(self, images: np.ndarray, start: int, stop: int, prompts: Sequence[str],
              metadata: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
        """Scores and metrics of images[start:stop] (a uint8 array or tensor), and the seconds it took."""
        began = time.perf_counter()
        result = self.scorer(as_uint8_images(images[start:stop]), prompts, metadata)
        metrics = {k: np.asarray(v) for k, v in result.metrics.items()}
        seconds = time.perf_counter() - began
        self.metrics.observe("reward_seconds", seconds, scorer=self.name)
        self.metrics.inc("reward_images_total", stop - start, scorer=self.name)
        return result.scores, metrics, seconds


@dataclass
class _Group:
    group_id: int
    images: Any  # ObjectRef of the uint8 (N, H, W, 3) array
    prompts: list[str]
    metadata: list[dict]
    submitted: float
    scores: dict[str, np.ndarray]
    pending: dict[str, int]  # scorer -> batches not back yet
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    latency_s: dict[str, float] = field(default_factory=dict)
    compute_s: dict[str, float] = field(default_factory=dict)
    retries: int = 0
    error: RewardError | None = None

    @property
    def done(self) -> bool:
        return self.error is not None or not any(self.pending.values())


@dataclass
class _Batch:
    group: _Group
    scorer: str
    start: int
    stop: int
    attempt: int = 0


@dataclass
class _Call:
    batch: _Batch
    actor: int
    generation: int  # the actor's life when the call was sent; a death is counted once per life
    deadline: float


class RewardService:
    """Scores groups of images with every configured scorer on its own pool of Ray actors."""

    def __init__(self, cfg: RewardsConfig, *, startup_timeout_s: float = 600.0, metrics: bool = True,
                 pools: dict[str, ActorPool] | None = None, placement_timeout_s: float = 60.0,
                 report: Callable[[str, str], None] | None = None):
        """`metrics`: the scorer actors record cluster/metrics.py's reward metrics. `pools`: scorer name -> its
        reserved placement (`scorer_pool`; made here when not given). `report(event, message)` hears of every actor
        failure, retry and timeout."""
        from rewards.registry import REGISTRY, registered

        unknown = [s.name for s in cfg.scorers if s.name not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown reward {unknown[0]!r}; registered: {', '.join(registered())}")
        self.cfg = cfg
        self.max_restarts = cfg.max_restarts
        self.weights = {s.name: float(s.weight) for s in cfg.scorers}
        self.counters = ServiceCounters()
        self._report = report or (lambda event, message: None)
        self._pools = pools or {s.name: scorer_pool(cfg, s, placement_timeout_s) for s in cfg.scorers}
        self._actors = {s.name: [self._pools[s.name].spawn(s.name, REGISTRY[s.name], s.options, metrics)
                                 for _ in range(cfg.pool_of(s).num_actors)]
                        for s in cfg.scorers}
        self._nodes = {name: [actor.node.remote() for actor in actors] for name, actors in self._actors.items()}
        self._load = {name: [0] * len(actors) for name, actors in self._actors.items()}
        self._generation = {name: [0] * len(actors) for name, actors in self._actors.items()}
        self._deaths = {name: [0] * len(actors) for name, actors in self._actors.items()}
        self._calls: dict[Any, _Call] = {}
        self._groups: dict[int, _Group] = {}
        try:
            self.actor_pids(timeout_s=startup_timeout_s)
        except Exception:
            self.shutdown()
            raise

    # ---- public API -------------------------------------------------------------------------------------------

    def actor_pids(self, timeout_s: float | None = None) -> dict[str, list[int]]:
        """Process id of every actor, per scorer; waits until they are built and raises if one cannot start."""
        import ray

        pids = {}
        for name, actors in self._actors.items():
            try:
                pids[name] = ray.get([a.pid.remote() for a in actors], timeout=timeout_s)
            except ray.exceptions.RayActorError as err:
                raise RewardError(f"the {name!r} reward actors could not start: {_cause(err)}") from err
            except ray.exceptions.GetTimeoutError as err:
                raise RewardError(f"the {name!r} reward actors did not start within {timeout_s}s (waiting for "
                                  f"{self.cfg.num_cpus_per_actor} CPUs / {self.cfg.num_gpus_per_actor} GPUs each, "
                                  f"or loading the model)") from err
        return pids

    def submit(self, images: Any, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None, *,
               group_id: int) -> RewardHandle:
        """Start scoring one group: uint8 (N, H, W, 3) images, or an object ref to them (not fetched here), and one
        prompt and metadata entry per image."""
        import ray

        if isinstance(images, ray.ObjectRef):
            n = len(prompts)
        else:
            images = as_uint8_images(images)
            n = images.shape[0]
            images = ray.put(images)
        metadata = [{} for _ in range(n)] if metadata is None else [dict(m) for m in metadata]
        if len(prompts) != n or len(metadata) != n or n == 0:
            raise RewardInputError(f"group {group_id}: {n} images but {len(prompts)} prompts and "
                                   f"{len(metadata)} metadata entries")
        if group_id in self._groups:
            raise ValueError(f"group {group_id} is already being scored; collect it first")
        group = _Group(group_id, images, list(prompts), metadata, time.monotonic(),
                       scores={name: np.full(n, np.nan, np.float32) for name in self._actors},
                       pending={name: 0 for name in self._actors})
        self._groups[group_id] = group
        for name, actors in self._actors.items():
            bounds = np.linspace(0, n, min(len(actors), n) + 1).round().astype(int)
            for start, stop in zip(bounds[:-1], bounds[1:]):
                group.pending[name] += 1
                self._send(_Batch(group, name, int(start), int(stop)))
        return RewardHandle(group_id)

    def wait(self, handles: Sequence[RewardHandle] | None = None, timeout: float | None = None
             ) -> list[RewardHandle]:
        """The given (default: all submitted) groups that are done, scored or failed; waits for at least one."""
        wanted = [RewardHandle(g) for g in self._groups] if handles is None else list(handles)
        missing = [h.group_id for h in wanted if h.group_id not in self._groups]
        if missing:
            raise KeyError(f"groups {missing} were never submitted or are already collected")
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            done = [h for h in wanted if self._groups[h.group_id].done]
            left = None if end is None else end - time.monotonic()
            if done or not wanted or (left is not None and left <= 0):
                return done
            self._pump(left)

    def collect(self, handle: RewardHandle, timeout: float | None = None) -> GroupRewards:
        """The rewards of a submitted group, waiting for them; raises RewardError if the group failed."""
        if not self.wait([handle], timeout):
            raise TimeoutError(f"group {handle.group_id} was not scored within {timeout}s")
        group = self._groups.pop(handle.group_id)
        if group.error is not None:
            raise group.error
        self.counters.groups_scored += 1
        total = np.zeros(len(group.prompts), np.float64)
        for name, weight in self.weights.items():
            if weight != 0:
                total += weight * group.scores[name].astype(np.float64)
        return GroupRewards(group.group_id, group.scores, total.astype(np.float32), group.metrics,
                            group.latency_s, group.compute_s, group.retries)

    def drop(self, handle: RewardHandle) -> None:
        """Stop waiting for a group (it will not be trained): calls already sent finish, their scores are ignored."""
        self._groups.pop(handle.group_id, None)

    def describe(self) -> dict[str, list[dict[str, Any]]]:
        """Scorer pool ("rewards/<scorer>") -> its actors: name and node (short id, or "starting")."""
        pools = {}
        for name, refs in self._nodes.items():
            pools[f"rewards/{name}"] = [{"name": f"{name}-{i}", "node": _short_node(ref)} for i, ref in enumerate(refs)]
        return pools

    def num_alive(self) -> int:
        """Actors not seen to die more often than Ray restarts them, over all scorers."""
        return sum(d <= self.max_restarts for deaths in self._deaths.values() for d in deaths)

    def score(self, images: Any, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None, *,
              group_id: int) -> GroupRewards:
        """Score one group and wait for it."""
        return self.collect(self.submit(images, prompts, metadata, group_id=group_id))

    def shutdown(self) -> None:
        """End every actor of the service and give its reserved resources back."""
        for pool in self._pools.values():
            pool.shutdown()
        self._calls.clear()

    # ---- scheduling -------------------------------------------------------------------------------------------

    def _send(self, batch: _Batch, avoid: int | None = None) -> None:
        """Send a batch to the least busy live actor of its scorer (another one than `avoid` if there is one)."""
        name = batch.scorer
        live = [i for i in range(len(self._actors[name])) if self._deaths[name][i] <= self.max_restarts]
        if not live:
            self._fail(batch.group, f"every {name!r} reward actor is dead (each restarted {self.max_restarts} times)")
            return
        choices = [i for i in live if i != avoid] or live
        actor = min(choices, key=lambda i: self._load[name][i])
        group = batch.group
        ref = self._actors[name][actor].score.remote(group.images, batch.start, batch.stop,
                                                     group.prompts[batch.start:batch.stop],
                                                     group.metadata[batch.start:batch.stop])
        deadline = time.monotonic() + self.cfg.timeout_s * (1 + self._load[name][actor])
        self._load[name][actor] += 1
        self._calls[ref] = _Call(batch, actor, self._generation[name][actor], deadline)

    def _pump(self, timeout: float | None) -> None:
        """Wait until a call returns or reaches its deadline (at most `timeout` s), and handle what happened."""
        import ray

        if not self._calls:
            return
        refs = list(self._calls)
        wait_s = max(0.0, min(c.deadline for c in self._calls.values()) - time.monotonic())
        if timeout is not None:
            wait_s = min(wait_s, timeout)
        ready, _ = ray.wait(refs, num_returns=1, timeout=wait_s)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            self._receive(ref)
        now = time.monotonic()
        for ref, call in list(self._calls.items()):
            if call.deadline <= now:
                self._time_out(ref, call)

    def _release(self, ref: Any) -> _Call:
        call = self._calls.pop(ref)
        self._load[call.batch.scorer][call.actor] -= 1
        return call

    def _receive(self, ref: Any) -> None:
        import ray

        call = self._release(ref)
        batch, group, name = call.batch, call.batch.group, call.batch.scorer
        try:
            scores, metrics, seconds = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError) as err:
            if getattr(err, "object_ref_hex", None) == group.images.hex():  # the images, not the actor, are gone
                self._fail(group, f"its images are lost ({_cause(err)})", lost=True)
                return
            self.counters.actor_failures += 1
            self._died(name, call)
            self._report("reward_actor_failed", f"reward actor {name}-{call.actor} failed on group {group.group_id} "
                                                f"({_cause(err)})")
            self._retry(batch, call.actor, f"its actor died ({_cause(err)})")
            return
        except ray.exceptions.RayTaskError as err:
            if isinstance(getattr(err, "cause", None), ScorerUnavailable):  # its backend may answer next time
                self._retry(batch, call.actor, _cause(err))
                return
            self._fail(group, f"scorer {name!r} raised on images {batch.start}..{batch.stop - 1}: {_cause(err)}")
            return
        if group.error is not None:
            return
        scores = np.asarray(scores, np.float32)
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            self.counters.nonfinite += 1
            indices = [int(batch.start + i) for i in bad]
            prompts = sorted({group.prompts[i] for i in indices})
            self._fail(group, f"scorer {name!r} returned non-finite scores {scores[bad].tolist()} for images "
                              f"{indices} (prompt {' | '.join(map(repr, prompts))})")
            return
        group.scores[name][batch.start:batch.stop] = scores
        for key, values in metrics.items():
            full = group.metrics.setdefault(f"{name}/{key}", np.full(len(group.prompts), np.nan, np.float32))
            full[batch.start:batch.stop] = values
        group.compute_s[name] = group.compute_s.get(name, 0.0) + float(seconds)
        group.pending[name] -= 1
        if group.pending[name] == 0:
            group.latency_s[name] = time.monotonic() - group.submitted

    def _time_out(self, ref: Any, call: _Call) -> None:
        """A hung call: kill its actor (Ray restarts it; its other calls fail and are retried) and retry the batch."""
        import ray

        self._release(ref)
        self.counters.timeouts += 1
        name = call.batch.scorer
        self._report("reward_timeout", f"reward actor {name}-{call.actor} gave no answer within {self.cfg.timeout_s:g} "
                                       f"s on group {call.batch.group.group_id}; it is restarted")
        if self._died(name, call):
            ray.kill(self._actors[name][call.actor], no_restart=False)
        self._retry(call.batch, call.actor, f"no answer within {self.cfg.timeout_s}s")

    def _died(self, name: str, call: _Call) -> bool:
        """Count one death per actor life; True if this call is the first to report it."""
        if call.generation != self._generation[name][call.actor]:
            return False
        self._generation[name][call.actor] += 1
        self._deaths[name][call.actor] += 1
        return True

    def _retry(self, batch: _Batch, failed_actor: int, reason: str) -> None:
        group = batch.group
        if group.error is not None:
            return
        if batch.attempt >= self.cfg.max_retries:
            self._fail(group, f"scorer {batch.scorer!r}: images {batch.start}..{batch.stop - 1} failed "
                              f"{batch.attempt + 1} times; last: {reason}")
            return
        batch.attempt += 1
        group.retries += 1
        self.counters.retries += 1
        self._report("reward_retry", f"scorer {batch.scorer!r}: images {batch.start}..{batch.stop - 1} of group "
                                     f"{group.group_id} sent again (attempt {batch.attempt + 1}: {reason})")
        self._send(batch, avoid=failed_actor)

    def _fail(self, group: _Group, message: str, lost: bool = False) -> None:
        """Fail the group (RewardError; ImagesLost with `lost`: it is sampled again, not counted as failed)."""
        if group.error is None:
            group.error = (ImagesLost if lost else RewardError)(f"group {group.group_id}: {message}")
            self.counters.groups_failed += not lost


def _short_node(ref: Any) -> str:
    """The short id of the node a `node()` call answered, or what stands for it while there is no answer."""
    import ray

    if not ray.wait([ref], timeout=0)[0]:
        return "starting"
    try:
        return ray.get(ref)[:8]
    except ray.exceptions.RayError:
        return "unreachable"


def scorer_pool(cfg: RewardsConfig, scorer: RewardSpec, placement_timeout_s: float = 60.0) -> ActorPool:
    """The reserved placement of one scorer's actors (the reward pool's settings with the scorer's overrides)."""
    return ActorPool(f"rewards/{scorer.name}", ScorerActor, cfg.pool_of(scorer),
                     placement_timeout_s=placement_timeout_s)


def _cause(err: Exception) -> str:
    """What went wrong inside Ray in one line: the scorer's exception, or the first line of Ray's own message."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, Exception) and cause is not err:  # a RayTaskError wraps the scorer's exception
        return (f"{type(cause).__name__}: {cause}".splitlines() or [""])[0]
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    # an actor whose __init__ raised: Ray's message ends with the exception line of the constructor's traceback
    return lines[-1] if getattr(err, "actor_init_failed", False) else lines[0]
