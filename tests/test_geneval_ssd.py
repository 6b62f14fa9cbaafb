"""GenEval end to end: the SSD-MobileNet backend on real photos (Debian's darknet samples), the HSV colours, and the
CLIP and Mask2Former backends through their loading code on tiny random checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rewards.base import RewardInputError
from rewards.colors import COLORS, ClipColors, HSVColors, object_crop, pixel_colors
from rewards.detectors import suppress_duplicates
from rewards.geneval import GenEvalScorer
from rewards.geneval_rules import Detection
from rewards.registry import build

ROOT = Path(__file__).resolve().parents[1]
PHOTO_DIRS = (ROOT / ".cache/darknet-photos", Path("/usr/share/darknet/data"))


def _photo_dir() -> Path | None:
    return next((d for d in PHOTO_DIRS if (d / "dog.jpg").is_file()), None)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    folder = _photo_dir()
    if folder is None:
        pytest.skip("darknet sample photos missing: run tests/fixtures/fetch_darknet_photos.sh (setup.sh does)")
    return {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.jpg"))}


@pytest.fixture(scope="module")
def scorer() -> GenEvalScorer:
    return build("geneval")  # SSD-MobileNet + HSV colours, offline


def labels(scorer: GenEvalScorer, image: np.ndarray) -> list[str]:
    return sorted(d.label for d in scorer.detector.detect(image[None])[0] if d.score > scorer.detector.threshold)


def test_ssd_finds_what_is_in_the_photos_once(scorer: GenEvalScorer, photos: dict[str, np.ndarray]) -> None:
    assert labels(scorer, photos["person"]) == ["dog", "horse", "person"]
    # The false cat (0.48) sits on the dog's box, and SSD also labels the white pickup "truck" on the car's box:
    # one label per box keeps the best.
    assert labels(scorer, photos["dog"]) == ["bicycle", "car", "dog"]
    # A false cow (0.53) on the third horse's box; a second, inner giraffe box (0.58) inside the giraffe's.
    assert labels(scorer, photos["horses"]) == ["horse", "horse", "horse"]
    assert labels(scorer, photos["giraffe"]) == ["giraffe", "zebra"]
    assert labels(scorer, photos["eagle"]) == ["bird"]


def one(cls: str, **extra: object) -> dict:
    return {"class": cls, "count": 1, **extra}


# (photo, prompt, metadata, official accuracy, partial reward by hand)
CASES = [
    ("person", "a photo of a person", {"tag": "single_object", "include": [one("person")]}, 1, 1.0),
    ("person", "a photo of a dog and a horse", {"tag": "two_object", "include": [one("dog"), one("horse")]}, 1, 1.0),
    ("person", "a photo of a dog left of a person",
     {"tag": "position", "include": [one("person"), one("dog", position=["left of", 0])]}, 1, 1.0),
    ("person", "a photo of a horse right of a person",
     {"tag": "position", "include": [one("person"), one("horse", position=["right of", 0])]}, 1, 1.0),
    ("person", "a photo of a horse left of a person",
     {"tag": "position", "include": [one("person"), one("horse", position=["left of", 0])]}, 0, 2 / 3),
    ("person", "a photo of a white horse", {"tag": "colors", "include": [one("horse", color="white")]}, 1, 1.0),
    ("person", "a photo of a brown horse", {"tag": "colors", "include": [one("horse", color="brown")]}, 0, 0.5),
    ("person", "a photo of a black dog and a white horse",
     {"tag": "color_attr", "include": [one("dog", color="black"), one("horse", color="white")]}, 1, 1.0),
    ("person", "a photo of two dogs", {"tag": "counting", "include": [{"class": "dog", "count": 2}],
                                       "exclude": [{"class": "dog", "count": 3}]}, 0, 0.5),
    ("dog", "a photo of a bicycle and a dog", {"tag": "two_object", "include": [one("bicycle"), one("dog")]}, 1, 1.0),
    ("dog", "a photo of a cat", {"tag": "single_object", "include": [one("cat")]}, 0, 0.0),
    ("horses", "a photo of a horse", {"tag": "single_object", "include": [one("horse")]}, 1, -1.0),  # 1 - |1 - 3|
    ("horses", "a photo of a cow", {"tag": "single_object", "include": [one("cow")]}, 0, 0.0),
    # More than two horses graze there: the exclude clause (3 or more) fails it.
    ("horses", "a photo of two horses", {"tag": "counting", "include": [{"class": "horse", "count": 2}],
                                         "exclude": [{"class": "horse", "count": 3}]}, 0, 0.5),
    ("giraffe", "a photo of a giraffe and a zebra",
     {"tag": "two_object", "include": [one("giraffe"), one("zebra")]}, 1, 1.0),
    ("giraffe", "a photo of two giraffes", {"tag": "counting", "include": [{"class": "giraffe", "count": 2}],
                                            "exclude": [{"class": "giraffe", "count": 3}]}, 0, 0.5),
    ("eagle", "a photo of a bird", {"tag": "single_object", "include": [one("bird")]}, 1, 1.0),
    ("kite", "a photo of a kite and a person", {"tag": "two_object", "include": [one("kite"), one("person")]}, 1, None),
]


def test_prompts_pass_or_fail_on_real_photos(scorer: GenEvalScorer, photos: dict[str, np.ndarray]) -> None:
    for photo, prompt, meta, acc, partial in CASES:
        result = scorer(photos[photo][None], [prompt], [meta])
        assert result.metrics["accuracy"][0] == acc, (photo, prompt)
        if partial is not None:
            assert result.scores[0] == pytest.approx(partial, abs=1e-6), (photo, prompt)
        assert result.metrics["strict_accuracy"][0] == (partial == 1.0), (photo, prompt)


def test_batch_scores_match_single_images(scorer: GenEvalScorer, photos: dict[str, np.ndarray]) -> None:
    image = photos["person"]
    metas = [{"tag": "single_object", "include": [one("horse")]}, {"tag": "single_object", "include": [one("cat")]}]
    result = scorer(np.stack([image, image]), ["a photo of a horse", "a photo of a cat"], metas)
    np.testing.assert_array_equal(result.scores, [1.0, 0.0])
    np.testing.assert_array_equal(result.metrics["accuracy"], [1.0, 0.0])


def test_unknown_class_is_named(scorer: GenEvalScorer) -> None:
    image = np.zeros((1, 64, 64, 3), np.uint8)
    with pytest.raises(RewardInputError, match=r"prompt 0 \('a photo of a unicorn'\)"):
        scorer(image, ["a photo of a unicorn"], [{"tag": "single_object", "include": [one("unicorn")]}])
    with pytest.raises(RewardInputError, match="include"):
        scorer(image, ["a photo"], [{}])


def test_duplicate_handling() -> None:
    dets = [Detection("horse", 0.55, (0, 0, 100, 100)), Detection("cow", 0.53, (1, 0, 100, 100)),
            Detection("giraffe", 0.9, (0, 0, 200, 400)), Detection("giraffe", 0.6, (50, 100, 150, 300)),
            Detection("dog", 0.9, (300, 0, 400, 100)), Detection("dog", 0.8, (340, 0, 440, 100)),
            Detection("dog", 0.7, (500, 0, 600, 100))]
    kept = suppress_duplicates(dets, nms_iou=0.5, contained=0.9, same_box_iou=0.9)
    # cow: same box as the horse; inner giraffe: 100 % inside the first; dogs at IoU 60/140 = 0.43 stay (two dogs).
    assert [(d.label, d.score) for d in kept] == [("giraffe", 0.9), ("dog", 0.9), ("dog", 0.8), ("dog", 0.7),
                                                  ("horse", 0.55)]


# ----------------------------------------------------------------------------------------------------- colours

PATCHES = {"red": (220, 20, 30), "orange": (250, 140, 20), "yellow": (240, 220, 30), "green": (40, 160, 60),
           "blue": (30, 60, 200), "purple": (120, 40, 160), "pink": (250, 150, 190), "brown": (120, 70, 30),
           "black": (15, 15, 15), "white": (245, 245, 245)}


def test_hsv_names_plain_colours() -> None:
    rgb = np.array(list(PATCHES.values()), dtype=np.uint8)
    assert [COLORS[i] for i in pixel_colors(rgb)] == list(PATCHES)


def test_hsv_separates_object_from_background_in_a_box() -> None:
    image = np.full((200, 200, 3), (90, 140, 200), np.uint8)  # blue sky around a red disc
    yy, xx = np.mgrid[:200, :200]
    image[(yy - 100) ** 2 + (xx - 100) ** 2 < 45 ** 2] = PATCHES["red"]
    box = Detection("sports ball", 0.9, (40, 40, 160, 160))  # 29 % of the box is sky
    assert HSVColors().classify(image, [box], "sports ball") == ["red"]


def test_masked_crop_paints_the_background_grey() -> None:
    image = np.full((20, 20, 3), 200, np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    crop = object_crop(image, Detection("cup", 0.9, (4, 4, 12, 12), mask=mask))
    assert crop.shape == (8, 8, 3)
    assert (crop[1:6, 1:6] == 200).all() and (crop[0] == 153).all()


def test_clip_colours_load_and_classify(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from rollout.models.tiny import clip_tokenizer

    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8)
    CLIPModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    colors = ClipColors(str(tmp_path))
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    dets = [Detection("cup", 0.9, (0, 0, 30, 30)), Detection("cup", 0.8, (10, 10, 60, 50))]
    picks = colors.classify(image, dets, "cup")
    assert len(picks) == 2 and set(picks) <= set(COLORS)
    # A colour's column: the unit mean of its three unit template embeddings.
    classifier = colors._classifier("cup")
    assert tuple(classifier.shape) == (8, len(COLORS))
    red = colors.encoder.texts(["a photo of a red cup", "a photo of a red-colored cup", "a photo of a red object"])
    red = red.mean(dim=0)
    np.testing.assert_allclose(classifier[:, 0].numpy(), (red / red.norm()).numpy(), atol=1e-6)
    # The scorer takes it through its clip_model option.
    scorer = GenEvalScorer(clip_model=str(tmp_path))
    result = scorer(image[None], ["a photo of a red cup"], [{"tag": "colors", "include": [one("cup", color="red")]}])
    assert result.scores.shape == (1,)


def test_mask2former_backend_runs_a_tiny_checkpoint(tmp_path: Path) -> None:
    from tests.reward_checkpoints import save_tiny_mask2former

    save_tiny_mask2former(tmp_path)
    scorer = GenEvalScorer(detector="mask2former", detector_model=str(tmp_path), threshold=0.0,
                           counting_threshold=0.0)
    assert "computer mouse" in scorer.detector.class_names and "mouse" not in scorer.detector.class_names
    images = np.random.default_rng(0).integers(0, 255, (2, 48, 80, 3), dtype=np.uint8)
    dets = scorer.detector.detect(images)
    assert len(dets) == 2 and dets[0]
    for d in dets[0]:
        assert d.mask.shape == (48, 80)
        ys, xs = np.nonzero(d.mask)
        assert d.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    meta = {"tag": "colors", "include": [one("cup", color="red")]}
    result = scorer(images, ["a photo of a red cup"] * 2, [meta, meta])
    assert result.scores.shape == (2,) and set(result.metrics) == {"accuracy", "strict_accuracy"}
