"""A small generic Ray actor group: N actors of one class that form one torch.distributed group.

The group creates rank 0 first, which binds the rendezvous socket to its node's address and reports (address, port),
then creates ranks 1..N−1 pointing at it; every actor sets MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK and WORLD_SIZE
in its own environment. Constructors stay light: heavy set-up (`init_process_group`, loading a model, DeepSpeed) is a
method that the driver runs on all ranks at once with `run`, since collectives need every rank.

Nothing listens beyond the node's address: torch's TCPStore server would bind every address, so rank 0 hands it the
socket it bound itself, and gloo / NCCL are pointed at the network interface that carries the node address (unless
GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are set). On a local Ray that address is 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import ray

from cluster.config import PoolConfig
from cluster.pools import ActorPool


class DistributedActor:
    """Base of the actors in an `RankGroup`: holds its rank and sets the rank environment for torch.distributed."""

    def __init__(self, world_size: int, rank: int, master_addr: str | None = None, master_port: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a group of {world_size}")
        if rank > 0 and (master_addr is None or master_port is None):
            raise ValueError(f"rank {rank} needs rank 0's master_addr and master_port")
        node_addr = ray.util.get_node_ip_address()
        self._listener: socket.socket | None = None
        if rank == 0:
            master_addr = master_addr or node_addr
            self._listener = socket.create_server((master_addr, master_port or 0),
                                                  family=socket.AF_INET6 if ":" in master_addr else socket.AF_INET)
            master_port = self._listener.getsockname()[1]
        interface = _interface_of(node_addr)
        if interface is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
        self.rank, self.world_size = rank, world_size
        self._master = (master_addr, int(master_port))
        # Ray gives each actor only its own GPUs (CUDA_VISIBLE_DEVICES), so the local device is always index 0.
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank), LOCAL_RANK="0",
                          WORLD_SIZE=str(world_size))

    def node(self) -> str:
        """The id of the Ray node the rank runs on."""
        return ray.get_runtime_context().get_node_id()

    def master_address(self) -> tuple[str, int]:
        """The (address, port) that every rank of the group connects to."""
        return self._master

    def init_process_group(self, backend: str) -> None:
        """torch.distributed for the group (a collective: all ranks at once), its store served on rank 0's socket."""
        import torch.distributed as dist

        addr, port = self._master
        if self.rank == 0:
            store = dist.TCPStore(addr, port, self.world_size, is_master=True, master_listen_fd=self._listener.fileno(),
                                  use_libuv=False)
        else:
            store = dist.TCPStore(addr, port, self.world_size, is_master=False)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size)


def _interface_of(address: str) -> str | None:
    """The name of the network interface that holds `address` ('lo' for 127.0.0.1), None if none does."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addrs):
            return name
    return None


class RankGroup:
    """`cfg.num_actors` Ray actors of one `DistributedActor` subclass, built by the pool helper with `cfg`'s resources;
    `run` calls a method on all of them and returns the refs."""

    def __init__(self, actor_cls: type[DistributedActor], cfg: PoolConfig, *, actors: ActorPool | None = None) -> None:
        """`actors`: the learner pool's reserved placement (one bundle per rank; made here when not given)."""
        self._pool = actors or ActorPool("learner", actor_cls, cfg)
        rank0 = self._pool.spawn(cfg.num_actors, 0)
        addr, port = ray.get(rank0.master_address.remote())
        self.actors = [rank0] + [self._pool.spawn(cfg.num_actors, rank, addr, port)
                                 for rank in range(1, cfg.num_actors)]

    def __len__(self) -> int:
        return len(self.actors)

    def run(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Call `method(*args, **kwargs)` on every actor at once; one ref per rank, in rank order.

        Put large arguments in the object store first (`ray.put`) so that every rank reads the same copy.
        """
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def kill(self) -> None:
        """End every actor of the group and give its reserved resources back."""
        self._pool.shutdown()
        self.actors = []
