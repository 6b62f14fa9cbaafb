"""The records a learner rank trains, fetched from the object store where the rollouts left them: only those of the
samples the rank's share of the plan holds (rollout/sampled.py)."""

from __future__ import annotations

from collections.abc import Sequence

import ray
from ray.exceptions import ObjectLostError

from rollout.sampled import SampledGroup
from rollout.sampling.trajectory import FinalSamples, RecordSummary, Trajectories

Delivered = SampledGroup | Trajectories | FinalSamples  # by reference, or the record itself (tests, tools)


def summary_of(group: Delivered) -> RecordSummary:
    """What the plan reads of a group, without fetching its record."""
    return group.summary if isinstance(group, SampledGroup) else group.summary()


def fetch_records(groups: Sequence[Delivered], positions: Sequence[int]
                  ) -> tuple[list[Trajectories | FinalSamples | None], list[int]]:
    """The records of `groups` at `positions` (None elsewhere), fetched all at once, and the positions whose record is
    lost (ObjectLostError: the node that held it left, or its owner)."""
    records: list[Trajectories | FinalSamples | None] = [None] * len(groups)
    refs = {}
    for p in positions:
        if isinstance(groups[p], SampledGroup):
            refs[p] = groups[p].record
        else:
            records[p] = groups[p]
    try:
        for p, record in zip(refs, ray.get(list(refs.values()))):
            records[p] = record
        return records, []
    except ObjectLostError:
        lost = []
        for p, ref in refs.items():  # one by one, to name every lost record
            try:
                records[p] = ray.get(ref)
            except ObjectLostError:
                lost.append(p)
        return records, lost
