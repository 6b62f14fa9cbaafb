"""PickScore, HPSv2 and the aesthetic head load through their real loading code and score as a hand computation does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPModel, CLIPProcessor

import rewards
from rewards.clip_common import RewardLoadError
from rewards.hpsv2 import clip_config_from_open_clip, open_clip_to_transformers
from tests.reward_checkpoints import save_tiny_clip, tiny_clip

PROMPTS = ["a red cube on a table", "a cat", "a red cube on a table", "a cat"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP folder (model + processor) as `save_pretrained` writes it."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (4, 40, 56, 3), dtype=np.uint8)


def hand_embeddings(model: CLIPModel, processor: CLIPProcessor, images: np.ndarray, prompts: list[str]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image and text embeddings straight from the model, one batch each."""
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels).pooler_output
        tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        text = model.get_text_features(**tokens).pooler_output
    return image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


def test_pickscore_is_scaled_logit_times_cosine(clip_dir, images):
    scorer = rewards.build("pickscore", path=str(clip_dir), processor_path=None, batch_size=3)
    result = scorer(images, PROMPTS)

    model, processor = tiny_clip(seed=0)
    image, text = hand_embeddings(model, processor, images, PROMPTS)
    raw = (np.exp(3.1) * (image * text).sum(-1)).numpy()
    np.testing.assert_allclose(result.metrics["raw"], raw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.scores, raw / 26, rtol=1e-5, atol=1e-6)
    assert result.scores.dtype == np.float32 and result.scores.shape == (4,)

    rescaled = rewards.build("pickscore", path=str(clip_dir), processor_path=str(clip_dir), scale=1.0)
    np.testing.assert_allclose(rescaled(images, PROMPTS).scores, raw, rtol=1e-5, atol=1e-6)


def test_missing_hub_weights_name_the_option_and_the_offline_switch(clip_dir):
    # the test session runs with HF_HUB_OFFLINE=1 (conftest.py)
    with pytest.raises(RewardLoadError, match="path 'nobody/no-such-clip'.*HF_HUB_OFFLINE=1 is set"):
        rewards.build("pickscore", path="nobody/no-such-clip", processor_path=str(clip_dir))
    with pytest.raises(RewardLoadError, match="processor_path 'nobody/no-such-processor'.*HF_HUB_OFFLINE=1"):
        rewards.build("pickscore", path=str(clip_dir), processor_path="nobody/no-such-processor")
    with pytest.raises(RewardLoadError, match="nobody/no-such-hps/HPS_v2.1_compressed.pt.*HF_HUB_OFFLINE=1"):
        rewards.build("hpsv2", path="nobody/no-such-hps", processor_path=str(clip_dir))


# ---------------------------------------------------------------------------------------------------------------
# HPSv2: the open_clip layout, written out here by hand from open_clip's naming, independent of the scorer's mapping.


def open_clip_layout(model: CLIPModel) -> dict[str, torch.Tensor]:
    """The tiny transformers CLIP's weights under open_clip's CLIP key names and shapes."""
    hf = model.state_dict()
    oc = {
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": hf["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": hf["vision_model.post_layernorm.bias"],
        "visual.proj": hf["visual_projection.weight"].T,
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].T,
        "logit_scale": hf["logit_scale"],
    }
    for oc_tower, hf_tower, depth in (("visual.transformer", "vision_model", 2), ("transformer", "text_model", 2)):
        for i in range(depth):
            o, h = f"{oc_tower}.resblocks.{i}.", f"{hf_tower}.encoder.layers.{i}."
            for kind in ("weight", "bias"):
                oc[f"{o}attn.in_proj_{kind}"] = torch.cat([hf[f"{h}self_attn.{p}_proj.{kind}"] for p in "qkv"])
                oc[f"{o}attn.out_proj.{kind}"] = hf[f"{h}self_attn.out_proj.{kind}"]
                oc[f"{o}ln_1.{kind}"] = hf[f"{h}layer_norm1.{kind}"]
                oc[f"{o}ln_2.{kind}"] = hf[f"{h}layer_norm2.{kind}"]
                oc[f"{o}mlp.c_fc.{kind}"] = hf[f"{h}mlp.fc1.{kind}"]
                oc[f"{o}mlp.c_proj.{kind}"] = hf[f"{h}mlp.fc2.{kind}"]
    return {k: v.clone().contiguous() for k, v in oc.items()}


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_hpsv2_converts_the_open_clip_checkpoint_and_scores_the_cosine(clip_dir, images, tmp_path, fmt):
    model, processor = tiny_clip(seed=1)
    layout = open_clip_layout(model)
    file = tmp_path / f"HPS_tiny.{fmt}"
    if fmt == "pt":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in layout.items()}}, file)
    else:
        save_file(layout, str(file))
    scorer = rewards.build("hpsv2", path=str(file), filename=None, processor_path=str(clip_dir),
                           vision_heads=4, text_heads=4, batch_size=3)

    image, text = hand_embeddings(model, processor, images, PROMPTS)
    np.testing.assert_allclose(scorer.clip.images(images).numpy(), image.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scorer.clip.texts(PROMPTS).numpy(), text.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scorer(images, PROMPTS).scores, (image * text).sum(-1).numpy(), rtol=1e-5, atol=1e-6)
    converted = scorer.clip.model
    assert converted.config.vision_config.hidden_act == "gelu" and float(converted.logit_scale) == pytest.approx(3.1)


