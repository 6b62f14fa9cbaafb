"""The learning rate of each optimizer update: a linear warm-up, then constant, linear or cosine decay to 0.

The rate is a function of k, the optimizer updates applied before this one (the policy version), so a checkpoint that
holds k resumes the schedule exactly. With W = learner.lr_warmup_updates and T = iterations × updates_per_iteration:

    warm-up (k < W):   lr · (k + 1) / W
    after (p = (k − W) / (T − W)):   constant lr;  linear lr · (1 − p);  cosine lr · (1 + cos(π p)) / 2

(the same decay as transformers' get_linear / get_cosine_schedule_with_warmup, whose warm-up starts from 0 instead).
An update that was skipped (non-finite gradient) does not advance k.
"""

from __future__ import annotations

import math

from cluster.config import LR_SCHEDULES, LearnerConfig


def configured_lr(k: int, lc: LearnerConfig, iterations: int) -> float:
    """The job's learning rate for the update after `k` applied ones."""
    return lr_at(k, lr=lc.lr, schedule=lc.lr_schedule, warmup=lc.lr_warmup_updates,
                 total=iterations * lc.updates_per_iteration)


def lr_at(k: int, *, lr: float, schedule: str, warmup: int, total: int) -> float:
    """The learning rate of the update after `k` applied ones (see the module docstring)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")
    if k < warmup:
        return lr * (k + 1) / warmup
    if schedule == "constant":
        return lr
    p = min(max(k - warmup, 0) / max(total - warmup, 1), 1.0)
    if schedule == "linear":
        return lr * (1.0 - p)
    return lr * 0.5 * (1.0 + math.cos(math.pi * p))
