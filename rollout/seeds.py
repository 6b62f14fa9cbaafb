"""Seeds the job derives from its run seed: one stable hash for all of them, the same in every process and run.

A seed is the top 63 bits of blake2b-64 of its parts joined by ":" (e.g. "fast_window:<run seed>:<group id>"), so it
depends on neither PYTHONHASHSEED nor the process that draws it.
"""

from __future__ import annotations

import hashlib

import torch


def stable_seed(*parts: object) -> int:
    """A 63-bit integer from the parts, stable across processes, runs and PYTHONHASHSEED."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def seeded_generator(*parts: object) -> torch.Generator:
    """A CPU torch generator seeded with `stable_seed(*parts)`."""
    return torch.Generator().manual_seed(stable_seed(*parts))
