"""The synthetic "shapes" world: a miniature GenEval with a count and a colour per image, fully deterministic.

An image is 64×64 RGB on a grey background with 1–4 filled, axis-aligned, non-overlapping squares (side 10–14 px, at
least 3 background pixels between any two, fully inside the image), all of one colour out of red, green, blue and
yellow. Its caption names the count and colour in one of three templates ("a photo of two red squares", "two red
squares", "an image of two red squares"; singular for one: "a photo of one blue square").

The 16 (count, colour) combos are split like a Latin square: (1, blue), (2, yellow), (3, red) and (4, green) are held
out of base-model training, so an RL run on them measures compositional generalisation; the other 12 are "train".
`shapes_prompts(split)` gives the prompt list for `data.source` / `eval.source` = shapes_train / shapes_heldout /
shapes_all, with the target in each prompt's metadata (`count`, `colour`, `split`) for the `shapes` reward.
"""

from __future__ import annotations

import numpy as np

from rollout.prompts.groups import PromptItem

IMAGE_SIZE = 64
BACKGROUND = (128, 128, 128)
# Saturated colours, far (> 140 in RGB distance) from the grey background and from each other.
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 30),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 30),
}
COLOURS: tuple[str, ...] = tuple(RGB)
COUNTS: tuple[int, ...] = (1, 2, 3, 4)
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
TEMPLATES: tuple[str, ...] = ("a photo of {}", "{}", "an image of {}")
HELDOUT: tuple[tuple[int, str], ...] = ((1, "blue"), (2, "yellow"), (3, "red"), (4, "green"))
SPLITS = ("train", "heldout", "all")
SIDE_MIN, SIDE_MAX = 10, 14
MIN_GAP = 3


def split_of(count: int, colour: str) -> str:
    """'heldout' for the four Latin-square combos, else 'train'."""
    return "heldout" if (count, colour) in HELDOUT else "train"


def combos(split: str = "all") -> list[tuple[int, str]]:
    """The (count, colour) combos of a split ('train': 12, 'heldout': 4, 'all': 16), by count then colour."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    every = [(n, c) for n in COUNTS for c in COLOURS]
    return every if split == "all" else [combo for combo in every if split_of(*combo) == split]


def caption(count: int, colour: str, template: int = 0) -> str:
    """The caption of a combo in template 0, 1 or 2, e.g. caption(2, "red", 0) == "a photo of two red squares"."""
    if count not in NUMBER_WORDS or colour not in RGB:
        raise ValueError(f"no caption for count {count!r} and colour {colour!r}; counts {COUNTS}, colours {COLOURS}")
    noun = "square" if count == 1 else "squares"
    return TEMPLATES[template].format(f"{NUMBER_WORDS[count]} {colour} {noun}")


def _apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Whether squares (top, left, side) a and b have at least MIN_GAP background pixels between them on some axis."""
    (ay, ax, aside), (by, bx, bside) = a, b
    return max(by - (ay + aside), ay - (by + bside), bx - (ax + aside), ax - (bx + bside)) >= MIN_GAP


def place_squares(count: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """`count` squares as (top, left, side), inside the image and pairwise MIN_GAP apart (rejection sampling)."""
    while True:
        squares: list[tuple[int, int, int]] = []
        for _ in range(100 * count):
            side = int(rng.integers(SIDE_MIN, SIDE_MAX + 1))
            top, left = (int(v) for v in rng.integers(0, IMAGE_SIZE - side + 1, size=2))
            candidate = (top, left, side)
            if all(_apart(candidate, other) for other in squares):
                squares.append(candidate)
                if len(squares) == count:
                    return squares


def render(count: int, colour: str, rng: np.random.Generator) -> np.ndarray:
    """One image of `count` `colour` squares: uint8 (64, 64, 3)."""
    if count not in NUMBER_WORDS or colour not in RGB:
        raise ValueError(f"cannot render count {count!r} and colour {colour!r}; counts {COUNTS}, colours {COLOURS}")
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for top, left, side in place_squares(count, rng):
        image[top:top + side, left:left + side] = RGB[colour]
    return image


def dataset(n: int, seed: int, split: str = "train") -> tuple[np.ndarray, list[str], list[dict]]:
    """`n` images of the split's combos with random templates: uint8 (n, 64, 64, 3), captions, and metadata
    ({count, colour, split, template}); a pure function of (n, seed, split)."""
    choices = combos(split)
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions, metadata = [], []
    for i in range(n):
        count, colour = choices[int(rng.integers(len(choices)))]
        template = int(rng.integers(len(TEMPLATES)))
        images[i] = render(count, colour, rng)
        captions.append(caption(count, colour, template))
        metadata.append({"count": count, "colour": colour, "split": split_of(count, colour), "template": template})
    return images, captions, metadata


def shapes_prompts(split: str = "train") -> list[PromptItem]:
    """One prompt per (combo, template) of the split (36 train, 12 held-out, 48 all) with metadata
    {count, colour, split} for the `shapes` reward."""
    return [
        PromptItem(caption(count, colour, template),
                   {"count": count, "colour": colour, "split": split_of(count, colour)})
        for count, colour in combos(split)
        for template in range(len(TEMPLATES))
    ]
