"""OCR reward: how closely the text read in the image matches the prompt's first double-quoted span.

r = 1 − d / len(target), both texts lower-cased without spaces, d = 0 when the target occurs in the recognised text
(all detected lines concatenated), else their Levenshtein distance capped at len(target). The default engine is
rapidocr with the PP-OCR ONNX models inside its wheel (offline); "tesseract" (Debian's tesseract-ocr) reads only clean
document-like text and is a fallback.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rewards.base import RewardInputError, Scorer, ScoreResult

_QUOTED = re.compile(r'"([^"]*)"')


def extract_target(prompt: str) -> str | None:
    """The first span in double quotes ('sign reading "Open Late"' -> 'Open Late'), or None when there is none."""
    match = _QUOTED.search(prompt)
    return match.group(1) if match else None


def normalize(text: str) -> str:
    """Lower-cased, without spaces: the form both texts are compared in."""
    return text.lower().replace(" ", "")


def quoted_target(prompt: str) -> str | None:
    """The target the scorer reads for: the first quoted span, or None when there is none or it is blank (such a
    prompt cannot be scored; the job's preflight refuses it before training)."""
    target = extract_target(prompt)
    return target if target is not None and normalize(target) else None


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_reward(target: str, recognized: str) -> float:
    """1 − d/len(target) on the normalised texts; d = 0 if the target is a substring, else min(Levenshtein, len)."""
    target, recognized = normalize(target), normalize(recognized)
    if not target:
        raise ValueError("the quoted target is empty after removing spaces")
    distance = 0 if target in recognized else min(levenshtein(target, recognized), len(target))
    return 1.0 - distance / len(target)


def _rapidocr(use_angle_cls: bool, max_side: int) -> Callable[[np.ndarray], str]:
    """rapidocr reader: RGB uint8 image -> its text lines concatenated (top to bottom, left to right)."""
    import cv2
    from rapidocr import RapidOCR

    engine = RapidOCR(params={
        "Global.log_level": "error",
        "Global.use_cls": use_angle_cls,
        # Text detection at the image's own size (rapidocr's default upsamples a 512 px image to 736 px).
        "Det.limit_type": "max",
        "Det.limit_side_len": max_side,
    })
    logging.getLogger("RapidOCR").setLevel(logging.ERROR)

    def read(image: np.ndarray) -> str:
        scale = max_side / max(image.shape[:2])
        if scale < 1:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        result = engine(np.ascontiguousarray(image[..., ::-1]))  # rapidocr takes arrays as BGR
        return "".join(result.txts or ())

    return read


def _tesseract() -> Callable[[np.ndarray], str]:
    """Debian's tesseract-ocr CLI: RGB uint8 image -> its text, lines joined."""
    binary = shutil.which("tesseract")  # OCRScorer.check made sure there is one

    def read(image: np.ndarray) -> str:
        import cv2

        ok, png = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
        out = subprocess.run([binary, "stdin", "stdout"], input=png.tobytes(), capture_output=True, check=True)
        return "".join(out.stdout.decode("utf-8", "replace").splitlines())

    return read


class OCRScorer(Scorer):
    """OCR reward per image against the quoted text of its prompt (see module docstring)."""

    name = "ocr"
    ENGINES = ("rapidocr", "tesseract")

    @classmethod
    def check(cls, engine: str = "rapidocr", max_side: int = 768, use_angle_cls: bool = False) -> None:
        if engine not in cls.ENGINES:
            raise ValueError(f"unknown OCR engine {engine!r}; valid: {', '.join(cls.ENGINES)}")
        if engine == "rapidocr" and importlib.util.find_spec("rapidocr") is None:
            raise RuntimeError("engine 'rapidocr' needs the rapidocr package (pip install rapidocr onnxruntime)")
        if engine == "tesseract" and shutil.which("tesseract") is None:
            raise RuntimeError("engine 'tesseract' needs the tesseract binary (apt-get install tesseract-ocr)")

    def __init__(self, engine: str = "rapidocr", max_side: int = 768, use_angle_cls: bool = False) -> None:
        """max_side: larger images are downscaled to it first; use_angle_cls: rapidocr's 180° classifier (off)."""
        self.check(engine=engine, max_side=max_side, use_angle_cls=use_angle_cls)
        self.engine = engine
        self.read = _rapidocr(use_angle_cls, max_side) if engine == "rapidocr" else _tesseract()

    def score(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> ScoreResult:
        targets = []
        for index, prompt in enumerate(prompts):
            target = quoted_target(prompt)
            if target is None:
                raise RewardInputError(f"OCR prompt {index} has no quoted target text: {prompt!r}")
            targets.append(target)
        scores = np.array([ocr_reward(t, self.read(image)) for t, image in zip(targets, images)], dtype=np.float32)
        return ScoreResult(scores)
