"""Scorers by name: `build("ocr", **options)`. Adding a scorer is one file and one line here."""

from __future__ import annotations

import importlib
from typing import Any

from rewards.base import Scorer

# name -> "module:Class", imported on first use so a scorer's heavy dependencies load only when it is used.
REGISTRY: dict[str, str] = {
    "jpeg_compressibility": "rewards.jpeg:JpegCompressibility",
    "pickscore": "rewards.pickscore:PickScore",
    "hpsv2": "rewards.hpsv2:HPSv2",
    "aesthetic": "rewards.aesthetic:Aesthetic",
    "ocr": "rewards.ocr:OCRScorer",
    "geneval": "rewards.geneval:GenEvalScorer",
    "shapes": "rewards.shapes:ShapesScorer",
    "http": "rewards.remote:HttpScorer",  # any scorer behind a server (rewards/serve.py)
}


def registered() -> list[str]:
    return sorted(REGISTRY)


def scorer_class(name: str) -> type[Scorer]:
    if name not in REGISTRY:
        raise ValueError(f"unknown reward {name!r}; registered: {', '.join(registered())}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build(name: str, **options: Any) -> Scorer:
    """A scorer built by its registered name with its options (local path or hub id of its weights, thresholds...)."""
    return scorer_class(name)(**options)
