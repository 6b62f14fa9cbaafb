"""The `shapes` reward: counts coloured squares on a grey background by pixel rules (no model).

The prompt asks for `n_asked` objects of one colour ("a photo of three red squares", or metadata `count` / `colour`).
Every pixel takes the nearest of five palette colours (grey background, red, green, blue, yellow) when it lies within
`max_distance` in RGB, else none; 8-connected components of at least `min_pixels` pixels of one colour are objects.
With N the objects of the asked colour and n_other those of the other colours, the reward is

    max(0, 1 − (|N − n_asked| + n_other) / n_asked)

so 1 exactly when the image shows the asked count in the asked colour and nothing else. The denominator is the asked
count, never the detected one, so an empty image scores 0 instead of dividing by zero. Metrics per image:
`shapes_exact` (1.0 when the reward is 1) and `shapes_count` (N).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from rewards.base import RewardInputError, Scorer, ScoreResult

BACKGROUND = (128, 128, 128)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 30),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 30),
}
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}
_TARGET = re.compile(rf"\b({'|'.join(NUMBERS)})\s+({'|'.join(PALETTE)})\s+squares?\b", re.IGNORECASE)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def parse_target(prompt: str, metadata: Mapping[str, Any]) -> tuple[int, str]:
    """(n_asked, colour) from metadata `count` / `colour` when present, else from the prompt; RewardInputError if
    neither names one."""
    if "count" in metadata and "colour" in metadata:
        count, colour = metadata["count"], metadata["colour"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1 or colour not in PALETTE:
            raise RewardInputError(
                f"shapes: prompt {prompt!r} has metadata count={count!r}, colour={colour!r}; expected an integer "
                f"count >= 1 and a colour out of {', '.join(PALETTE)}"
            )
        return count, colour
    match = _TARGET.search(prompt)
    if match is None:
        raise RewardInputError(
            f"shapes: cannot read a target from prompt {prompt!r}: expected '<one|two|three|four> "
            f"<{'|'.join(PALETTE)}> square(s)' or metadata with 'count' and 'colour'"
        )
    return NUMBERS[match.group(1).lower()], match.group(2).lower()


def count_objects(image: np.ndarray, max_distance: float = 70.0, min_pixels: int = 30) -> dict[str, int]:
    """Objects per palette colour in one uint8 (H, W, 3) image."""
    colours = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float32)  # (5, 3)
    distance = np.linalg.norm(image[:, :, None, :].astype(np.float32) - colours, axis=-1)  # (H, W, 5)
    nearest = distance.argmin(axis=-1)
    assigned = np.where(distance.min(axis=-1) <= max_distance, nearest, -1)
    counts = {}
    for index, name in enumerate(PALETTE, start=1):
        labels, found = ndimage.label(assigned == index, structure=_EIGHT_CONNECTED)
        sizes = np.bincount(labels.ravel(), minlength=found + 1)[1:]
        counts[name] = int((sizes >= min_pixels).sum())
    return counts


def shapes_reward(n_asked: int, colour: str, counts: Mapping[str, int]) -> float:
    """max(0, 1 − (|N − n_asked| + n_other) / n_asked) for detected `counts` per colour."""
    found = counts.get(colour, 0)
    other = sum(n for name, n in counts.items() if name != colour)
    return max(0.0, 1.0 - (abs(found - n_asked) + other) / n_asked)


class ShapesScorer(Scorer):
    """Rule-based count-and-colour reward of the shapes world; options: `max_distance` (RGB), `min_pixels`."""

    name = "shapes"

    @classmethod
    def check(cls, max_distance: float = 70.0, min_pixels: int = 30) -> None:
        if max_distance <= 0:
            raise ValueError(f"{cls.name}: max_distance must be > 0, got {max_distance}")
        if min_pixels < 1:
            raise ValueError(f"{cls.name}: min_pixels must be >= 1, got {min_pixels}")

    def __init__(self, max_distance: float = 70.0, min_pixels: int = 30):
        self.check(max_distance=max_distance, min_pixels=min_pixels)
        self.max_distance, self.min_pixels = float(max_distance), int(min_pixels)

    def score(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> ScoreResult:
        targets = [parse_target(prompt, meta) for prompt, meta in zip(prompts, metadata)]
        scores, counts = [], []
        for image, (n_asked, colour) in zip(images, targets):
            found = count_objects(image, self.max_distance, self.min_pixels)
            scores.append(shapes_reward(n_asked, colour, found))
            counts.append(found[colour])
        scores = np.array(scores, dtype=np.float32)
        return ScoreResult(
            scores=scores,
            metrics={"shapes_exact": (scores == 1.0).astype(np.float32), "shapes_count": np.array(counts, np.float32)},
        )
