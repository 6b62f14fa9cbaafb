"""JPEG compressibility: −(JPEG size in kB)/500 at quality 95 (the DDPO line of work); no model, prompt unused."""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from rewards.base import Scorer, ScoreResult


def jpeg_kilobytes(image: np.ndarray, quality: int) -> float:
    """Size of one uint8 (H, W, 3) image as a PIL JPEG at `quality`, in kB (1000 bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegCompressibility(Scorer):
    """Rewards images that compress well; the `jpeg_kb` metric keeps the size."""

    name = "jpeg_compressibility"

    @classmethod
    def check(cls, quality: int = 95, divisor: float = 500.0) -> None:
        if not 1 <= quality <= 100:
            raise ValueError(f"{cls.name}: quality must lie in 1..100, got {quality}")
        if divisor <= 0:
            raise ValueError(f"{cls.name}: divisor must be > 0, got {divisor}")

    def __init__(self, quality: int = 95, divisor: float = 500.0):
        self.check(quality=quality, divisor=divisor)
        self.quality, self.divisor = quality, divisor

    def score(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> ScoreResult:
        kb = np.array([jpeg_kilobytes(image, self.quality) for image in images], dtype=np.float32)
        return ScoreResult(scores=-kb / np.float32(self.divisor), metrics={"jpeg_kb": kb})
