"""The one place that creates the job's Ray actors and hands Ray their options.

Each pool (the rollout workers, the actors of one scorer, the learner ranks) is an `ActorPool`: one Ray placement
group with a bundle per actor (the actor's CPUs, GPUs and custom resources) and the pool's placement strategy,
reserved before any of its actors starts. A pool whose bundles no node can hold is refused at once; one that the
cluster could hold but does not within `ray.placement_timeout_s` is refused then; either way with one message naming
the pool, one bundle and what each node has. When a node dies Ray re-places the bundles that were on it and restarts
their actors there (up to `max_restarts`), or keeps them pending until a node with room joins; an actor that cannot
come back is `replace`d by a new one in its bundle.

`service_actor` creates the job's named bookkeeping actors (the weight store) on the driver's own node, taking no CPU.
Nothing outside `cluster/` passes resource options to Ray (tests/test_layering.py checks it).
"""

from __future__ import annotations

import math
from typing import Any

import ray
from ray.util import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from cluster.config import PoolConfig, RestartablePoolConfig
from cluster.quiet import quiet_runtime_env

EPSILON = 1e-9


class PlacementError(RuntimeError):
    """A pool that cannot be placed on the cluster's nodes; the message names the pool, one bundle and each node."""


def describe(resources: dict[str, float]) -> str:
    """'CPU 0.5, GPU 1, rollout_node 0.01', leaving out Ray's own bookkeeping resources."""
    shown = {k: v for k, v in resources.items()
             if not k.startswith("node:") and "_group_" not in k and k not in ("memory", "object_store_memory")}
    ordered = sorted(shown.items(), key=lambda kv: (kv[0] not in ("CPU", "GPU"), kv[0]))  # CPU and GPU first
    return ", ".join(f"{k} {v:g}" for k, v in ordered)


def alive_nodes(available: bool = False) -> dict[str, dict[str, float]]:
    """Node id -> total (or, with `available`, currently free) resources of every alive node."""
    if available:
        from ray._private.state import available_resources_per_node

        free = available_resources_per_node()
    nodes = {}
    for node in ray.nodes():
        if node["Alive"]:
            nodes[node["NodeID"]] = dict(free.get(node["NodeID"], {})) if available else dict(node["Resources"])
    return nodes


