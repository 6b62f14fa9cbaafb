"""What goes wrong while a job runs and is survived: one `[flowrl]` line when it happens, and its count per iteration.

The rollout pool and the reward service report their events here (an actor died or became unreachable, a group was
queued again, a scorer call was retried or timed out); the driver adds the nodes that left the cluster and the groups
whose records or images were lost before they were used (sampled again), and evaluations that failed. Each
iteration's counts go into history.jsonl.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import ray

from cluster.pools import alive_nodes, describe

# The events counted in history.jsonl, each with every iteration (0 when none happened).
KINDS = ("rollout_actor_died", "rollout_actor_lost", "rollout_actor_back", "rollout_actor_replaced",
         "reward_actor_failed", "reward_actor_replaced", "reward_actor_retired", "reward_retry", "reward_timeout",
         "node_lost", "records_lost", "evaluation_failed")


class Events:
    """Counts events since the last `take`, and says each one as it happens."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.counts: Counter[str] = Counter()
        self.nodes = alive_nodes() if ray.is_initialized() else {}

    def report(self, kind: str, message: str) -> None:
        """One event of `kind` (one of KINDS): said now, counted for this iteration."""
        self.counts[kind] += 1
        self.say(message)

    def watch_nodes(self) -> None:
        """Report each node that left the cluster since the last look (Ray notices a lost node within its health
        check, about 15-30 s by default)."""
        now = alive_nodes()
        for node_id, resources in self.nodes.items():
            if node_id not in now:
                self.report("node_lost", f"node {node_id[:8]} ({describe(resources)}) left the cluster; its actors "
                                         f"are placed again on the nodes left, or wait for a node with room")
        self.nodes = now

    def take(self) -> dict[str, int]:
        """The counts since the last call, every kind included."""
        counts = {kind: self.counts.get(kind, 0) for kind in KINDS}
        self.counts.clear()
        return counts
