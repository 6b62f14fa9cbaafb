"""The shapes world: the generator (checked from the pixels), its prompt sources, and the `shapes` reward."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from cluster.config import DataConfig, EvalConfig
from rewards.base import RewardInputError
from rewards.registry import build, registered
from rewards.shapes import ShapesScorer
from rollout.prompts.sources import eval_prompts, training_prompts
from rollout.shapes import data as shapes_data
from rollout.shapes.data import HELDOUT, caption, combos, dataset, shapes_prompts

GREY = np.array([128, 128, 128], dtype=np.uint8)


# --------------------------------------------------------------------------- generator


def _squares_from_pixels(image: np.ndarray) -> tuple[set[tuple[int, ...]], list[tuple[int, int, int, int]]]:
    """The non-grey colours present and the bounding boxes (top, left, bottom, right; inclusive) of the 8-connected
    non-grey regions, each checked to be completely filled."""
    foreground = np.any(image != GREY, axis=-1)
    colours = {tuple(int(v) for v in px) for px in image[foreground]}
    labels, found = ndimage.label(foreground, structure=np.ones((3, 3)))
    boxes = []
    for region in ndimage.find_objects(labels):
        assert np.all(labels[region] > 0), "a region is not a filled rectangle"
        rows, cols = region
        boxes.append((rows.start, cols.start, rows.stop - 1, cols.stop - 1))
    assert len(boxes) == found
    return colours, boxes


def test_images_show_the_asked_count_of_filled_squares_in_one_colour_apart_and_inside():
    images, captions, metadata = dataset(200, seed=3, split="all")
    assert images.shape == (200, 64, 64, 3) and images.dtype == np.uint8
    seen = set()
    for image, meta in zip(images, metadata):
        colours, boxes = _squares_from_pixels(image)
        assert colours == {shapes_data.RGB[meta["colour"]]}
        assert len(boxes) == meta["count"]
        for top, left, bottom, right in boxes:
            side = bottom - top + 1
            assert right - left + 1 == side and 10 <= side <= 14
            assert 0 <= top and 0 <= left and bottom < 64 and right < 64
        for a, b in itertools.combinations(boxes, 2):
            # background pixels between the two boxes along the axis where they are furthest apart
            gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) - 1
            assert gap >= 3, (a, b)
        seen.add((meta["count"], meta["colour"]))
    assert len(seen) == 16  # 200 draws cover every combo


def test_the_background_is_grey_and_colours_are_far_apart():
    palette = [np.array(shapes_data.BACKGROUND), *map(np.array, shapes_data.RGB.values())]
    for a, b in itertools.combinations(palette, 2):
        assert np.linalg.norm(a - b) > 140
    images, _, _ = dataset(64, seed=0)
    assert np.all(np.all(images == GREY, axis=-1).mean(axis=(1, 2)) > 0.8)  # at most 4 × 14² of 64² pixels coloured


def test_dataset_is_a_pure_function_of_the_seed():
    first, second, other = dataset(32, seed=7), dataset(32, seed=7), dataset(32, seed=8)
    assert np.array_equal(first[0], second[0]) and first[1:] == second[1:]
    assert not np.array_equal(first[0], other[0])


def test_heldout_combos_form_a_latin_square_and_never_appear_in_train():
    assert sorted(n for n, _ in HELDOUT) == [1, 2, 3, 4]
    assert sorted(c for _, c in HELDOUT) == sorted(shapes_data.COLOURS)
    assert len(combos("train")) == 12 and len(combos("heldout")) == 4 and len(combos("all")) == 16
    assert set(combos("train")).isdisjoint(HELDOUT) and set(combos("heldout")) == set(HELDOUT)
    _, captions, metadata = dataset(500, seed=1, split="train")
    assert all((m["count"], m["colour"]) not in HELDOUT and m["split"] == "train" for m in metadata)
    heldout_captions = {p.prompt for p in shapes_prompts("heldout")}
    assert heldout_captions.isdisjoint(captions)
    with pytest.raises(ValueError, match="unknown split"):
        combos("test")


def test_captions_follow_the_three_templates():
    assert caption(2, "red", 0) == "a photo of two red squares"
    assert caption(2, "red", 1) == "two red squares"
    assert caption(2, "red", 2) == "an image of two red squares"
    assert caption(1, "blue", 0) == "a photo of one blue square"
    assert caption(1, "green", 1) == "one green square"
    assert caption(3, "yellow", 2) == "an image of three yellow squares"
    assert caption(4, "green", 0) == "a photo of four green squares"
    with pytest.raises(ValueError):
        caption(5, "red")


def test_prompt_lists_and_sources():
    train, heldout, every = shapes_prompts("train"), shapes_prompts("heldout"), shapes_prompts("all")
    assert (len(train), len(heldout), len(every)) == (36, 12, 48)
    assert len({p.prompt for p in every}) == 48
    assert heldout[0].prompt == "a photo of one blue square"
    assert heldout[0].metadata == {"count": 1, "colour": "blue", "split": "heldout"}
    assert {p.metadata["split"] for p in every} == {"train", "heldout"}
    assert [p.prompt for p in training_prompts(DataConfig(source="shapes_train"))] == [p.prompt for p in train]
    assert eval_prompts(EvalConfig(source="shapes_heldout", num_prompts=5)) == heldout[:5]
    assert len(eval_prompts(EvalConfig(source="shapes_all"))) == 48


# --------------------------------------------------------------------------- scorer


def _image(*squares: tuple[str, int, int, int]) -> np.ndarray:
    """A grey 64×64 image with (colour, top, left, side) squares."""
    image = np.empty((64, 64, 3), dtype=np.uint8)
    image[:] = GREY
    for colour, top, left, side in squares:
        image[top:top + side, left:left + side] = shapes_data.RGB[colour]
    return image


def _score(images, prompts, metadata=None):
    return ShapesScorer()(np.stack(images), prompts, metadata)


def test_scorer_is_exact_on_generated_images_also_blurred_and_noisy():
    images, captions, metadata = dataset(256, seed=11, split="all")
    rng = np.random.default_rng(0)
    blurred = np.stack([ndimage.gaussian_filter(im.astype(np.float32), sigma=(0.7, 0.7, 0)) for im in images])
    variants = {
        "clean": images,
        "blurred": blurred.round().clip(0, 255).astype(np.uint8),
        "noisy": (images + rng.normal(0, 8, images.shape)).round().clip(0, 255).astype(np.uint8),
        "blurred+noisy": (blurred + rng.normal(0, 8, images.shape)).round().clip(0, 255).astype(np.uint8),
    }
    for name, variant in variants.items():
        for meta in (metadata, None):  # target from metadata, and parsed from the caption
            result = ShapesScorer()(variant, captions, meta)
            assert result.scores.dtype == np.float32
            assert np.all(result.scores == 1.0), name
            assert np.all(result.metrics["shapes_exact"] == 1.0), name
            assert np.array_equal(result.metrics["shapes_count"], [m["count"] for m in metadata]), name


def test_scorer_rewards_on_hand_built_images():
    images = [
        _image(("red", 2, 2, 12), ("red", 30, 30, 12), ("blue", 2, 40, 12)),  # ask 3 red: 1 − (1 + 1)/3
        _image(*[("green", 2 + 30 * (i // 2), 2 + 30 * (i % 2), 12) for i in range(4)]),  # ask 2 green, 4 drawn: 0
        _image(),  # ask 1 yellow, nothing drawn: 0
        _image(("yellow", 10, 10, 12), ("blue", 40, 40, 5)),  # a 5×5 blob (25 px) is not an object: 1
        _image(("red", 2, 2, 12), ("red", 20, 20, 12), ("red", 40, 2, 12)),  # ask 2 red, 3 drawn: 1 − 1/2
        _image(("blue", 10, 10, 12), ("blue", 22, 22, 12)),  # diagonal neighbours are one object: 1 − 1/2
    ]
    prompts = ["a photo of three red squares", "two green squares", "an image of one yellow square",
               "one yellow square", "two red squares", "a photo of two blue squares"]
    result = _score(images, prompts)
    np.testing.assert_allclose(result.scores, [1 / 3, 0.0, 0.0, 1.0, 0.5, 0.5], rtol=1e-6)
    assert result.metrics["shapes_exact"].tolist() == [0, 0, 0, 1, 0, 0]
    assert result.metrics["shapes_count"].tolist() == [2, 4, 0, 1, 3, 1]


def test_metadata_target_wins_over_the_text():
    image = _image(("green", 5, 5, 12), ("green", 30, 30, 12))
    result = _score([image, image], ["anything at all", "one red square"],
                    [{"count": 2, "colour": "green"}, {"count": 2, "colour": "green"}])
    assert result.scores.tolist() == [1.0, 1.0]


def test_unreadable_targets_are_errors_naming_the_prompt():
    with pytest.raises(RewardInputError, match="a photo of a dog"):
        _score([_image()], ["a photo of a dog"])
    with pytest.raises(RewardInputError, match="purple"):
        _score([_image()], ["x"], [{"count": 2, "colour": "purple"}])


def test_registry_builds_the_scorer_with_options():
    assert "shapes" in registered()
    scorer = build("shapes", max_distance=50, min_pixels=10)
    assert isinstance(scorer, ShapesScorer) and (scorer.max_distance, scorer.min_pixels) == (50.0, 10)
    with pytest.raises(ValueError, match="min_pixels"):
        build("shapes", min_pixels=0)
