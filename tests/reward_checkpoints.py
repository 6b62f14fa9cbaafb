"""Tiny random reward-model checkpoints built offline, in the layouts the scorers load (for tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from rollout.models.tiny import clip_tokenizer


def tiny_clip(seed: int, activation: str = "gelu") -> tuple[CLIPModel, CLIPProcessor]:
    """A tiny random CLIP (2 layers, width 32, 32 px images in 8 px patches) and its offline processor."""
    tokenizer = clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act=activation,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, hidden_act=activation)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.1)  # not the init value, so a loader that drops it is caught
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny CLIP folder (model + processor) as `save_pretrained` writes it."""
    model, processor = tiny_clip(seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_mask2former(folder: Path) -> Path:
    """A tiny random Mask2Former over the COCO classes (GenEval's names) with its image processor."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessorPil,
        SwinConfig,
    )

    from rewards.detectors import TF_COCO_LABELS

    names = sorted(set(TF_COCO_LABELS.values()) - {"computer mouse"}) + ["mouse"]  # "mouse" maps to GenEval's name
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, hidden_dim=32, feature_size=32, mask_feature_size=32,
                               encoder_feedforward_dim=64, dim_feedforward=64, num_queries=8, encoder_layers=1,
                               decoder_layers=2, num_attention_heads=2, id2label=dict(enumerate(names)),
                               label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(folder)
    Mask2FormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32
                                 ).save_pretrained(folder)
    return folder
