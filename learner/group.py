"""A small generic Ray actor group: N actors of one class that form one torch.distributed group.

The group creates rank 0 first, asks it for a reachable address and a free port on its node, then creates ranks
1..N−1 pointing at it; every actor sets MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK and WORLD_SIZE in its own
environment before anything initialises torch.distributed. Constructors stay light: heavy set-up (loading a model,
DeepSpeed) is a method that the driver runs on all ranks at once with `run`, since collectives need every rank.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import ray


class DistributedActor:
    """Base of the actors in an `ActorGroup`: holds its rank and sets the rank environment for torch.distributed."""

    def __init__(self, world_size: int, rank: int, master_addr: str | None = None, master_port: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a group of {world_size}")
        if rank > 0 and (master_addr is None or master_port is None):
            raise ValueError(f"rank {rank} needs rank 0's master_addr and master_port")
        if master_addr is None:
            master_addr = ray.util.get_node_ip_address()
        if master_port is None:
            master_port = _free_port()
        self.rank, self.world_size = rank, world_size
        self._master = (master_addr, int(master_port))
        # Ray gives each actor only its own GPUs (CUDA_VISIBLE_DEVICES), so the local device is always index 0.
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank), LOCAL_RANK="0",
                          WORLD_SIZE=str(world_size))

    def master_address(self) -> tuple[str, int]:
        """The (address, port) that every rank of the group connects to."""
        return self._master


def _free_port() -> int:
    """A TCP port that is free on this node right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class ActorGroup:
    """N Ray actors of one `DistributedActor` subclass; `run` calls a method on all of them and returns the refs."""

    def __init__(
        self,
        actor_cls: type[DistributedActor],
        num_actors: int,
        *,
        num_cpus_per_actor: float,
        num_gpus_per_actor: float = 0.0,
    ) -> None:
        if num_actors < 1:
            raise ValueError(f"an actor group needs at least one actor, got {num_actors}")
        remote_cls = ray.remote(actor_cls).options(num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor)
        rank0 = remote_cls.remote(num_actors, 0)
        addr, port = ray.get(rank0.master_address.remote())
        self.actors = [rank0] + [remote_cls.remote(num_actors, rank, addr, port) for rank in range(1, num_actors)]

    def __len__(self) -> int:
        return len(self.actors)

    def run(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Call `method(*args, **kwargs)` on every actor at once; one ref per rank, in rank order.

        Put large arguments in the object store first (`ray.put`) so that every rank reads the same copy.
        """
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def get(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """`run` and wait: the results of every rank, in rank order."""
        return ray.get(self.run(method, *args, **kwargs))

    def kill(self) -> None:
        """End every actor of the group."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
