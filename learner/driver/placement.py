"""Where the job's actors go: every pool's placement group reserved before any actor starts, and the dry run's checks
run where each pool's actors would run.

`reserve_pools` reserves the learner ranks first (they need room together), then the rollout workers, then each
scorer's actors; a pool that cannot be placed stops the job with cluster.pools.PlacementError before any model loads.
`check_where_placed` then runs a small task in a bundle of each pool, on the node an actor of that pool will use,
that finds the model (rollout and learner) or checks the scorer's options and weights without loading them (rewards),
and one in every learner bundle that writes a probe file in checkpoint.storage: a job that joins a cluster does it
before starting its actors, and `python -m learner.main --dry-run` does it and stops. Every check that fails is
listed, one line each.
"""

from __future__ import annotations

from typing import Any

import ray

from cluster.config import JobConfig
from cluster.pools import ActorPool, describe
from learner.driver.node_checks import learner_node, rollout_node, scorer_node, storage_node
from learner.driver.preflight import absolute_paths
from learner.ranks.actor import LearnerActor
from learner.ranks.checkpoint import checkpoint_root
from rewards.service import ScorerActor
from rollout.worker import RolloutWorker


ACTOR_CLASSES = {"learner": LearnerActor, "rollout": RolloutWorker, "rewards": ScorerActor}


def reserve_pools(cfg: JobConfig, classes: dict[str, type] | None = None) -> dict[str, ActorPool]:
    """Pool name ("learner", "rollout", "rewards/<scorer>") -> its reserved placement; all or nothing. `classes`
    replaces some of ACTOR_CLASSES (stand-ins of the same interface: bench/pipeline.py)."""
    timeout = cfg.ray.placement_timeout_s
    classes = {**ACTOR_CLASSES, **(classes or {})}
    wanted: list[tuple[str, type, Any]] = [("learner", classes["learner"], cfg.learner),
                                           ("rollout", classes["rollout"], cfg.rollout)]
    wanted += [(f"rewards/{s.name}", classes["rewards"], cfg.rewards.pool_of(s)) for s in cfg.rewards.scorers]
    pools: dict[str, ActorPool] = {}
    try:
        for name, actor_cls, pool_cfg in wanted:
            pools[name] = ActorPool(name, actor_cls, pool_cfg, placement_timeout_s=timeout)
    except BaseException:
        for pool in pools.values():
            pool.shutdown()
        raise
    return pools


class NodeCheckFailed(ValueError):
    """A check run where a pool's actors will run failed there; the message names the pool and the node."""


def check_where_placed(cfg: JobConfig, pools: dict[str, ActorPool], dry_run: bool = False) -> list[str]:
    """Run each pool's checks in one of its bundles, on the node its actors will use: the model (and the LoRA
    targets) for learner and rollout, the options and weights of each scorer; and in every learner bundle, that
    checkpoint.storage can be written there. `dry_run`: a hub id not in a node's cache is missing (nothing is
    downloaded). One line per pool, or NodeCheckFailed listing every check that failed, one line each."""
    checks: dict[str, tuple[Any, tuple]] = {"learner": (learner_node, (cfg, dry_run)),
                                            "rollout": (rollout_node, (cfg, dry_run))}
    checks.update({f"rewards/{s.name}": (scorer_node, (s.name, s.options, f"rewards.scorers.{i}.options", dry_run))
                   for i, s in enumerate(cfg.rewards.scorers)})
    refs = [(name, pools[name].run_in_bundle(fn, *args)) for name, (fn, args) in checks.items()]
    storage = str(checkpoint_root(cfg))
    learner = pools["learner"]
    probes = [("learner", learner.run_in_bundle(storage_node, storage, bundle=b)) for b in range(learner.free_bundles)]
    lines, failed = [], []
    for name, ref in refs + probes:
        try:
            node, found = ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if isinstance(err.cause, Exception) else err
            failed.append(f"pool {name!r}, on the node of its bundle: {cause}")
            continue
        if found is not None:  # a probe of checkpoint.storage says nothing
            pool = pools[name].cfg
            lines.append(f"{name}: {pool.num_actors} x {{{describe(pool.bundle())}}} ({pool.placement_strategy}), "
                         f"checked on node {node[:8]}: {found}")
    if len(failed) > 1:
        raise NodeCheckFailed(f"{len(failed)} checks failed where the pools are placed:\n"
                              + "\n".join(f"  {line}" for line in failed))
    if failed:
        raise NodeCheckFailed(failed[0])
    return lines + [f"checkpoint.storage {storage}: a probe file written and removed there from every learner "
                    f"bundle ({len(probes)})"]


def dry_run(cfg: JobConfig) -> list[str]:
    """Place every pool and run its checks where it is placed, then give everything back; one line per pool."""
    cfg = absolute_paths(cfg)  # the checks run in other processes, maybe on other nodes
    pools = reserve_pools(cfg)
    try:
        return check_where_placed(cfg, pools, dry_run=True)
    finally:
        for pool in pools.values():
            pool.shutdown()
