"""The model families and how a model is found and loaded: a local diffusers folder or a hub id, one adapter per family.

Everything that needs the configured model goes through `locate_configured` / `load_configured`: they build the
offline tiny model first when `model.build_tiny` asks for it, so preflight, driver, rollout workers and learner ranks
find the same folder in the same way.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from cluster.config import MODEL_FAMILIES, ModelConfig
from cluster.errors import described
from rollout.models import schedules
from rollout.models.contract import FlowModel
from rollout.models.flux import FluxModel
from rollout.models.flux2 import Flux2Model
from rollout.models.qwen_image import QwenImageModel
from rollout.models.random_init import load_random_component, prompt_tokens, text_widths, with_random_text
from rollout.models.sd3 import SD3Model
from rollout.models.z_image import ZImageModel

# The adapter of each family of cluster.config.MODEL_FAMILIES, in that order.
ADAPTERS: dict[str, type[FlowModel]] = dict(zip(MODEL_FAMILIES, (FluxModel, SD3Model, Flux2Model, QwenImageModel,
                                                                 ZImageModel), strict=True))
PARTS: tuple[str, ...] = ("text", "vae", "transformer")


class ModelLoadError(RuntimeError):
    """A model folder or hub id could not be loaded (missing, not cached with HF_HUB_OFFLINE=1, or unreachable)."""


def adapter(family: str) -> type[FlowModel]:
    """The adapter class of a model family."""
    if family not in ADAPTERS:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(ADAPTERS)}")
    return ADAPTERS[family]


# Files whose presence shows a component folder is usable (transformers 5 silently builds an empty tokenizer otherwise).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model")


def _component_problem(folder: Path, cls: type) -> str | None:
    """Why `folder` cannot hold a `cls` component, or None if it looks complete."""
    if not folder.is_dir():
        return "missing"
    if issubclass(cls, torch.nn.Module):
        return None if (folder / "config.json").is_file() else "has no config.json"
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    return f"has no tokenizer file ({' / '.join(_TOKENIZER_FILES)})"


def looks_like_hub_id(path: str) -> bool:
    """Whether `path` could name a hub model ('name' or 'org/name'), rather than only a local folder."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def hub_patterns(family: str, parts: Collection[str] = PARTS) -> list[str]:
    """The files of a hub model of `family` that loading `parts` of it reads: what is downloaded (and weighed)."""
    subfolders = [sub for sub, (part, _) in adapter(family).components.items() if part in parts]
    return ["model_index.json", "scheduler/*", *(f"{sub}/*" for sub in subfolders)]


