"""LAION aesthetic score: a linear/MLP head on the L2-normalised CLIP ViT-L/14 image embedding (≈1–10).

`head_path` is the head's state dict (.pth/.pt or .safetensors). Format: the improved-aesthetic-predictor MLP
(github.com/christophschuhmann/improved-aesthetic-predictor, `sac+logos+ava1-l14-linearMSE.pth`, the head DDPO and
Flow-GRPO use): `layers.{0,2,4,6,7}.weight/bias`, Linear 768→1024→128→64→16→1 with dropout in between and no
activation. The original LAION-aesthetic linear head (`weight`, `bias`: Linear 768→1) loads too. Any chain of
`layers.N` linears is applied in order of N. `path` is the CLIP model (default openai/clip-vit-large-patch14) whose
image features the head was trained on; the prompt is not used.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from rewards.base import Scorer, ScoreResult
from rewards.clip_common import (
    ClipEncoder,
    RewardLoadError,
    find_pretrained,
    load_clip_model,
    load_clip_processor,
    load_state_dict,
    torch_device,
    torch_dtype,
)

CLIP_L14 = "openai/clip-vit-large-patch14"


def head_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Sequential:
    """The head as a chain of Linear layers: `layers.N.*` in order of N, or a single `weight`/`bias` linear."""
    if set(state_dict) == {"weight", "bias"}:
        prefixes = [""]
    else:
        indices = sorted({int(m.group(1)) for k in state_dict if (m := re.fullmatch(r"layers\.(\d+)\.weight", k))})
        prefixes = [f"layers.{i}." for i in indices]
        if not indices or set(state_dict) != {p + s for p in prefixes for s in ("weight", "bias")}:
            raise RewardLoadError(f"aesthetic: the head state dict has keys {sorted(state_dict)[:10]}; expected "
                                  f"layers.N.weight/bias (improved-aesthetic-predictor) or weight/bias (linear)")
    linears = []
    for prefix in prefixes:
        weight, bias = state_dict[prefix + "weight"], state_dict[prefix + "bias"]
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
        layer.load_state_dict({"weight": weight.float(), "bias": bias.float()})
        linears.append(layer)
    for a, b in zip(linears, linears[1:]):
        if a.out_features != b.in_features:
            raise RewardLoadError(f"aesthetic: head layers do not chain ({a.out_features} -> {b.in_features})")
    if linears[-1].out_features != 1:
        raise RewardLoadError(f"aesthetic: the head ends in {linears[-1].out_features} outputs, expected 1")
    return torch.nn.Sequential(*linears).eval().requires_grad_(False)


class Aesthetic(Scorer):
    """LAION aesthetic predictor score of an image (prompt-independent)."""

    name = "aesthetic"
    path_options = {"head_path": "file", "path": "model", "processor_path": "processor"}

    @classmethod
    def check(cls, head_path: str | None = None, path: str = CLIP_L14, processor_path: str | None = None,
              device: str = "cpu", dtype: str = "float32", batch_size: int = 16) -> None:
        if not head_path or not Path(head_path).is_file():
            raise RewardLoadError(f"{cls.name}: head_path {head_path!r} is not a file; download the head, e.g. "
                                  f"sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/"
                                  f"improved-aesthetic-predictor, and set head_path to it")
        torch_dtype(cls.name, dtype)
        find_pretrained(cls.name, path)
        find_pretrained(cls.name, processor_path or path, kind="processor",
                        option="processor_path" if processor_path else "path")

    def __init__(self, head_path: str | None = None, path: str = CLIP_L14, processor_path: str | None = None,
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 16):
        self.check(head_path=head_path, path=path, processor_path=processor_path, device=device, dtype=dtype,
                   batch_size=batch_size)
        dev = torch_device(self.name, device)
        model = load_clip_model(self.name, path, dtype=torch_dtype(self.name, dtype), device=dev)
        processor = load_clip_processor(self.name, processor_path or path,
                                        option="processor_path" if processor_path else "path")
        head = head_from_state_dict(load_state_dict(self.name, Path(head_path)))
        self._setup(model, processor, head, dev, batch_size)

    @classmethod
    def from_model(cls, model: Any, processor: Any, head: torch.nn.Module, *, device: str = "cpu",
                   batch_size: int = 16) -> "Aesthetic":
        """An Aesthetic scorer around an already-loaded CLIPModel, processor and head (benchmarks, notebooks)."""
        scorer = cls.__new__(cls)
        scorer._setup(model.eval().requires_grad_(False), processor, head.eval(), torch.device(device), batch_size)
        return scorer

    def _setup(self, model: Any, processor: Any, head: torch.nn.Module, device: torch.device, batch_size: int) -> None:
        self.clip = ClipEncoder(model, processor, device, batch_size)
        self.head = head
        embed = model.config.projection_dim
        if head[0].in_features != embed:
            raise RewardLoadError(f"{self.name}: the head takes {head[0].in_features}-d embeddings but the CLIP "
                                  f"model gives {embed}-d (ViT-L/14 heads need openai/clip-vit-large-patch14)")

    @torch.inference_mode()
    def score(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> ScoreResult:
        return ScoreResult(scores=self.head(self.clip.images(images)).squeeze(-1).numpy().astype(np.float32))
