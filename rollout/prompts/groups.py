"""Prompts and their groups: a prompt item, a group of seeds for one prompt, and the deterministic group sampler."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from rollout.seeds import stable_seed


@dataclass(frozen=True)
class PromptItem:
    """One prompt and whatever the reward needs to score it (the whole GenEval record, or {}); `where` is the
    file:line it was read from (empty for built-in and generated prompts), for error messages only."""

    prompt: str
    metadata: dict = field(default_factory=dict, hash=False)
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class PromptGroup:
    """One prompt to be sampled group_size times, with one noise seed per sample."""

    group_id: int
    prompt: str
    metadata: dict = field(hash=False)
    seeds: tuple[int, ...]


def _require_int(name: str, value: Any) -> int:
    """Return value if it is a plain int, else raise a TypeError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def sample_seed(run_seed: int, group_id: int, index: int) -> int:
    """Noise seed of sample `index` in group `group_id`: blake2b-64 of "run_seed:group_id:index", top 63 bits."""
    for name, v in (("run_seed", run_seed), ("group_id", group_id), ("index", index)):
        _require_int(name, v)
    return stable_seed(run_seed, group_id, index)


_STATE_KEYS = ("epoch", "position", "next_group_id")


class GroupSampler:
    """Yields prompt groups forever, epoch by epoch, as a pure function of (seed, epoch) so runs resume exactly."""

    def __init__(self, items: Sequence[PromptItem], *, group_size: int, seed: int, shuffle: bool = True) -> None:
        self._items = tuple(items)
        if not self._items:
            raise ValueError("GroupSampler needs at least one prompt; got an empty prompt list")
        for i, item in enumerate(self._items):
            if not isinstance(item, PromptItem):
                raise TypeError(f"GroupSampler items must be PromptItem, item {i} is {type(item).__name__}")
        if _require_int("group_size", group_size) < 1:
            raise ValueError(f"group_size must be >= 1 (samples per prompt), got {group_size}")
        self._group_size = group_size
        self._seed = _require_int("seed", seed)
        self._shuffle = bool(shuffle)
        self._epoch = 0
        self._position = 0
        self._next_group_id = 0
        self._order_epoch = -1
        self._order: list[int] = []

    @property
    def group_size(self) -> int:
        """Samples per group."""
        return self._group_size

    @property
    def num_items(self) -> int:
        """Prompts per epoch."""
        return len(self._items)

    def _epoch_order(self, epoch: int) -> list[int]:
        """Item order for one epoch: a permutation drawn from a generator seeded only by (seed, epoch)."""
        if self._order_epoch != epoch:
            order = list(range(len(self._items)))
            if self._shuffle:
                random.Random(stable_seed("epoch", self._seed, epoch)).shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def next_group(self) -> PromptGroup:
        """Return the next group and advance (wrapping into a freshly shuffled epoch)."""
        item = self._items[self._epoch_order(self._epoch)[self._position]]
        group_id = self._next_group_id
        seeds = tuple(sample_seed(self._seed, group_id, i) for i in range(self._group_size))
        self._next_group_id += 1
        self._position += 1
        if self._position == len(self._items):
            self._epoch += 1
            self._position = 0
        return PromptGroup(group_id=group_id, prompt=item.prompt, metadata=copy.deepcopy(item.metadata), seeds=seeds)

    def take(self, k: int) -> list[PromptGroup]:
        """Return the next k groups."""
        if _require_int("k", k) < 0:
            raise ValueError(f"take(k) needs k >= 0, got {k}")
        return [self.next_group() for _ in range(k)]

    def __iter__(self) -> Iterator[PromptGroup]:
        return self

    def __next__(self) -> PromptGroup:
        return self.next_group()

    def state_dict(self) -> dict[str, int]:
        """JSON-serialisable position: epoch, position within it, and the next group id."""
        return {"epoch": self._epoch, "position": self._position, "next_group_id": self._next_group_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state_dict(); the sampler must be built with the same items and seed."""
        if not isinstance(state, dict):
            raise ValueError(f"sampler state must be a dict with keys {list(_STATE_KEYS)}, got {type(state).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state]
        unexpected = sorted(str(k) for k in state if k not in _STATE_KEYS)
        if missing or unexpected:
            raise ValueError(
                f"bad sampler state: missing keys {missing}, unexpected keys {unexpected}; "
                f"expected exactly {list(_STATE_KEYS)}"
            )
        for k in _STATE_KEYS:
            v = state[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"bad sampler state: {k!r} must be an integer >= 0, got {v!r}")
        if state["position"] >= len(self._items):
            raise ValueError(
                f"bad sampler state: position {state['position']} is past the end of an epoch of "
                f"{len(self._items)} prompts; was it saved with a different prompt list?"
            )
        self._epoch = state["epoch"]
        self._position = state["position"]
        self._next_group_id = state["next_group_id"]
