"""The driver's side of commands from outside the job (`python -m cluster.scale`, through cluster/control.py): it
creates the job's control actor, carries out resize requests between groups, and leaves a snapshot of its pools there
after every iteration and every change."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from cluster.control import JobControl, control_name
from cluster.pools import PlacementError, service_actor
from rollout.pool import RolloutPool


class Commands:
    """The job's control actor and what the driver does with its requests."""

    def __init__(self, run_name: str, namespace: str, say: Callable[[str], None]) -> None:
        try:
            self.control = service_actor(JobControl, control_name(run_name), exclusive=True)
        except ValueError:
            raise ValueError(f"run_name = {run_name!r}: a job of that name is running in Ray namespace {namespace!r} "
                             f"(its control actor {control_name(run_name)!r} exists); give this one another run_name"
                             ) from None
        self.say = say

    def serve(self, pool: RolloutPool) -> bool:
        """Carry out the waiting resize requests and answer them; whether the pool changed."""
        changed = False
        for request_id, _, size in ray.get(self.control.take_requests.remote()):
            before = pool.num_workers
            try:
                pool.resize(size)
            except (ValueError, PlacementError) as err:
                message = f"rollout pool kept at {before} actors: {err}"
                done = False
            else:
                message = f"rollout pool resized from {before} to {size} actors (python -m cluster.scale)"
                done, changed = True, changed or size != before
            self.say(message)
            self.control.answer.remote(request_id, done, message)
        return changed

    def publish(self, snapshot: dict[str, Any]) -> None:
        """Leave a snapshot of the pools for `python -m cluster.scale --show`."""
        self.control.set_snapshot.remote(snapshot)

    def close(self) -> None:
        ray.kill(self.control)
