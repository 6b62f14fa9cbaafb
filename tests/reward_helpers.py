"""Test-only scorers for the reward service, registered by tests under "tests.reward_helpers:<Class>"."""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from rewards.base import RewardInputError, Scorer, ScoreResult


def mean_scores(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """Mean pixel value in [0, 1] plus 0.01 per prompt character: depends on the image and its prompt."""
    return images.mean(axis=(1, 2, 3)) / 255 + 0.01 * np.array([len(p) for p in prompts])


class SlowMean(Scorer):
    """`mean_scores` after `sleep_s`; the first call to find `hang_file` deletes it and hangs for an hour. Built after
    `start_delay_s` (a model that loads slowly), then its process id is appended to `pid_file` (one line per life)."""

    name = "slow_mean"

    def __init__(self, sleep_s: float = 0.0, hang_file: str | None = None, start_delay_s: float = 0.0,
                 pid_file: str | None = None):
        self.sleep_s, self.hang_file = sleep_s, hang_file
        time.sleep(start_delay_s)
        if pid_file:
            with open(pid_file, "a") as f:
                f.write(f"{os.getpid()}\n")

    def score(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> ScoreResult:
        if self.hang_file:
            try:
                os.remove(self.hang_file)
                time.sleep(3600)
            except FileNotFoundError:
                pass
        time.sleep(self.sleep_s)
        return ScoreResult(scores=mean_scores(images, prompts), metrics={"chars": np.array([len(p) for p in prompts])})


class NanWhereAsked(Scorer):
    """`mean_scores`, but NaN for the images whose metadata says {"nan": True}; raises for {"raise": True}."""

    name = "nan_where_asked"

    def score(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> ScoreResult:
        if any(m.get("raise") for m in metadata):
            raise RewardInputError("asked to raise")
        scores = mean_scores(images, prompts)
        scores[[bool(m.get("nan")) for m in metadata]] = np.nan
        return ScoreResult(scores=scores)


class NanForWord(Scorer):
    """`mean_scores`, but NaN for every image whose prompt contains `word`."""

    name = "nan_for_word"

    def __init__(self, word: str = "poison"):
        self.word = word

    def score(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> ScoreResult:
        scores = mean_scores(images, prompts)
        scores[[self.word in p for p in prompts]] = np.nan
        return ScoreResult(scores=scores)


class ImageHolder:
    """An actor that keeps images in the object store as their owner, like a rollout worker's returned images."""

    def put(self, images):
        import ray

        return [ray.put(images)]  # in a list: the caller gets the reference, not the array
