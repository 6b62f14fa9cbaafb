"""The job's mailbox for commands from outside it (`python -m cluster.scale`): a named actor in the job's namespace.

A command leaves a request and waits for its answer; the driver takes the requests between groups, carries them out
and answers; it also leaves a snapshot of its pools here after every iteration and every change, for `--show`. Only
plain values pass through it.
"""

from __future__ import annotations

from collections import deque
from typing import Any

POOLS = ("rollout",)  # the pools a command may resize


def control_name(run_name: str) -> str:
    """The Ray name of a job's control actor: a command finds the job by its run name."""
    return f"{run_name}-control"


class JobControl:
    """Requests `(id, pool, size)` waiting for the driver, the driver's answers, and its last snapshot of the pools."""

    def __init__(self) -> None:
        self._requests: deque[tuple[int, str, int]] = deque()
        self._answers: dict[int, tuple[bool, str]] = {}
        self._snapshot: dict[str, Any] = {}
        self._next_id = 0

    def request(self, pool: str, size: int) -> int:
        """Ask for `pool` to have `size` actors; the request's id, to wait for its answer with `answer_of`."""
        if pool not in POOLS:
            raise ValueError(f"pool {pool!r} cannot be resized; resizable: {', '.join(POOLS)}")
        self._next_id += 1
        self._requests.append((self._next_id, pool, int(size)))
        return self._next_id

    def take_requests(self) -> list[tuple[int, str, int]]:
        """The requests left since the last call (the driver's side)."""
        taken = list(self._requests)
        self._requests.clear()
        return taken

    def answer(self, request_id: int, done: bool, message: str) -> None:
        """The driver's answer to a request: whether it was carried out, and what happened."""
        self._answers[request_id] = (done, message)

    def answer_of(self, request_id: int) -> tuple[bool, str] | None:
        """The answer to a request, or None while it waits."""
        return self._answers.get(request_id)

    def set_snapshot(self, snapshot: dict[str, Any]) -> None:
        self._snapshot = snapshot

    def snapshot(self) -> dict[str, Any]:
        """Pool -> its actors as [{"name", "node", "policy_version"}], and the job's iteration and policy version."""
        return self._snapshot
