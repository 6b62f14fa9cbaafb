"""RewardService: a pool of Ray actors per scorer that scores whole groups, with timeouts, retries and loud failures.

For each scorer of `rewards.scorers`, a pool of ScorerActor processes (`rewards.num_actors` of `num_cpus_per_actor`
and `num_gpus_per_actor` each, unless the scorer's own entry overrides them) build the scorer once. A group's images
go into the object store once; each scorer's pool gets the group as contiguous batches, one per actor, sent to the
least busy actors that answer; images already in the object store (a rollout's, by reference) are fetched by the
actors on their own nodes.

An actor that stops answering (killed, crashed, its node lost) gets no calls until a probe (`pid`, sent with backoff)
answers again: its cut-off batches go to the scorer's other actors or, with none answering, wait for it; they are
never failed for it. It counts as one death per restart Ray made of it (Ray's own record), however many calls the
restart cut off. An actor Ray will not restart again is replaced by a new one in its placement-group bundle (which
waits for a node with room when its node left). More than `rewards.max_restarts` deaths of one actor within
`rewards.restart_window_s` retire it, loudly; a scorer with no actor left fails its groups with a RewardError naming
it, the count and the window.

Each call gets `timeout_s` of its own: it must answer within timeout_s x (1 + calls queued ahead of it on its actor) of
being sent, or its actor is killed (Ray restarts it) and the batch is sent again. A NaN/inf score, a scorer exception,
or more than `max_retries` failures a scorer answered (its backend unavailable) or timeouts of one batch fail the whole
group with a RewardError that names it: a group is never scored 0. The driver either calls `score` (blocking) or
`submit`s groups as they arrive and `wait`s / `collect`s them; the failures, retries and timeouts it survives are
reported as they happen (`report`).
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cluster.config import RewardsConfig, RewardSpec
from cluster.pools import ActorPool
from rewards.base import RewardInputError, ScorerUnavailable, as_uint8_images

PROBE_FIRST_S = 0.5  # after an actor stops answering, the first wait before probing it again
PROBE_MAX_S = 2.0  # the backoff between two probes grows up to this (Ray holds a call to a restarting actor ~2 s)
# what Ray says of every call to an actor that is restarting or unreachable, left out of the messages
RAY_BOILERPLATE = re.compile(r"(The actor [0-9a-f]+ is unavailable: The actor is temporarily unavailable: )"
                             r"| The task may or may not have been executed on the actor\.")


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
    retries: int = 0  # batches sent again: after their actor stopped answering, a timeout or a scorer unavailable


@dataclass
class ServiceCounters:
    """Running totals since the service started."""

    groups_scored: int = 0
    groups_failed: int = 0
    retries: int = 0  # batches sent again
    actor_failures: int = 0  # actor deaths (one per restart, however many calls each cut off), timeout kills aside
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
        # A rollout's images are a tensor: unpickling the first one imports torch (seconds on a busy node), which
        # would count against the first call's timeout_s; imported here, it is part of the start, which is waited for.
        import torch  # noqa: F401

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
    attempt: int = 0  # sends after a failure the scorer answered or a timeout (at most max_retries)
    resend: str | None = None  # why it is sent again, said when it is sent (None: its first send)


@dataclass(eq=False)
class _Actor:
    """One actor of a scorer's pool as the driver sees it; a new actor that takes its place keeps its name."""

    scorer: str
    name: str  # "<scorer>-<index>"
    handle: Any
    node: Any  # ref to the id of its node
    load: int = 0  # calls in flight
    life: int = 0  # one more each time it stops answering: a call of an earlier life that fails says nothing new
    restarts_seen: int = 0  # Ray's restarts of this handle already counted
    down_since: float | None = None  # stopped answering at (monotonic s): no calls until a probe answers
    down_group: int = -1  # the group whose call found it down
    probe: Any = None  # the probe in flight
    probe_at: float = 0.0  # when to send the next probe (monotonic s)
    backoff: float = PROBE_FIRST_S  # the wait after the next probe that finds it still restarting
    deaths: deque[float] = field(default_factory=deque)  # when it died (monotonic s), within the restart window
    retired: str | None = None  # why it is used no more: more deaths within the window than max_restarts

    @property
    def up(self) -> bool:
        """Whether it takes calls: answering, and not retired."""
        return self.down_since is None and self.retired is None


@dataclass
class _Call:
    batch: _Batch
    actor: _Actor
    life: int  # the actor's life when the call was sent
    deadline: float


