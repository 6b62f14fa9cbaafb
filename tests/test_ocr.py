"""OCR reward: the rule of docs/math.md "Reward definitions" by hand, and the real rapidocr engine on text rendered
with PIL."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from rewards.base import RewardInputError
from rewards.ocr import OCRScorer, extract_target, levenshtein, ocr_reward
from rewards.registry import build

OCR_PROMPTS = Path(__file__).resolve().parents[1] / "data/ocr/test.txt"
DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


def render(text: str, size: int = 512, font_size: int = 44) -> np.ndarray:
    """Dark text centred on a light background, (size, size, 3) uint8."""
    font = ImageFont.truetype(str(DEJAVU), font_size) if DEJAVU.is_file() else ImageFont.load_default(size=font_size)
    image = Image.new("RGB", (size, size), (236, 228, 205))
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    draw.text(((size - (x1 - x0)) / 2 - x0, (size - (y1 - y0)) / 2 - y0), text, font=font, fill=(20, 24, 60))
    return np.asarray(image)


@pytest.fixture(scope="module")
def scorer() -> OCRScorer:
    return build("ocr")


def test_levenshtein_counts_edits() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("same", "same") == 0


def test_reward_rule_by_hand() -> None:
    # Case and spaces ignored; the target inside longer text is a match.
    assert ocr_reward("Open Late", "WE ARE openlate TODAY") == 1.0
    # "openlate" vs "opnlate": one deletion over 8 characters.
    assert ocr_reward("Open Late", "Opn Late") == pytest.approx(1 - 1 / 8)
    # Nothing read: the distance is the whole target, reward 0.
    assert ocr_reward("Open Late", "") == 0.0
    # A distance above the target's length is capped at it: reward 0, never negative.
    assert levenshtein("abc", "xyzxyzxyz") == 9
    assert ocr_reward("abc", "xyzxyzxyz") == 0.0


def test_extract_target_takes_the_first_quoted_span() -> None:
    assert extract_target('a sign that says "Hello World" and "Bye"') == "Hello World"
    assert extract_target("no quotes here") is None
    assert extract_target('one "unclosed quote') is None


def test_extract_target_on_the_ocr_test_prompts() -> None:
    lines = [line for line in OCR_PROMPTS.read_text().splitlines() if line.strip()]
    assert len(lines) > 1000
    for line in lines:
        assert extract_target(line) == line.split('"')[1]
        assert extract_target(line).strip()
    assert extract_target(lines[0]) == "Spring Collection 2024"
    assert extract_target(lines[2]) == "Forever Yours"


def test_exact_rendered_target_scores_one(scorer: OCRScorer) -> None:
    images = np.stack([render("Forever Yours"), render("Open Late")])
    result = scorer(images, ['an engraved ring reading "Forever Yours"', 'a neon sign that says "Open Late" at night'])
    np.testing.assert_array_equal(result.scores, [1.0, 1.0])
    assert result.scores.dtype == np.float32


def test_large_image_is_downscaled_and_still_read(scorer: OCRScorer) -> None:
    assert scorer(render("Open Late", size=1024, font_size=64)[None], ['a sign "Open Late"']).scores[0] == 1.0


def test_rendered_misspelling_scores_its_edit_distance(scorer: OCRScorer) -> None:
    # Read "forevryours" (11 characters) against "foreveryours" (12): one deletion, 1 - 1/12.
    result = scorer(render("Forevr Yours")[None], ['a ring reading "Forever Yours"'])
    assert result.scores[0] == pytest.approx(1 - 1 / 12, abs=1e-6)


def test_blank_image_scores_zero(scorer: OCRScorer) -> None:
    blank = np.full((1, 256, 256, 3), 230, dtype=np.uint8)
    assert scorer(blank, ['a poster saying "Sale"']).scores[0] == 0.0


def test_prompt_without_quoted_target_is_named(scorer: OCRScorer) -> None:
    images = np.stack([render("Sale"), render("Sale")])
    with pytest.raises(RewardInputError, match=r"prompt 1 .*'a poster with no quoted text'"):
        scorer(images, ['a poster saying "Sale"', "a poster with no quoted text"])


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract-ocr not installed (optional fallback engine)")
def test_tesseract_engine_reads_clean_text() -> None:
    result = OCRScorer(engine="tesseract")(np.stack([render("Forever Yours"), render("Forevr Yours")]),
                                           ['"Forever Yours"', '"Forever Yours"'])
    np.testing.assert_allclose(result.scores, [1.0, 1 - 1 / 12], atol=1e-6)


def test_unknown_engine_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="rapidocr, tesseract"):
        OCRScorer(engine="paddle")
