"""JPEG compressibility is −(JPEG size in kB)/500 at quality 95 and prefers images that compress well."""

import io

import numpy as np
import pytest
from PIL import Image

import rewards
from rewards import RewardInputError


def test_score_is_minus_kilobytes_over_500():
    rng = np.random.default_rng(0)
    images = np.stack([np.full((64, 48, 3), 128, np.uint8), rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)])
    result = rewards.build("jpeg_compressibility")(images, ["a", "b"])

    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        sizes.append(len(buffer.getvalue()) / 1000)
    np.testing.assert_allclose(result.metrics["jpeg_kb"], sizes, rtol=1e-6)
    np.testing.assert_allclose(result.scores, -np.array(sizes) / 500, rtol=1e-6)
    assert result.scores.dtype == np.float32
    assert result.scores[0] > result.scores[1]  # flat grey compresses better than noise


def test_lower_quality_compresses_more():
    image = np.random.default_rng(1).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    high = rewards.build("jpeg_compressibility")(image, ["x"]).scores
    low = rewards.build("jpeg_compressibility", quality=30)(image, ["x"]).scores
    assert low[0] > high[0]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="quality must lie in 1..100"):
        rewards.build("jpeg_compressibility", quality=0)
    with pytest.raises(RewardInputError, match="uint8"):
        rewards.build("jpeg_compressibility")(np.zeros((1, 8, 8, 3), np.float32), ["x"])
