"""What the CLIP-based scorers (PickScore, HPSv2, aesthetic) share: finding weights, loading, normalised features.

Weights are read from a local folder/file, or given as a hub id from the local Hugging Face cache, downloaded there
first when missing (unless HF_HUB_OFFLINE=1). Images go through the CLIP processor's own resize / centre crop /
normalise (from uint8 (N, H, W, 3) arrays, PIL backend); prompts through its tokenizer, padded per batch and cut at the
text model's context length (77 for real CLIP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cluster.errors import described

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RewardLoadError(RuntimeError):
    """A scorer's weights could not be found or loaded; the message names the option to change."""


def torch_dtype(scorer: str, name: str) -> torch.dtype:
    """The torch dtype named by a scorer's `dtype` option."""
    if name not in DTYPES:
        raise ValueError(f"{scorer}: dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def torch_device(scorer: str, name: str) -> torch.device:
    """The device named by a scorer's `device` option ("cpu", "cuda", "cuda:1"); CUDA must be present."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RewardLoadError(f"{scorer}: device {name!r} asked for, but this process sees no CUDA device "
                              f"(give the reward actors GPUs with rewards.num_gpus_per_actor, or use device: cpu)")
    return device


def _not_found(scorer: str, option: str, value: str, err: Exception) -> RewardLoadError:
    """One clear error for weights that are neither local nor cached, and could not be downloaded."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return RewardLoadError(
            f"{scorer}: {option} {value!r} is neither a local path nor in the local Hugging Face cache, and "
            f"HF_HUB_OFFLINE=1 is set: unset HF_HUB_OFFLINE to download it, or point {option} at a local copy")
    return RewardLoadError(f"{scorer}: could not download {option} {value!r} ({described(err)}); check the id, "
                           f"your access to it and the network, or point {option} at a local copy")


# Files whose presence shows that a folder holds what transformers loads: a model, or a processor's tokenizer.
_NEEDS = {"model": ("config.json",), "processor": ("tokenizer.json", "vocab.json")}


def find_pretrained(scorer: str, path: str, *, option: str = "path", kind: str = "model") -> str:
    """Where a transformers model or processor is, without loading its weights: a local folder holding its files, or
    a hub id in the local Hugging Face cache (its small JSON and text files downloaded when missing); RewardLoadError
    otherwise."""
    folder = Path(path)
    if folder.is_dir():
        if not any((folder / name).is_file() for name in _NEEDS[kind]):
            raise RewardLoadError(f"{scorer}: {option} {path!r} is a folder without {' or '.join(_NEEDS[kind])}")
        return str(folder)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.txt"])
    except Exception as err:  # any failure to find or fetch becomes one clear message; the cause stays chained
        raise _not_found(scorer, option, path, err) from err


def load_clip_model(scorer: str, path: str, *, dtype: torch.dtype, device: torch.device,
                    option: str = "path", random_init: bool = False) -> Any:
    """A transformers CLIPModel from a local folder or a hub id, in eval mode, frozen, on `device`; `random_init`:
    built from the config there with random weights (seed 0), drawn on `device` in `dtype` (benchmarks)."""
    from transformers import CLIPConfig, CLIPModel

    try:
        if random_init:
            config = CLIPConfig.from_pretrained(path)
            torch.manual_seed(0)
            with torch.device(device):
                model = CLIPModel._from_config(config, dtype=dtype)
        else:
            model = CLIPModel.from_pretrained(path, dtype=dtype)
    except OSError as err:
        if Path(path).is_dir():
            raise RewardLoadError(f"{scorer}: could not load the CLIP model in {path} ({err})") from err
        raise _not_found(scorer, option, path, err) from err
    return model.to(device).eval().requires_grad_(False)


def load_clip_processor(scorer: str, path: str, *, option: str = "processor_path") -> Any:
    """A CLIPProcessor (image processor + tokenizer) from a local folder or a hub id."""
    from transformers import CLIPProcessor

    try:
        processor = CLIPProcessor.from_pretrained(path)
    except OSError as err:
        if Path(path).is_dir():
            raise RewardLoadError(f"{scorer}: could not load a CLIP processor from {path} ({err})") from err
        raise _not_found(scorer, option, path, err) from err
    if len(processor.tokenizer) < 3:  # transformers builds an empty tokenizer when the files are missing
        raise RewardLoadError(f"{scorer}: {option} {path!r} has no tokenizer files (vocab.json / tokenizer.json)")
    return processor


def resolve_file(scorer: str, path: str, filename: str | None, *, option: str = "path") -> Path:
    """A weights file: `path` itself when it is a file, else `filename` in the hub repo `path` (cache or download)."""
    if Path(path).is_file():
        return Path(path)
    if Path(path).is_dir():
        if filename and (Path(path) / filename).is_file():
            return Path(path) / filename
        raise RewardLoadError(f"{scorer}: {option} {path!r} is a folder without {filename!r}; "
                              f"point {option} at the checkpoint file")
    if not filename:
        raise RewardLoadError(f"{scorer}: {option} {path!r} is not a file; give a local checkpoint file")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(path, filename))
    except Exception as err:  # any failure to find or fetch becomes one clear message; the cause stays chained
        raise _not_found(scorer, option, f"{path}/{filename}", err) from err


def load_state_dict(scorer: str, file: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or of a torch checkpoint (its `state_dict` entry when it has one)."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RewardLoadError(f"{scorer}: could not read the checkpoint {file} ({type(err).__name__}: {err})") from err
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise RewardLoadError(f"{scorer}: {file} holds a {type(data).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in data.items() if isinstance(v, torch.Tensor)}


class ClipEncoder:
    """L2-normalised CLIP image and text embeddings, computed in batches without gradients."""

    def __init__(self, model: Any, processor: Any, device: torch.device, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.processor, self.device, self.batch_size = model, processor, device, batch_size
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @torch.inference_mode()
    def images(self, images: np.ndarray) -> torch.Tensor:
        """Normalised image embeddings (N, D), float32, on CPU."""
        dtype = next(self.model.parameters()).dtype
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(images[i:i + self.batch_size]), return_tensors="pt")["pixel_values"]
            feats = self.model.get_image_features(pixel_values=pixels.to(self.device, dtype)).pooler_output
            out.append(feats.float().cpu())
        return _normalise(torch.cat(out))

    @torch.inference_mode()
    def texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings (N, D), float32, on CPU; each distinct prompt is encoded once."""
        unique = list(dict.fromkeys(prompts))
        out = []
        for i in range(0, len(unique), self.batch_size):
            tokens = self.processor(text=unique[i:i + self.batch_size], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            feats = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                 attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
            out.append(feats.float().cpu())
        feats = _normalise(torch.cat(out))
        index = {p: i for i, p in enumerate(unique)}
        return feats[[index[p] for p in prompts]]


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)