class RewardService:
    """Scores groups of images with every configured scorer on its own pool of Ray actors."""

    def __init__(self, cfg: RewardsConfig, *, startup_timeout_s: float = 600.0, metrics: bool = True,
                 pools: dict[str, ActorPool] | None = None, placement_timeout_s: float = 60.0,
                 report: Callable[[str, str], None] | None = None):
        """`metrics`: the scorer actors record cluster/metrics.py's reward metrics. `pools`: scorer name -> its
        reserved placement (`scorer_pool`; made here when not given). `report(event, message)` hears of every actor
        failure, replacement, retirement, retry and timeout."""
        from rewards.registry import REGISTRY, registered

        unknown = [s.name for s in cfg.scorers if s.name not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown reward {unknown[0]!r}; registered: {', '.join(registered())}")
        self.cfg = cfg
        self.weights = {s.name: float(s.weight) for s in cfg.scorers}
        self.counters = ServiceCounters()
        self._report = report or (lambda event, message: None)
        self._pools = pools or {s.name: scorer_pool(cfg, s, placement_timeout_s) for s in cfg.scorers}
        self._spawn_args = {s.name: (s.name, REGISTRY[s.name], s.options, metrics) for s in cfg.scorers}
        self._actors: dict[str, list[_Actor]] = {}
        for s in cfg.scorers:
            handles = [self._pools[s.name].spawn(*self._spawn_args[s.name]) for _ in range(cfg.pool_of(s).num_actors)]
            self._actors[s.name] = [_Actor(s.name, f"{s.name}-{i}", h, h.node.remote()) for i, h in enumerate(handles)]
        self._parked: dict[str, deque[_Batch]] = {s.name: deque() for s in cfg.scorers}  # waiting for an actor
        self._calls: dict[Any, _Call] = {}
        self._probes: dict[Any, _Actor] = {}
        self._groups: dict[int, _Group] = {}
        try:
            self.actor_pids(timeout_s=startup_timeout_s)
        except Exception:
            self.shutdown()
            raise

    # ---- public API -------------------------------------------------------------------------------------------

    def actor_pids(self, timeout_s: float | None = None) -> dict[str, list[int]]:
        """Process id of every actor in use, per scorer; waits until they are built and raises if one cannot start."""
        import ray

        pids = {}
        for name, actors in self._actors.items():
            try:
                pids[name] = ray.get([a.handle.pid.remote() for a in actors if a.retired is None], timeout=timeout_s)
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
            in_use = sum(a.retired is None for a in actors) or 1
            bounds = np.linspace(0, n, min(in_use, n) + 1).round().astype(int)
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
        """Scorer pool ("rewards/<scorer>") -> its actors: name and node (short id; "starting", "restarting" while
        it does not answer, or "retired")."""
        return {f"rewards/{name}": [{"name": a.name, "node": _node_of(a)} for a in actors]
                for name, actors in self._actors.items()}

    def num_alive(self) -> int:
        """Actors in use (answering, or being restarted or replaced), over all scorers."""
        return sum(a.retired is None for actors in self._actors.values() for a in actors)

    def score(self, images: Any, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None, *,
              group_id: int) -> GroupRewards:
        """Score one group and wait for it."""
        return self.collect(self.submit(images, prompts, metadata, group_id=group_id))

    def shutdown(self) -> None:
        """End every actor of the service and give its reserved resources back."""
        for pool in self._pools.values():
            pool.shutdown()
        self._calls.clear()
        self._probes.clear()
        for parked in self._parked.values():
            parked.clear()

    # ---- scheduling -------------------------------------------------------------------------------------------

    def _send(self, batch: _Batch, avoid: _Actor | None = None) -> None:
        """Send a batch to the least busy actor of its scorer that answers (another one than `avoid` if there is
        one); with none answering it waits for one, and with none left in use its group fails."""
        group, name = batch.group, batch.scorer
        if group.error is not None or self._groups.get(group.group_id) is not group:
            return  # failed or dropped meanwhile: nothing to score
        actors = self._actors[name]
        up = [a for a in actors if a.up]
        if not up:
            if all(a.retired is not None for a in actors):
                self._fail(group, self._retired_message(name))
            else:
                self._parked[name].append(batch)
            return
        actor = min([a for a in up if a is not avoid] or up, key=lambda a: a.load)
        if batch.resend is not None:
            group.retries += 1
            self.counters.retries += 1
            self._report("reward_retry", f"scorer {name!r}: images {batch.start}..{batch.stop - 1} of group "
                                         f"{group.group_id} sent again to {actor.name} ({batch.resend})")
            batch.resend = None
        ref = actor.handle.score.remote(group.images, batch.start, batch.stop, group.prompts[batch.start:batch.stop],
                                        group.metadata[batch.start:batch.stop])
        deadline = time.monotonic() + self.cfg.timeout_s * (1 + actor.load)
        actor.load += 1
        self._calls[ref] = _Call(batch, actor, actor.life, deadline)

    def _resend(self, batch: _Batch, reason: str, avoid: _Actor, counted: bool = False) -> None:
        """Send a batch again; `counted`: after a failure the scorer answered or a timeout, which fail its group
        once there were more than max_retries of them."""
        group = batch.group
        if group.error is not None:
            return
        if counted:
            if batch.attempt >= self.cfg.max_retries:
                self._fail(group, f"scorer {batch.scorer!r}: images {batch.start}..{batch.stop - 1} failed "
                                  f"{batch.attempt + 1} times; last: {reason}")
                return
            batch.attempt += 1
        batch.resend = reason
        self._send(batch, avoid)

    def _dispatch(self, scorer: str) -> None:
        """Send the batches that wait for an actor of `scorer` while one answers."""
        parked = self._parked[scorer]
        while parked and any(a.up for a in self._actors[scorer]):
            self._send(parked.popleft())

    def _pump(self, timeout: float | None) -> None:
        """Wait until a call or a probe returns, a call reaches its deadline or a probe is due (at most `timeout` s),
        and handle what happened."""
        import ray

        self._send_probes()
        due = [c.deadline for c in self._calls.values()]
        due += [a.probe_at for actors in self._actors.values() for a in actors if _awaits_probe(a)]
        wait_s = max(0.0, min(due) - time.monotonic()) if due else None
        if timeout is not None:
            wait_s = timeout if wait_s is None else min(wait_s, timeout)
        refs = list(self._calls) + list(self._probes)
        if not refs:  # only probes due later
            time.sleep(wait_s or 0.0)
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=wait_s)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            if ref in self._probes:
                self._probed(ref)
            elif ref in self._calls:
                self._receive(ref)
        now = time.monotonic()
        for ref, call in list(self._calls.items()):
            if call.deadline <= now and ref in self._calls:
                self._time_out(ref, call)

    def _release(self, ref: Any) -> _Call:
        call = self._calls.pop(ref)
        call.actor.load -= 1
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
            actor = call.actor
            if call.life == actor.life and actor.retired is None:  # the first news that it stopped answering
                self._down(actor, group.group_id, _cause(err))
            self._resend(batch, f"its call was cut off when {actor.name} stopped answering", actor)
            return
        except ray.exceptions.RayTaskError as err:
            if isinstance(getattr(err, "cause", None), ScorerUnavailable):  # its backend may answer next time
                self._resend(batch, _cause(err), call.actor, counted=True)
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
        """A hung call: kill its actor (Ray restarts it; its other calls are cut off and wait for it) and send the
        batch again."""
        self._release(ref)
        self.counters.timeouts += 1
        actor, group_id = call.actor, call.batch.group.group_id
        self._report("reward_timeout", f"reward actor {actor.name} gave no answer within {self.cfg.timeout_s:g} s on "
                                       f"group {group_id}; it is restarted")
        if call.life == actor.life and actor.retired is None:
            self._down(actor, group_id, f"no answer within {self.cfg.timeout_s:g} s", timed_out=True)
        self._resend(call.batch, f"no answer within {self.cfg.timeout_s}s", actor, counted=True)

    # ---- actors that stop answering ---------------------------------------------------------------------------

    def _down(self, actor: _Actor, group_id: int, cause: str, timed_out: bool = False) -> None:
        """An actor stopped answering (or, `timed_out`, hung and is killed here): it gets no calls until a probe
        answers, and its death counts."""
        import ray

        actor.life += 1
        actor.down_since = actor.probe_at = time.monotonic()
        actor.down_group, actor.backoff = group_id, PROBE_FIRST_S
        if timed_out:
            ray.kill(actor.handle, no_restart=False)
        else:
            self.counters.actor_failures += 1
            others = any(a.up for a in self._actors[actor.scorer])
            self._report("reward_actor_failed", f"reward actor {actor.name} failed on group {group_id} ({cause}); " + (
                "its batches go to the other actors until it answers again" if others else
                f"no {actor.scorer!r} reward actor answers now: its batches wait until one does"))
        self._died(actor, cause)

    def _send_probes(self) -> None:
        """Ask each actor that does not answer for its pid, when its probe is due."""
        now = time.monotonic()
        for actors in self._actors.values():
            for actor in actors:
                if _awaits_probe(actor) and actor.probe_at <= now:
                    actor.probe = actor.handle.pid.remote()
                    self._probes[actor.probe] = actor

    def _probed(self, ref: Any) -> None:
        """A probe returned: the actor answers again, is still restarting (probed again later, with backoff), or
        is gone for good (replaced)."""
        import ray

        actor = self._probes.pop(ref)
        actor.probe = None
        try:
            ray.get(ref)
        except ray.exceptions.ActorUnavailableError:  # restarting, or waiting for a node that can hold it
            actor.probe_at = time.monotonic() + actor.backoff
            actor.backoff = min(2 * actor.backoff, PROBE_MAX_S)
            return
        except ray.exceptions.RayActorError as err:  # out of Ray's restarts, or ended
            self._gone(actor, err)
            return
        restarts = _ray_restarts(actor.handle)
        self._died_unseen(actor, restarts - actor.restarts_seen - 1)
        actor.restarts_seen = restarts
        if actor.retired is None:
            actor.down_since, actor.node = None, actor.handle.node.remote()
            self._dispatch(actor.scorer)

    def _gone(self, actor: _Actor, err: Exception) -> None:
        """An actor Ray will not restart: a new one takes its place in its bundle, unless it died too often."""
        self._died_unseen(actor, _ray_restarts(actor.handle) - actor.restarts_seen)  # its last death: counted
        if actor.retired is not None:
            return
        actor.handle = self._pools[actor.scorer].replace(actor.handle, *self._spawn_args[actor.scorer])
        actor.restarts_seen, actor.probe_at = 0, time.monotonic()  # the probe waits while the new actor starts
        self._report("reward_actor_replaced", f"reward actor {actor.name} is gone for good ({_cause(err)}); a new "
                                              f"one takes its place in its bundle")

    def _died_unseen(self, actor: _Actor, count: int) -> None:
        """Count the deaths of an actor that no call saw (it died again while Ray restarted it)."""
        for _ in range(count):
            self.counters.actor_failures += 1
            self._report("reward_actor_failed", f"reward actor {actor.name} failed on group {actor.down_group} "
                                                f"again while it restarted")
            self._died(actor, "it died again while it restarted")

    def _died(self, actor: _Actor, cause: str) -> None:
        """Record a death; more than max_restarts within restart_window_s retire the actor."""
        now = time.monotonic()
        actor.deaths.append(now)
        while actor.deaths[0] <= now - self.cfg.restart_window_s:
            actor.deaths.popleft()
        if len(actor.deaths) > self.cfg.max_restarts and actor.retired is None:
            self._retire(actor, cause)

    def _retire(self, actor: _Actor, cause: str) -> None:
        """Use an actor no more (it is ended, its bundle kept); with none of its scorer left, its groups fail."""
        actor.retired = (f"reward actor {actor.name} died {len(actor.deaths)} times within "
                         f"{self.cfg.restart_window_s:g} s (rewards.max_restarts = {self.cfg.max_restarts} within "
                         f"rewards.restart_window_s; last: {cause})")
        self._probes.pop(actor.probe, None)
        actor.probe = None
        self._pools[actor.scorer].release(actor.handle)
        left = any(a.retired is None for a in self._actors[actor.scorer])
        self._report("reward_actor_retired", actor.retired + ("; it is not restarted again" if left else
                                                              f"; no {actor.scorer!r} actor is left: its groups fail"))
        if not left:
            parked = self._parked[actor.scorer]
            while parked:
                self._fail(parked.popleft().group, self._retired_message(actor.scorer))

    def _retired_message(self, scorer: str) -> str:
        return f"scorer {scorer!r} has no reward actor left: " + "; ".join(
            a.retired for a in self._actors[scorer] if a.retired is not None)

    def _fail(self, group: _Group, message: str, lost: bool = False) -> None:
        """Fail the group (RewardError; ImagesLost with `lost`: it is sampled again, not counted as failed)."""
        if group.error is None:
            group.error = (ImagesLost if lost else RewardError)(f"group {group.group_id}: {message}")
            self.counters.groups_failed += not lost


