"""The scorer contract: uint8 images + prompts + per-prompt metadata in, float32 scores (N,) out."""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np


class RewardInputError(ValueError):
    """An input a scorer cannot score (e.g. an OCR prompt without a quoted target); names the prompt."""


class ScorerUnavailable(RuntimeError):
    """The scorer's backend cannot answer this time (a remote server down, overloaded or too slow); the reward
    service sends the batch again, as for an actor that died."""


@dataclass
class ScoreResult:
    """Scores of N images, float32 (N,), and optional extra per-image metrics (each an array of N values)."""

    scores: np.ndarray
    metrics: dict[str, np.ndarray] = field(default_factory=dict)


def as_uint8_images(images: Any) -> np.ndarray:
    """Images as a uint8 numpy array (N, H, W, 3); accepts numpy arrays and torch tensors of that layout."""
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise RewardInputError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    return images


class Scorer(abc.ABC):
    """A reward model. Subclasses set `name`, build their model in `__init__(**options)` and implement `score`."""

    name: ClassVar[str]
    # The options that name weights, each a local path or a hub id, with what it holds there: "model" (a transformers
    # model folder), "processor" (a processor's tokenizer files) or "file" (one file; in a hub repo, the one the
    # `filename` option names). The job's preflight finds them all before any scorer starts.
    path_options: ClassVar[dict[str, str]] = {}

    @classmethod
    def check(cls, **options: Any) -> None:
        """Check options as the constructor takes them and find the files it would read, loading no weights (the dry
        run calls it where the scorer's actors run). Scorers with rules for their options or weights to find override
        it with their constructor's own parameters, and their constructor calls it first."""
        inspect.signature(cls.__init__).bind(None, **options)

    @abc.abstractmethod
    def score(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> ScoreResult:
        """Score uint8 images (N, H, W, 3) against their prompts and metadata."""

    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
                 ) -> ScoreResult:
        images = as_uint8_images(images)
        n = images.shape[0]
        metadata = [{} for _ in range(n)] if metadata is None else list(metadata)
        if len(prompts) != n or len(metadata) != n:
            raise RewardInputError(f"{n} images but {len(prompts)} prompts and {len(metadata)} metadata entries")
        result = self.score(images, list(prompts), metadata)
        result.scores = np.asarray(result.scores, dtype=np.float32)
        if result.scores.shape != (n,):
            raise RuntimeError(f"scorer {self.name!r} returned scores of shape {result.scores.shape}, expected ({n},)")
        return result
