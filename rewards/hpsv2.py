"""HPSv2 / HPSv2.1: cosine of the normalised image and text features of the HPS-tuned open_clip ViT-H-14.

Loading converts the HPS checkpoint (the open_clip model's `state_dict`, .pt or .safetensors) into a transformers
CLIPModel, so no base CLIP weights are fetched and open_clip is not needed. The architecture is read from the tensor
shapes (widths, depths, patch and image size, context length, vocabulary); only the head counts, which shapes do not
show, are options (ViT-H-14: 16 and 16). Key mapping, per transformer block `resblocks.i` of the vision tower
(`visual.transformer.`) and the text tower (`transformer.`):

    ln_1 / ln_2                      -> layer_norm1 / layer_norm2
    attn.in_proj_weight (3D, D)      -> self_attn.q_proj / k_proj / v_proj .weight (rows split in thirds, that order)
    attn.in_proj_bias (3D,)          -> self_attn.q_proj / k_proj / v_proj .bias
    attn.out_proj                    -> self_attn.out_proj
    mlp.c_fc / mlp.c_proj            -> mlp.fc1 / mlp.fc2

and outside the blocks: visual.conv1 -> vision_model.embeddings.patch_embedding, visual.class_embedding ->
embeddings.class_embedding, visual.positional_embedding -> embeddings.position_embedding.weight, visual.ln_pre /
ln_post -> vision_model.pre_layrnorm / post_layernorm, visual.proj (D, P) -> visual_projection.weight transposed;
token_embedding / positional_embedding -> text_model.embeddings.token_embedding / position_embedding.weight, ln_final
-> text_model.final_layer_norm, text_projection (D, P) -> text_projection.weight transposed, logit_scale as is.
open_clip's ViT-H-14 uses plain (erf) GELU, not OpenAI's quick_gelu, and LayerNorm eps 1e-5. open_clip pools the text
at the argmax token id, the end-of-text token; transformers pools at the first `eos_token_id`, set from the tokenizer.
The score is the plain cosine (≈0.2–0.3 for real images) as in docs/math.md "Reward definitions", not the ×100 of the
HPS paper's tables.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from cluster.errors import first_line
from rewards.base import Scorer, ScoreResult
from rewards.clip_common import (
    ClipEncoder,
    RewardLoadError,
    find_pretrained,
    load_clip_processor,
    load_state_dict,
    resolve_file,
    torch_device,
    torch_dtype,
)

HPS_REPO = "xswu/HPSv2"
HPS_V21_FILE = "HPS_v2.1_compressed.pt"  # HPSv2.0: HPS_v2_compressed.pt
CLIP_H_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_OUTSIDE = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_TOWERS = {"visual.transformer.resblocks.": "vision_model.encoder.layers.",
           "transformer.resblocks.": "text_model.encoder.layers."}
_IGNORED = {"attn_mask", "visual.attn_mask"}  # buffers some open_clip versions save


def open_clip_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (non-custom text tower) renamed and reshaped to transformers CLIPModel keys."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in _IGNORED:
            continue
        if key in _OUTSIDE:
            out[_OUTSIDE[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif (match := re.fullmatch(r"(visual\.transformer\.resblocks\.|transformer\.resblocks\.)(\d+)\.(.+)", key)):
            tower, layer, rest = match.groups()
            prefix = f"{_TOWERS[tower]}{layer}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
            elif (module := rest.rsplit(".", 1)[0]) in _BLOCK:
                out[prefix + _BLOCK[module] + rest[len(module):]] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise RewardLoadError(f"hpsv2: not an open_clip CLIP state dict (non-custom text tower); unknown keys: "
                              f"{', '.join(sorted(unknown)[:8])}{' ...' if len(unknown) > 8 else ''}")
    return out


def _depth(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(layers) + 1 if layers else 0


def clip_config_from_open_clip(state_dict: Mapping[str, torch.Tensor], *, vision_heads: int, text_heads: int,
                               activation: str, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> Any:
    """The transformers CLIPConfig of an open_clip state dict, read from its tensor shapes."""
    from transformers import CLIPConfig

    need = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
            "positional_embedding", "text_projection", "visual.transformer.resblocks.0.mlp.c_fc.weight",
            "transformer.resblocks.0.mlp.c_fc.weight")
    missing = [k for k in need if k not in state_dict]
    if missing:
        raise RewardLoadError(f"hpsv2: not an open_clip CLIP state dict: missing {', '.join(missing)}")
    conv = state_dict["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(state_dict["visual.positional_embedding"].shape[0] - 1)
    vocab, text_width = state_dict["token_embedding.weight"].shape
    projection = state_dict["visual.proj"].shape[1]
    if state_dict["text_projection"].shape[1] != projection:
        raise RewardLoadError(f"hpsv2: image and text projections differ ({projection} vs "
                              f"{state_dict['text_projection'].shape[1]})")
    common = dict(hidden_act=activation, layer_norm_eps=1e-5, projection_dim=projection)
    vision = dict(common, hidden_size=width, num_hidden_layers=_depth(state_dict, "visual.transformer.resblocks."),
                  num_attention_heads=vision_heads, patch_size=patch, image_size=grid * patch,
                  intermediate_size=state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    text = dict(common, hidden_size=text_width, num_hidden_layers=_depth(state_dict, "transformer.resblocks."),
                num_attention_heads=text_heads, vocab_size=vocab,
                max_position_embeddings=state_dict["positional_embedding"].shape[0],
                intermediate_size=state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    for tower, cfg in (("vision", vision), ("text", text)):
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise RewardLoadError(f"hpsv2: {tower}_heads = {cfg['num_attention_heads']} does not divide the "
                                  f"{tower} width {cfg['hidden_size']}")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


def clip_from_open_clip(state_dict: Mapping[str, torch.Tensor], config: Any, dtype: torch.dtype) -> Any:
    """A transformers CLIPModel holding the open_clip weights (built without initialising, then loaded strictly)."""
    from transformers import CLIPModel
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = CLIPModel._from_config(config, dtype=dtype)
    converted = {k: v.to(dtype) for k, v in open_clip_to_transformers(state_dict).items()}
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as err:
        raise RewardLoadError(f"hpsv2: the converted checkpoint does not fit the architecture read from it "
                              f"({first_line(err)} ...)") from err
    return model


class HPSv2(Scorer):
    """Human Preference Score v2(.1) of an image for its prompt."""

    name = "hpsv2"
    path_options = {"path": "file", "processor_path": "processor"}

    @classmethod
    def check(cls, path: str = HPS_REPO, filename: str | None = HPS_V21_FILE, processor_path: str = CLIP_H_PROCESSOR,
              device: str = "cpu", dtype: str = "float32", vision_heads: int = 16, text_heads: int = 16,
              activation: str = "gelu", batch_size: int = 16) -> None:
        if activation not in ("gelu", "quick_gelu"):
            raise ValueError(f"{cls.name}: activation must be 'gelu' (open_clip ViT-H-14) or 'quick_gelu' "
                             f"(OpenAI CLIP), got {activation!r}")
        torch_dtype(cls.name, dtype)
        find_pretrained(cls.name, processor_path, kind="processor", option="processor_path")
        resolve_file(cls.name, path, filename)

    def __init__(self, path: str = HPS_REPO, filename: str | None = HPS_V21_FILE,
                 processor_path: str = CLIP_H_PROCESSOR, device: str = "cpu", dtype: str = "float32",
                 vision_heads: int = 16, text_heads: int = 16, activation: str = "gelu", batch_size: int = 16):
        self.check(path=path, filename=filename, processor_path=processor_path, device=device, dtype=dtype,
                   vision_heads=vision_heads, text_heads=text_heads, activation=activation, batch_size=batch_size)
        dev = torch_device(self.name, device)
        processor = load_clip_processor(self.name, processor_path)
        file = resolve_file(self.name, path, filename)
        state_dict = load_state_dict(self.name, file)
        tok = processor.tokenizer
        config = clip_config_from_open_clip(
            state_dict, vision_heads=vision_heads, text_heads=text_heads, activation=activation,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        model = clip_from_open_clip(state_dict, config, torch_dtype(self.name, dtype))
        del state_dict
        self.clip = ClipEncoder(model.to(dev).eval().requires_grad_(False), processor, dev, batch_size)

    @classmethod
    def from_model(cls, model: Any, processor: Any, *, device: str = "cpu", batch_size: int = 16) -> "HPSv2":
        """An HPSv2 around an already-converted CLIPModel and its CLIPProcessor (benchmarks, notebooks)."""
        scorer = cls.__new__(cls)
        scorer.clip = ClipEncoder(model.eval().requires_grad_(False), processor, torch.device(device), batch_size)
        return scorer

    def score(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> ScoreResult:
        cosine = (self.clip.images(images) * self.clip.texts(prompts)).sum(dim=-1)
        return ScoreResult(scores=cosine.numpy().astype(np.float32))
