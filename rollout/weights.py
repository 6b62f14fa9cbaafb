"""Policy weights: the LoRA adapter (or full state) of the transformer, and their transport from learner to rollout.

The transport is one interface: the learner packs the state into flat CPU byte buffers of at most
`learner.publish_bucket_mb` each (one for a LoRA adapter; a tensor larger than that is a bucket of its own), puts
each into the Ray object store as soon as it is packed, and publishes `(version, refs, metas)` to the job's named
`WeightStore` actor once every bucket is there; a rollout worker fetches and unpacks the buckets one at a time and
swaps the version in only when all of them have arrived, so a version is never half loaded. (A bucketed NCCL
broadcast would implement the same publish / latest pair.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import ray
import torch

from cluster.pools import service_actor

# (name, dtype string, shape, offset, nbytes) per tensor, in buffer order.
TensorMeta = tuple[str, str, tuple[int, ...], int, int]
# A state in the object store: one (buffer ref, its metadata) per bucket, as two lists; the refs stay in a list so
# that Ray passes them on unresolved.
PackedState = tuple[list[Any], list[list[TensorMeta]]]
_ALIGN = 16  # every tensor starts at a multiple of this, so any dtype can be viewed in place


# ---------------------------------------------------------------------------------------------------------------------
# Packing: state dict <-> one flat byte buffer.


def pack_state(state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, list[TensorMeta]]:
    """One contiguous uint8 CPU buffer holding every tensor's bytes, and the metadata to cut it up again."""
    meta: list[TensorMeta] = []
    offset = 0
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state entry {name!r} is a {type(tensor).__name__}, not a tensor")
        nbytes = tensor.numel() * tensor.element_size()
        meta.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset, nbytes))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    buffer = torch.zeros(offset, dtype=torch.uint8)
    for (name, _, _, start, nbytes), tensor in zip(meta, state.values()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        buffer[start:start + nbytes] = flat.view(torch.uint8)
    return buffer, meta


def unpack_state(buffer: torch.Tensor, meta: list[TensorMeta]) -> dict[str, torch.Tensor]:
    """The exact tensors (bit for bit, any dtype) that `pack_state` packed, each in its own memory."""
    if buffer.dtype != torch.uint8 or buffer.ndim != 1:
        raise ValueError(f"a packed state is a 1-D uint8 buffer, got {buffer.dtype} of shape {tuple(buffer.shape)}")
    state: dict[str, torch.Tensor] = {}
    for name, dtype_name, shape, offset, nbytes in meta:
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype_name!r}")
        if offset + nbytes > buffer.numel():
            raise ValueError(f"tensor {name!r} ends at byte {offset + nbytes}, past the buffer's {buffer.numel()}")
        state[name] = buffer[offset:offset + nbytes].clone().view(dtype).reshape(shape)
    return state


def split_buckets(entries: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                  size: Any = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """(name, tensor) entries cut in order into buckets of at most `bucket_bytes` (a larger tensor alone in one);
    `size(tensor)` gives a tensor's bytes (default: numel x element size)."""
    size = size or (lambda t: t.numel() * t.element_size())
    bucket: list[tuple[str, torch.Tensor]] = []
    held = 0
    for name, tensor in entries:
        nbytes = size(tensor)
        if bucket and held + nbytes > bucket_bytes:
            yield bucket
            bucket, held = [], 0
        bucket.append((name, tensor))
        held += nbytes
    if bucket:
        yield bucket


def put_buckets(buckets: Iterable[Mapping[str, torch.Tensor]]) -> PackedState:
    """Pack each bucket and put it in the object store as it comes (only one packed bucket is held here at a time)."""
    refs, metas = [], []
    for bucket in buckets:
        buffer, meta = pack_state(bucket)
        refs.append(ray.put(buffer))
        metas.append(meta)
        del buffer
    return refs, metas


def fetch_state(packed: PackedState) -> dict[str, torch.Tensor]:
    """Every bucket of a packed state fetched and unpacked, one at a time: the whole state, or an error (nothing is
    applied from a state that did not arrive whole)."""
    state: dict[str, torch.Tensor] = {}
    for ref, meta in zip(*packed):
        state.update(unpack_state(ray.get(ref), meta))
    return state


# ---------------------------------------------------------------------------------------------------------------------
# The store: the latest published version, as a named Ray actor.


class WeightStore:
    """Holds the latest `(version, refs, metas)` (a PackedState with its version). It runs as the job's named actor
    (`weight_store`)."""

    def __init__(self) -> None:
        self._latest: tuple[int, list[ray.ObjectRef], list[list[TensorMeta]]] | None = None

    def publish(self, version: int, refs: list[ray.ObjectRef], metas: list[list[TensorMeta]]) -> bool:
        """Keep this version if it is newer than the one held; say whether it was kept."""
        if self._latest is not None and version <= self._latest[0]:
            return False
        self._latest = (version, list(refs), metas)
        return True

    def latest(self, newer_than: int = -1) -> tuple[int, list[ray.ObjectRef], list[list[TensorMeta]]] | None:
        """The latest entry, or None if nothing (newer than `newer_than`) was published."""
        if self._latest is None or self._latest[0] <= newer_than:
            return None
        return self._latest


def weight_store_name(key: str) -> str:
    """The Ray name of a job's WeightStore (`key`: the run name and a per-job suffix, so two jobs never share one);
    rollout actors look the store up by it (a handle passed to a restartable actor's constructor would not survive its
    restart)."""
    return f"{key}-weights"


def weight_store(key: str) -> Any:
    """The job's WeightStore actor, created on first use. Create it in the driver: it lives as long as its creator."""
    return service_actor(WeightStore, weight_store_name(key))


def publish_weights(store: Any, version: int, buckets: Iterable[Mapping[str, torch.Tensor]]) -> bool:
    """Put a policy state's buckets in the object store, then publish them as `version`; False if not newer."""
    refs, metas = put_buckets(buckets)
    return ray.get(store.publish.remote(version, refs, metas))