def test_hpsv2_conversion_fits_vit_h14_at_full_size():
    """On meta tensors: the open_clip ViT-H-14 layout maps onto exactly the keys and shapes of its CLIPModel."""
    def block(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}attn.in_proj_weight": (3 * width, width), f"{prefix}attn.in_proj_bias": (3 * width,),
                f"{prefix}attn.out_proj.weight": (width, width), f"{prefix}attn.out_proj.bias": (width,),
                f"{prefix}ln_1.weight": (width,), f"{prefix}ln_1.bias": (width,), f"{prefix}ln_2.weight": (width,),
                f"{prefix}ln_2.bias": (width,), f"{prefix}mlp.c_fc.weight": (4 * width, width),
                f"{prefix}mlp.c_fc.bias": (4 * width,), f"{prefix}mlp.c_proj.weight": (width, 4 * width),
                f"{prefix}mlp.c_proj.bias": (width,)}

    shapes = {"visual.conv1.weight": (1280, 3, 14, 14), "visual.class_embedding": (1280,),
              "visual.positional_embedding": (257, 1280), "visual.ln_pre.weight": (1280,),
              "visual.ln_pre.bias": (1280,),
              "visual.ln_post.weight": (1280,), "visual.ln_post.bias": (1280,), "visual.proj": (1280, 1024),
              "token_embedding.weight": (49408, 1024), "positional_embedding": (77, 1024), "ln_final.weight": (1024,),
              "ln_final.bias": (1024,), "text_projection": (1024, 1024), "logit_scale": ()}
    for i in range(32):
        shapes.update(block(f"visual.transformer.resblocks.{i}.", 1280))
    for i in range(24):
        shapes.update(block(f"transformer.resblocks.{i}.", 1024))
    layout = {k: torch.empty(s, device="meta") for k, s in shapes.items()}

    config = clip_config_from_open_clip(layout, vision_heads=16, text_heads=16, activation="gelu",
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, v.image_size) == (1280, 32, 14, 224)
    assert v.intermediate_size == 5120 and t.intermediate_size == 4096
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size, t.max_position_embeddings) == (1024, 24, 49408, 77)
    assert config.projection_dim == 1024 and v.hidden_act == t.hidden_act == "gelu"
    with torch.device("meta"):
        reference = CLIPModel(config).state_dict()
    converted = open_clip_to_transformers(layout)
    assert set(converted) == set(reference)
    assert {k: tuple(x.shape) for k, x in converted.items()} == {k: tuple(x.shape) for k, x in reference.items()}


def test_hpsv2_refuses_a_foreign_state_dict(clip_dir, tmp_path):
    file = tmp_path / "other.pt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2, 2)}}, file)
    with pytest.raises(RewardLoadError, match="not an open_clip CLIP state dict"):
        rewards.build("hpsv2", path=str(file), processor_path=str(clip_dir))


# ---------------------------------------------------------------------------------------------------------------
# Aesthetic: CLIP image embedding, normalised, through the improved-aesthetic-predictor head (or a linear head).


class _ImprovedAestheticHead(torch.nn.Module):
    """The improved-aesthetic-predictor MLP layout (dropouts between the first four linears, no activation)."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 8), torch.nn.Dropout(0.2),
            torch.nn.Linear(8, 4), torch.nn.Dropout(0.1), torch.nn.Linear(4, 2), torch.nn.Linear(2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.mark.parametrize("head_kind", ["mlp", "linear"])
def test_aesthetic_is_the_head_on_the_normalised_image_embedding(clip_dir, images, tmp_path, head_kind):
    torch.manual_seed(5)
    head = _ImprovedAestheticHead(16).eval() if head_kind == "mlp" else torch.nn.Linear(16, 1)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    scorer = rewards.build("aesthetic", head_path=str(tmp_path / "head.pth"), path=str(clip_dir))

    model, processor = tiny_clip(seed=0)
    image, _ = hand_embeddings(model, processor, images, PROMPTS)
    with torch.no_grad():
        expected = head(image).squeeze(-1).numpy()
    np.testing.assert_allclose(scorer(images, PROMPTS).scores, expected, rtol=1e-5, atol=1e-6)


def test_aesthetic_without_a_head_says_where_to_get_one():
    with pytest.raises(RewardLoadError, match="head_path None.*improved-aesthetic-predictor"):
        rewards.build("aesthetic")
