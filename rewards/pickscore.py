"""PickScore: `logit_scale.exp() · cos(text, image)` of the PickScore_v1 CLIP-H model, divided by `scale` (26).

Weights: `path` is a transformers CLIP folder or hub id (yuvalkirstain/PickScore_v1). That repository carries no
processor; in practice PickScore uses the one of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the default `processor_path`
(set it to null to read the processor from `path`). Flow-GRPO trains on raw/26 and reports the raw value, which is kept
as the `raw` metric. `init: random` builds the CLIP model from the config in `path` with random weights (benchmarks at
real size without the weights).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from rewards.base import Scorer, ScoreResult
from rewards.clip_common import (
    ClipEncoder,
    find_pretrained,
    load_clip_model,
    load_clip_processor,
    torch_device,
    torch_dtype,
)

PICKSCORE_V1 = "yuvalkirstain/PickScore_v1"
CLIP_H_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore(Scorer):
    """Human-preference score of an image for its prompt (PickScore_v1)."""

    name = "pickscore"
    path_options = {"path": "model", "processor_path": "processor"}

    @classmethod
    def check(cls, path: str = PICKSCORE_V1, processor_path: str | None = CLIP_H_PROCESSOR, device: str = "cpu",
              dtype: str = "float32", scale: float = 26.0, batch_size: int = 16, init: str = "pretrained") -> None:
        if init not in ("pretrained", "random"):
            raise ValueError(f"{cls.name}: init must be 'pretrained' or 'random', got {init!r}")
        if scale <= 0:
            raise ValueError(f"{cls.name}: scale must be > 0, got {scale}")
        torch_dtype(cls.name, dtype)
        find_pretrained(cls.name, path)
        find_pretrained(cls.name, processor_path or path, kind="processor",
                        option="processor_path" if processor_path else "path")

    def __init__(self, path: str = PICKSCORE_V1, processor_path: str | None = CLIP_H_PROCESSOR, device: str = "cpu",
                 dtype: str = "float32", scale: float = 26.0, batch_size: int = 16, init: str = "pretrained"):
        self.check(path=path, processor_path=processor_path, device=device, dtype=dtype, scale=scale,
                   batch_size=batch_size, init=init)
        dev = torch_device(self.name, device)
        model = load_clip_model(self.name, path, dtype=torch_dtype(self.name, dtype), device=dev,
                                random_init=init == "random")
        processor = load_clip_processor(self.name, processor_path or path,
                                        option="processor_path" if processor_path else "path")
        self._setup(model, processor, dev, scale, batch_size)

    @classmethod
    def from_model(cls, model: Any, processor: Any, *, device: str = "cpu", scale: float = 26.0,
                   batch_size: int = 16) -> "PickScore":
        """A PickScore around an already-loaded CLIPModel and CLIPProcessor (benchmarks, notebooks)."""
        scorer = cls.__new__(cls)
        scorer._setup(model.eval().requires_grad_(False), processor, torch.device(device), scale, batch_size)
        return scorer

    def _setup(self, model: Any, processor: Any, device: torch.device, scale: float, batch_size: int) -> None:
        self.clip = ClipEncoder(model, processor, device, batch_size)
        self.logit_scale = float(model.logit_scale.detach().float().exp())
        self.scale = float(scale)

    def score(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> ScoreResult:
        cosine = (self.clip.images(images) * self.clip.texts(prompts)).sum(dim=-1)
        raw = (self.logit_scale * cosine).numpy().astype(np.float32)
        return ScoreResult(scores=raw / np.float32(self.scale), metrics={"raw": raw})
