"""Where the job's actors go: every pool's placement group reserved before any actor starts, and the dry run's checks
run where each pool's actors would run.

`reserve_pools` reserves the learner ranks first (they need room together), then the rollout workers, then each
scorer's actors; a pool that cannot be placed stops the job with cluster.pools.PlacementError before any model loads.
`check_where_placed` then runs a small task in a bundle of each pool, on the node an actor of that pool will use,
that finds the model (rollout and learner) or checks the scorer's options and weights without loading them (rewards):
a job that joins a cluster does it before starting its actors, and `python -m learner.main --dry-run` does it and
stops.
"""

from __future__ import annotations

from typing import Any

import ray

from cluster.config import JobConfig
from cluster.pools import ActorPool, describe
from learner.ranks.actor import LearnerActor
from learner.driver.preflight import absolute_paths
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


def _learner_here(cfg: JobConfig) -> str:
    from learner.driver.preflight import lora_targets_here, model_here

    folder = model_here(cfg, ("transformer",))
    lora_targets_here(cfg)
    return f"transformer at {folder}"


def _rollout_here(cfg: JobConfig) -> str:
    from learner.driver.preflight import model_here

    return f"model at {model_here(cfg)}"


def _scorer_here(name: str, options: dict[str, Any], field: str) -> str:
    from learner.driver.preflight import scorer_here

    scorer_here(name, options, field)
    return "options and weights found"


class NodeCheckFailed(ValueError):
    """A check run where a pool's actors will run failed there; the message names the pool and the node."""


def check_where_placed(cfg: JobConfig, pools: dict[str, ActorPool]) -> list[str]:
    """Run each pool's checks in one of its bundles, on the node its actors will use: the model (and the LoRA
    targets) for learner and rollout, the options and weights of each scorer. One line per pool, or NodeCheckFailed
    naming the first pool that failed."""
    checks: dict[str, tuple[Any, tuple]] = {"learner": (_learner_here, (cfg,)), "rollout": (_rollout_here, (cfg,))}
    checks.update({f"rewards/{s.name}": (_scorer_here, (s.name, s.options, f"rewards.scorers.{i}.options"))
                   for i, s in enumerate(cfg.rewards.scorers)})
    refs = {name: pools[name].run_in_bundle(fn, *args) for name, (fn, args) in checks.items()}
    lines = []
    for name, ref in refs.items():
        pool = pools[name].cfg
        try:
            node, found = ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if isinstance(err.cause, Exception) else err
            raise NodeCheckFailed(f"pool {name!r}, on the node of its bundle: {cause}") from None
        lines.append(f"{name}: {pool.num_actors} x {{{describe(pool.bundle())}}} ({pool.placement_strategy}), "
                     f"checked on node {node[:8]}: {found}")
    return lines


def dry_run(cfg: JobConfig) -> list[str]:
    """Place every pool and run its checks where it is placed, then give everything back; one line per pool."""
    cfg = absolute_paths(cfg)  # the checks run in other processes, maybe on other nodes
    pools = reserve_pools(cfg)
    try:
        return check_where_placed(cfg, pools)
    finally:
        for pool in pools.values():
            pool.shutdown()
