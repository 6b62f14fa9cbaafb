"""The one place that creates the job's Ray actors and hands Ray their options.

`ActorPool` builds the actors of one pool (rollout workers, the actors of one scorer, learner ranks) from that pool's
config: the CPUs and GPUs of each actor and, for pools whose actors may restart, `max_restarts`. `service_actor`
creates the job's named bookkeeping actors (the weight store), which take no CPU and are found by name in the job's
Ray namespace. Nothing outside `cluster/` passes resource options to Ray (tests/test_layering.py checks it), so
placement is decided here.
"""

from __future__ import annotations

from typing import Any

import ray

from cluster.config import PoolConfig, RestartablePoolConfig


class ActorPool:
    """Creates actors of one class with one pool's resources; the caller keeps the handles and decides what they do."""

    def __init__(self, name: str, actor_cls: type, cfg: PoolConfig) -> None:
        """`name`: the pool's label in messages ("rollout", "rewards/ocr", "learner")."""
        self.name = name
        self.cfg = cfg
        restarts = cfg.max_restarts if isinstance(cfg, RestartablePoolConfig) else 0
        self._actor_class = ray.remote(actor_cls).options(
            num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor, max_restarts=restarts)
        self.spawned = 0  # actors created so far

    def spawn(self, *args: Any, **kwargs: Any) -> Any:
        """One more actor: `actor_cls(*args, **kwargs)` in its own process; returns its handle at once."""
        self.spawned += 1
        return self._actor_class.remote(*args, **kwargs)


def service_actor(actor_cls: type, name: str, *args: Any, **kwargs: Any) -> Any:
    """The job's named actor `name` of `actor_cls` (created, or found when it exists), taking no CPU; it lives as long
    as the process that created it."""
    return ray.remote(actor_cls).options(name=name, num_cpus=0, get_if_exists=True).remote(*args, **kwargs)
