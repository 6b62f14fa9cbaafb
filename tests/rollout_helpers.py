"""Rollout workers for the tests: importable by Ray's worker processes."""

from __future__ import annotations

import time
from pathlib import Path

import ray

from rollout.worker import RolloutWorker


class HangsOnce(RolloutWorker):
    """A rollout worker that hangs for 60 s on group 50 the first time any worker of the run is given it (a marker
    file in output_dir says it happened), then samples as usual."""

    def __init__(self, cfg, *args, **kwargs) -> None:
        super().__init__(cfg, *args, **kwargs)
        self._marker = Path(cfg.output_dir) / "hung-once"

    @ray.method(num_returns=3)  # as the method it overrides
    def sample_group(self, group):
        if group.group_id == 50 and not self._marker.exists():
            self._marker.touch()
            time.sleep(60)
        return super().sample_group(group)