def _awaits_probe(actor: _Actor) -> bool:
    """Whether an actor does not answer, is in use, and has no probe in flight."""
    return actor.down_since is not None and actor.retired is None and actor.probe is None


def _ray_restarts(handle: Any) -> int:
    """How often Ray restarted an actor, as its control store (GCS) records it: every restart, whether or not a call
    of ours was cut off by it."""
    from ray._private.state import actors

    return int(actors(actor_id=handle._actor_id.hex())["NumRestarts"])


def _node_of(actor: _Actor) -> str:
    """Where an actor runs, for `describe`."""
    if actor.retired is not None:
        return "retired"
    return "restarting" if actor.down_since is not None else _short_node(actor.node)


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
    """What went wrong inside Ray in one line: the scorer's exception, or the first line of Ray's own message (less
    what it says of every call to an unavailable actor)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, Exception) and cause is not err:  # a RayTaskError wraps the scorer's exception
        return (f"{type(cause).__name__}: {cause}".splitlines() or [""])[0]
    text = RAY_BOILERPLATE.sub(lambda m: "actor unavailable: " if m.group(1) else "", str(err))
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    # an actor whose __init__ raised: Ray's message ends with the exception line of the constructor's traceback
    return lines[-1] if getattr(err, "actor_init_failed", False) else lines[0]
