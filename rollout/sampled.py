"""`SampledGroup`: one group as the rollout pool delivers it to the driver, by reference.

A rollout worker's `sample_group` returns three objects (`ray.method(num_returns=3)`): the group's
`RecordSummary`, its record without the images, and the images. The driver owns the three, fetches only the summary,
and hands the references on: the images to the reward actors, the record to the learner rank that trains it. Both
stay in the object store of the rollout's node until they are fetched where they are used, and are freed when the
last reference goes (the driver drops its own once the learner has trained the group).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from rollout.sampling.trajectory import GroupRecord, RecordSummary


@dataclass(frozen=True)
class SampledGroup:
    """A group's summary (read by the driver) and the references to its record and its images."""

    summary: RecordSummary
    record: Any  # ray.ObjectRef of the record without images (Trajectories or FinalSamples)
    images: Any  # ray.ObjectRef of the uint8 (G, H, W, 3) images

    @property
    def group_id(self) -> int:
        return self.summary.group_id

    def fetch(self) -> GroupRecord:
        """The whole record, images included, fetched into this process (for tests and tools, not the driver)."""
        import ray

        record, images = ray.get([self.record, self.images])
        return replace(record, images=images)