def _holds(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many bundles fit in a node's resources."""
    return min(math.floor(node.get(k, 0.0) / v + EPSILON) for k, v in bundle.items())


def placement_problem(cfg: PoolConfig, count: int, nodes: dict[str, dict[str, float]]) -> str | None:
    """Why `count` bundles of the pool cannot be placed on these nodes even when they are empty, or None."""
    bundle = cfg.bundle()
    holds = sorted((_holds(res, bundle) for res in nodes.values()), reverse=True)
    strategy = cfg.placement_strategy
    if not holds or holds[0] < 1:
        return "no node can hold one bundle"
    if strategy == "STRICT_PACK" and holds[0] < count:
        return f"STRICT_PACK needs one node for all {count} bundles; the largest holds {holds[0]}"
    if strategy == "STRICT_SPREAD" and sum(h >= 1 for h in holds) < count:
        return f"STRICT_SPREAD needs {count} nodes that hold a bundle; {sum(h >= 1 for h in holds)} do"
    if sum(holds) < count:
        return f"the nodes together hold {sum(holds)} of its {count} bundles"
    return None


def _nodes_report(nodes: dict[str, dict[str, float]], what: str) -> str:
    return "; ".join(f"node {node_id[:8]} {what}: {describe(res) or 'nothing'}" for node_id, res in nodes.items())


class ActorPool:
    """The actors of one pool, each in its own bundle of the pool's placement group(s); the caller keeps the handles
    and decides what they do."""

    def __init__(self, name: str, actor_cls: type, cfg: PoolConfig, *, placement_timeout_s: float = 60.0) -> None:
        """Reserve the pool's `cfg.num_actors` bundles now; PlacementError if they cannot be placed. `name`: the
        pool's label in messages ("rollout", "rewards/ocr", "learner")."""
        self.name = name
        self.cfg = cfg
        self.placement_timeout_s = placement_timeout_s
        self._actor_class = ray.remote(actor_cls)
        self._restarts = cfg.max_restarts if isinstance(cfg, RestartablePoolConfig) else 0
        self._groups: list[Any] = []  # the placement groups reserved so far
        self._free: list[tuple[Any, int]] = []  # (placement group, bundle index) without an actor
        self._held: dict[Any, tuple[Any, Any, int]] = {}  # actor id -> (handle, placement group, bundle index)
        self.spawned = 0  # actors created so far
        self.reserve(cfg.num_actors)

    def reserve(self, count: int) -> None:
        """Reserve `count` more bundles as one placement group with the pool's strategy, waiting for them to be
        placed; PlacementError (and nothing reserved) if no set of nodes can hold them or they stay unplaced."""
        bundle = self.cfg.bundle()
        what = f"pool {self.name!r}: {count} bundle(s) of {{{describe(bundle)}}} ({self.cfg.placement_strategy})"
        nodes = alive_nodes()
        problem = placement_problem(self.cfg, count, nodes)
        if problem:
            raise PlacementError(f"{what} cannot be placed: {problem}. {_nodes_report(nodes, 'has')}. Lower the "
                                 f"pool's num_*_per_actor or resources, or add nodes that have them")
        group = placement_group([bundle] * count, strategy=self.cfg.placement_strategy)
        try:
            ray.get(group.ready(), timeout=self.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(group)
            raise PlacementError(f"{what} were not placed within {self.placement_timeout_s:g} s "
                                 f"(ray.placement_timeout_s): the other pools or jobs hold the room. "
                                 f"{_nodes_report(alive_nodes(available=True), 'has free')}") from None
        self._groups.append(group)
        self._free += [(group, index) for index in range(count)]

    def spawn(self, *args: Any, **kwargs: Any) -> Any:
        """One more actor, `actor_cls(*args, **kwargs)` in a free bundle placed on a live node (one more is reserved
        when there is none: PlacementError if it cannot be placed); returns its handle at once."""
        live = self._live_free_bundles()
        if not live:
            self.reserve(1)
            live = self._live_free_bundles()
        group, index = live[0]
        self._free.remove((group, index))
        return self._start(group, index, args, kwargs)

    def replace(self, handle: Any, *args: Any, **kwargs: Any) -> Any:
        """A new actor, `actor_cls(*args, **kwargs)`, in the bundle of `handle` (an actor of this pool that cannot
        come back: out of restarts, say), which is ended for good first. Its bundle is kept even when its node left:
        Ray places the bundle again once a node with room joins, and the new actor starts there then."""
        held = self._held.pop(handle._actor_id, None)
        if held is None:
            raise ValueError(f"pool {self.name!r}: the actor to replace is not one of its own")
        ray.kill(handle, no_restart=True)
        return self._start(held[1], held[2], args, kwargs)

    def _start(self, group: Any, index: int, args: tuple, kwargs: dict) -> Any:
        """An actor of the pool in bundle `index` of placement group `group`; its handle at once."""
        handle = self._actor_class.options(
            num_cpus=self.cfg.num_cpus_per_actor, num_gpus=self.cfg.num_gpus_per_actor, resources=self.cfg.resources,
            max_restarts=self._restarts, runtime_env=quiet_runtime_env(),
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
        ).remote(*args, **kwargs)
        self._held[handle._actor_id] = (handle, group, index)
        self.spawned += 1
        return handle

    def run_in_bundle(self, fn: Any, *args: Any, bundle: int = 0) -> Any:
        """`fn(*args)` as a task in a free bundle of the pool (`bundle`: which of them), with an actor's resources, so
        on the node where the pool's next actor would run; a ref to (node id, result)."""
        if not self._free:
            self.reserve(1)
        group, index = self._free[bundle]
        return ray.remote(_on_node).options(
            num_cpus=self.cfg.num_cpus_per_actor, num_gpus=self.cfg.num_gpus_per_actor, resources=self.cfg.resources,
            max_retries=0, runtime_env=quiet_runtime_env(),
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
        ).remote(fn, *args)

    def _live_free_bundles(self) -> list[tuple[Any, int]]:
        """The free bundles placed on a node that is alive now: a bundle whose node left waits for Ray to place it
        again, and an actor put there would wait with it."""
        alive = set(alive_nodes())
        tables = {id(group): ray.util.placement_group_table(group) for group, _ in self._free}
        return [(group, index) for group, index in self._free
                if tables[id(group)].get("bundles_to_node_id", {}).get(index) in alive]

    @property
    def free_bundles(self) -> int:
        """Bundles reserved and holding no actor."""
        return len(self._free)

    def release(self, handle: Any) -> None:
        """End an actor for good (no restart); its bundle takes the next spawn, and a placement group reserved to grow
        the pool goes back to the cluster once none of its bundles holds an actor."""
        ray.kill(handle, no_restart=True)
        held = self._held.pop(handle._actor_id, None)
        if held is None:
            return
        group = held[1]
        self._free.append(held[1:])
        if group is not self._groups[0] and not any(g is group for _, g, _ in self._held.values()):
            self._free = [(g, index) for g, index in self._free if g is not group]
            self._groups.remove(group)
            remove_placement_group(group)

    def shutdown(self) -> None:
        """End every actor and give the reserved resources back."""
        for handle, _, _ in self._held.values():
            ray.kill(handle, no_restart=True)
        for group in self._groups:
            remove_placement_group(group)
        self._groups, self._free, self._held = [], [], {}


def _on_node(fn: Any, *args: Any) -> tuple[str, Any]:
    return ray.get_runtime_context().get_node_id(), fn(*args)


def service_actor(actor_cls: type, name: str, *args: Any, exclusive: bool = False, **kwargs: Any) -> Any:
    """The job's named actor `name` of `actor_cls` on this process's node, taking no CPU; it lives as long as the
    process that created it. An existing one of that name is returned, unless `exclusive`: then ValueError."""
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(actor_cls).options(name=name, num_cpus=0, get_if_exists=not exclusive,
                                         runtime_env=quiet_runtime_env(),
                                         scheduling_strategy=here).remote(*args, **kwargs)
