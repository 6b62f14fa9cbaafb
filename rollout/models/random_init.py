"""Models with random weights at the size their configs give (`model.init: random`): a real-size job, or a benchmark,
with nothing to download.

Each component is built from its config.json directly on the device and in the model's dtype (no CPU copy, no cast),
from a seed of its own: every process that builds a component from the same folder, seed and device type gets the
same weights, so a rollout worker and a learner rank that each build the transformer hold the same policy, and the
learner's recompute of a recorded log-prob is exact. Tokenizers load from their files as usual.

A folder without the text encoders' configs (e.g. the published transformer and VAE configs alone) gets random
prompt embeddings of the shapes those encoders give instead (`with_random_text`): a fixed tensor per prompt text.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rollout.models.contract import FlowModel, PromptEmbeds

# Families whose prompts (the negative one too) are padded to one length; the others keep a prompt's own length.
PADDED = ("flux", "sd3", "flux2")
UNPADDED_TOKENS = 64  # the length of a random prompt embedding for Qwen-Image and Z-Image (a typical prompt's)
CLIP_TOKENS = 77  # SD3's CLIP part of the joint sequence


def prompt_tokens(family: str, max_sequence_length: int) -> int:
    """Tokens of one prompt's embedding, as the family's text encoders give them."""
    if family == "sd3":
        return CLIP_TOKENS + max_sequence_length
    if family in PADDED:
        return max_sequence_length
    return min(UNPADDED_TOKENS, max_sequence_length)


def text_widths(family: str, transformer_config: Mapping[str, Any]) -> tuple[int, int]:
    """(prompt embedding width, pooled width) the family's transformer takes."""
    if family in ("flux", "sd3"):
        return transformer_config["joint_attention_dim"], transformer_config["pooled_projection_dim"]
    if family == "z_image":
        return transformer_config["cap_feat_dim"], 0
    return transformer_config["joint_attention_dim"], 0


def with_random_text(base: type[FlowModel], tokens: int, widths: tuple[int, int]) -> type[FlowModel]:
    """`base` with its text encoders replaced by random embeddings: (1, tokens, widths[0]) and (1, widths[1]) per
    prompt, drawn from a generator seeded by the prompt's text; an empty (negative) prompt of an unpadded family is
    short, as its encoder would give it."""
    family = base.family

    class RandomText(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.parts = self.parts | {"text"}

        def encode_prompts(self, prompts: Sequence[str] | str) -> PromptEmbeds:
            rows = []
            for prompt in ([prompts] if isinstance(prompts, str) else prompts):
                generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
                short = not prompt.strip() and family not in PADDED
                length = max(4, tokens // 8) if short else tokens
                rows.append(PromptEmbeds(torch.randn(1, length, widths[0], generator=generator),
                                         torch.randn(1, widths[1], generator=generator)).to(self.device, self.dtype))
            return PromptEmbeds.cat(rows)

    RandomText.__name__ = RandomText.__qualname__ = f"RandomText{base.__name__}"
    return RandomText


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_module(cls: type, config: Mapping[str, Any] | Any, *, dtype: torch.dtype, device: torch.device | str,
                  seed: int, name: str) -> torch.nn.Module:
    """A diffusers or transformers module from its config (a dict, or a transformers config object) with random
    weights drawn on `device` in `dtype`, from a seed of its own (`seed` and the component's `name`)."""
    torch.manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
    with torch.device(device), default_dtype(dtype):
        if cls.__module__.startswith("diffusers"):
            module = cls.from_config(dict(config))
        else:
            module = cls._from_config(config, dtype=dtype)
    return module.eval().requires_grad_(False)


def load_random_component(cls: type, folder: Path, subfolder: str, *, dtype: torch.dtype, device: torch.device | str,
                          seed: int) -> torch.nn.Module:
    """`random_module` from the config.json in folder/subfolder."""
    if cls.__module__.startswith("diffusers"):
        config = cls.load_config(str(folder), subfolder=subfolder)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder / subfolder))
    return random_module(cls, config, dtype=dtype, device=device, seed=seed, name=subfolder)