def _resolve_hub_id(repo_id: str, patterns: list[str]) -> Path:
    """The local snapshot folder of a hub model (only the files matching `patterns`), from the cache or downloaded
    (unless HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # any failure to fetch becomes one clear message; the cause stays chained
        if constants.is_offline_mode():
            raise ModelLoadError(
                f"model.path {repo_id!r} is neither a local folder nor in the local Hugging Face cache, and "
                f"HF_HUB_OFFLINE=1 is set: unset HF_HUB_OFFLINE to download it, or point model.path at a local "
                f"diffusers folder"
            ) from err
        raise ModelLoadError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({described(err)}); check the id, your "
            f"access to it (a gated model needs `hf auth login`) and the network, or point model.path at a local "
            f"diffusers folder"
        ) from err


def _load_component(cls: type, folder: Path, subfolder: str, dtype: torch.dtype) -> Any:
    """`from_pretrained` of one pipeline component from a local folder; weights in `dtype`, tokenizers as they are."""
    kwargs: dict[str, Any] = dict(subfolder=subfolder, local_files_only=True)
    if issubclass(cls, torch.nn.Module):
        # diffusers models take torch_dtype, transformers 5 models take dtype
        kwargs["torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"] = dtype
    return cls.from_pretrained(str(folder), **kwargs)


def locate_model(
    path: str, family: str, *, parts: Collection[str] = PARTS, random_init: bool = False,
) -> tuple[Path, dict[str, type]]:
    """The local folder holding the model's `parts` (resolving a hub id through the cache) and the component classes
    to load from it; ModelLoadError, naming what is missing, before anything is loaded. With `random_init` only the
    configs are needed, and a folder with none of the text components leaves them out (random prompt embeddings)."""
    model_class = adapter(family)
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {sorted(parts)}")
    wanted = {sub: cls for sub, (part, cls) in model_class.components.items() if part in parts}

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ModelLoadError(f"model.path {str(path)!r} is a file; expected a diffusers folder (model_index.json, "
                             f"transformer/, vae/, ...) or a hub id")
    if not folder.is_dir():
        if not looks_like_hub_id(str(path)):
            raise ModelLoadError(
                f"model.path {str(path)!r}: no such folder (and not a hub id like 'org/name'); point model.path at "
                f"a local diffusers folder, or give a hub id"
            )
        folder = _resolve_hub_id(str(path), hub_patterns(family, parts))
    problems = {sub: why for sub, cls in wanted.items() if (why := _component_problem(folder / sub, cls))}
    text = [sub for sub, (part, _) in model_class.components.items() if part == "text" and sub in wanted]
    if random_init and text and all(problems.get(sub) == "missing" for sub in text):
        wanted = {sub: cls for sub, cls in wanted.items() if sub not in text}
        problems = {sub: why for sub, why in problems.items() if sub not in text}
    if problems:
        listed = "; ".join(f"subfolder {sub!r} {why}" for sub, why in problems.items())
        raise ModelLoadError(
            f"model.path {str(path)!r}: the {family} model there is incomplete: {listed} "
            f"(parts {sorted(parts)} need {', '.join(wanted)}); is model.family right?"
        )
    return folder, wanted


def without_cudnn_attention() -> None:
    """Attention through flash / memory-efficient SDPA kernels, not cuDNN's, in this process: on an H200 with torch
    2.11, cuDNN's attention backward returned NaN and then failed (illegal memory access) in FLUX.1's LoRA update
    (bench/gpu_check.py). Rollout and learner both load their models here, so both run the same kernels and an
    unchanged policy recomputes its log-probs exactly."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def load_flow_model(
    path: str,
    family: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    parts: Collection[str] = PARTS,
    max_sequence_length: int | None = None,
    random_seed: int | None = None,
) -> FlowModel:
    """Load a model of `family` from a local diffusers folder or a hub id; `parts` picks what to load.

    A path that is not an existing folder is taken as a hub id and read from the local Hugging Face cache, or
    downloaded there (only the needed subfolders) unless HF_HUB_OFFLINE=1. The learner loads only ("transformer",).
    With `random_seed`, the modules are built from their configs with random weights on `device`
    (rollout/models/random_init.py), and text encoders without configs become random prompt embeddings.
    """
    model_class = adapter(family)
    folder, wanted = locate_model(path, family, parts=parts, random_init=random_seed is not None)

    modules: dict[str, Any] = {}
    for sub, cls in wanted.items():
        try:
            if random_seed is not None and issubclass(cls, torch.nn.Module):
                module = load_random_component(cls, folder, sub, dtype=dtype, device=device, seed=random_seed)
            else:
                module = _load_component(cls, folder, sub, dtype)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load {sub!r} of the {family} model at {path}: {err}") from err
        if isinstance(module, torch.nn.Module):
            module.to(device).eval()
            if sub != "transformer":  # frozen: only the transformer is ever trained
                module.requires_grad_(False)
        modules[sub] = module
    if "text" in parts and not any(model_class.components[sub][0] == "text" for sub in wanted):
        transformer_config = model_class.components["transformer"][1].load_config(str(folder), subfolder="transformer")
        tokens = prompt_tokens(family, max_sequence_length or model_class.default_max_sequence_length)
        model_class = with_random_text(model_class, tokens, text_widths(family, transformer_config))
    try:
        scheduler_config = schedules.read_config(folder, family)
    except ValueError as err:
        raise ModelLoadError(f"the {family} model at {path}: {err}") from err
    if torch.device(device).type == "cuda":
        without_cudnn_attention()
    return model_class(modules, dtype=dtype, device=device, max_sequence_length=max_sequence_length,
                       scheduler_config=scheduler_config)


def locate_configured(m: ModelConfig, parts: Collection[str] = PARTS) -> tuple[Path, dict[str, type]]:
    """`locate_model` for the job's model section; with `model.build_tiny` the tiny model is built at `model.path`
    first when that folder is missing or empty (on whichever node asks), and refused when it holds another one."""
    if m.build_tiny:
        from rollout.models.tiny import ensure_tiny

        try:
            ensure_tiny(m.family, Path(m.path), seed=m.tiny_seed)
        except OSError as e:
            raise ModelLoadError(f"model.path {m.path!r}: cannot build the tiny model there ({e}); give a folder "
                                 f"that can be created") from None
    return locate_model(m.path, m.family, parts=parts, random_init=m.init == "random")


def load_configured(m: ModelConfig, *, dtype: torch.dtype, device: str,
                    parts: Collection[str] = PARTS) -> FlowModel:
    """The job's model (`parts` of it) in `dtype` on `device`, found as `locate_configured` finds it."""
    folder, _ = locate_configured(m, parts)
    return load_flow_model(str(folder), m.family, dtype=dtype, device=device, parts=parts,
                           max_sequence_length=m.max_sequence_length,
                           random_seed=m.init_seed if m.init == "random" else None)
