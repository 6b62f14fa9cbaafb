"""The published transformer and VAE configs (config.json) of the models bench/gpu_check.py builds at real size.
Sources: the Hub config.json files as vendored verbatim in public repositories, cross-checked with diffusers'
conversion scripts; the comment of each entry names its source."""

FLUX1_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

REAL_CONFIGS = {
    # black-forest-labs/FLUX.1-dev transformer/config.json and vae/config.json (diffusers 0.30.0.dev0), as
    # printed by `cat` in xDiT's FLUX docs and vendored verbatim by several loaders. The published transformer
    # config has no axes_dims_rope key; the class default (16, 56, 56) applies.
    "flux": {
        "model": "black-forest-labs/FLUX.1-dev",
        "transformer": {
            "attention_head_dim": 128,
            "guidance_embeds": True,
            "in_channels": 64,
            "joint_attention_dim": 4096,
            "num_attention_heads": 24,
            "num_layers": 19,
            "num_single_layers": 38,
            "patch_size": 1,
            "pooled_projection_dim": 768,
        },
        "vae": FLUX1_VAE,
        "parameters": 11_901_408_320,
    },
    # stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X: dual attention in blocks 0-12),
    # as vendored by tt-forge/taproot/mflux-sd35 loaders. The VAE is the SD3 16-channel VAE (the SD3.5 release
    # notes say it is unchanged from SD3 Medium); its vae/config.json as vendored verbatim (diffusers 0.29.0.dev0).
    # mid_block_add_attention is absent from that file, so the class default (True) applies.
    "sd3": {
        "model": "stabilityai/stable-diffusion-3.5-medium",
        "transformer": {
            "attention_head_dim": 64,
            "caption_projection_dim": 1536,
            "dual_attention_layers": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            "in_channels": 16,
            "joint_attention_dim": 4096,
            "num_attention_heads": 24,
            "num_layers": 24,
            "out_channels": 16,
            "patch_size": 2,
            "pooled_projection_dim": 2048,
            "pos_embed_max_size": 384,
            "qk_norm": "rms_norm",
            "sample_size": 128,
        },
        # the FLUX.1 VAE's layout (mid_block_add_attention left at its default, True) with SD3's own scaling
        "vae": {**FLUX1_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609},
        # The loaded checkpoint's count (the card's "2.5B" also counts the 384x384x1536 pos_embed buffer).
        "parameters": 2_243_171_520,
    },
    # black-forest-labs/FLUX.2-klein-base-4B. Transformer: the klein-4B config.json checked field by field
    # (deny-unknown-fields) by a strict loader of the published files (diffusers 0.37.0.dev0); diffusers'
    # scripts/convert_flux2_to_diffusers.py converts the base and the distilled 4B checkpoints with this one
    # config (base only sets is_distilled=False in model_index.json). VAE: the shared FLUX.2 AutoencoderKLFlux2
    # vae/config.json from the same strict loader; its "force_upcast": true is dropped because
    # AutoencoderKLFlux2.__init__ in diffusers 0.42.1 does not accept it.
    "flux2": {
        "model": "black-forest-labs/FLUX.2-klein-base-4B",
        "transformer": {
            "attention_head_dim": 128,
            "axes_dims_rope": [32, 32, 32, 32],
            "eps": 1e-06,
            "guidance_embeds": False,
            "in_channels": 128,
            "joint_attention_dim": 7680,
            "mlp_ratio": 3.0,
            "num_attention_heads": 24,
            "num_layers": 5,
            "num_single_layers": 20,
            "out_channels": None,
            "patch_size": 1,
            "rope_theta": 2000,
            "timestep_guidance_channels": 256,
        },
        "vae": {
            "act_fn": "silu",
            "batch_norm_eps": 0.0001,
            "batch_norm_momentum": 0.1,
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D",
                                 "DownEncoderBlock2D"],
            "in_channels": 3,
            "latent_channels": 32,
            "layers_per_block": 2,
            "mid_block_add_attention": True,
            "norm_num_groups": 32,
            "out_channels": 3,
            "patch_size": [2, 2],
            "sample_size": 1024,
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "use_post_quant_conv": True,
            "use_quant_conv": True,
        },
        # BFL's "4B": flux-2-klein-base-4b.safetensors holds 3,875,544,576 values.
        "parameters": 3_875_544_576,
    },
    # Qwen/Qwen-Image transformer/config.json and vae/config.json (diffusers 0.34.0.dev0), as vendored verbatim
    # (e.g. musubi-tuner's VAE loader). The published transformer config also carries "pooled_projection_dim": 768,
    # dropped here because QwenImageTransformer2DModel.__init__ in diffusers 0.42.1 does not accept it.
    "qwen_image": {
        "model": "Qwen/Qwen-Image",
        "transformer": {
            "attention_head_dim": 128,
            "axes_dims_rope": [16, 56, 56],
            "guidance_embeds": False,
            "in_channels": 64,
            "joint_attention_dim": 3584,
            "num_attention_heads": 24,
            "num_layers": 60,
            "out_channels": 16,
            "patch_size": 2,
        },
        "vae": {
            "attn_scales": [],
            "base_dim": 96,
            "dim_mult": [1, 2, 4, 4],
            "dropout": 0.0,
            "latents_mean": [
                -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
            ],
            "latents_std": [
                2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916,
            ],
            "num_res_blocks": 2,
            "temperal_downsample": [False, True, True],
            "z_dim": 16,
        },
        # 20.43B: 40.86 GB of bf16 shards.
        "parameters": 20_430_401_088,
    },
    # Tongyi-MAI/Z-Image-Turbo transformer/config.json (diffusers 0.36.0.dev0) and vae/config.json (the FLUX.1
    # VAE, "_name_or_path": "flux-dev"), as fetched from the Hub and recorded verbatim by ports of the model.
    "z_image": {
        "model": "Tongyi-MAI/Z-Image-Turbo",
        "transformer": {
            "all_f_patch_size": [1],
            "all_patch_size": [2],
            "axes_dims": [32, 48, 48],
            "axes_lens": [1536, 512, 512],
            "cap_feat_dim": 2560,
            "dim": 3840,
            "in_channels": 16,
            "n_heads": 30,
            "n_kv_heads": 30,
            "n_layers": 30,
            "n_refiner_layers": 2,
            "norm_eps": 1e-05,
            "qk_norm": True,
            "rope_theta": 256.0,
            "t_scale": 1000.0,
        },
        "vae": FLUX1_VAE,  # the FLUX.1 VAE, as published in its vae/config.json
        # The transformer index's total_size, 24,619,634,944 bytes of fp32, is 6,154,908,736 values.
        "parameters": 6_154_908_736,
    },
}

# PickScore_v1 (yuvalkirstain/PickScore_v1) is OpenCLIP's ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K) fine-tuned:
# the published CLIPConfig's sizes. The byte-level tokenizer written beside it (rollout/models/tiny.py) stands in for
# CLIP's BPE vocabulary, which is not available offline; its ids all lie inside the 49,408-row embedding.
PICKSCORE_CLIP = {
    "projection_dim": 1024,
    "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                    "num_hidden_layers": 24, "max_position_embeddings": 77, "vocab_size": 49408,
                    "hidden_act": "gelu"},
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
                      "num_hidden_layers": 32, "patch_size": 14, "image_size": 224, "hidden_act": "gelu"},
}
TINY_CLIP = {  # the same layout at test size
    "projection_dim": 16,
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu"},
    "vision_config": {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4, "num_hidden_layers": 2,
                      "patch_size": 8, "image_size": 32, "hidden_act": "gelu"},
}


def write_model_folder(family: str, out):
    """A diffusers model folder with the published transformer and VAE configs of `family` and no weights: what
    `model.init: random` builds the real-size model from (its text encoders become random prompt embeddings, its
    scheduler the family's default)."""
    import json
    from pathlib import Path

    out = Path(out)
    for sub in ("transformer", "vae"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        (out / sub / "config.json").write_text(json.dumps(REAL_CONFIGS[family][sub], indent=1))
    return out


def write_clip_folder(sizes: dict, out):
    """A transformers CLIP folder (config.json and an offline processor, no weights) of the given sizes, for a scorer
    with `init: random`."""
    from pathlib import Path

    from transformers import CLIPConfig, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from rollout.models.tiny import clip_tokenizer

    out = Path(out)
    tokenizer = clip_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    CLIPConfig(text_config={**sizes["text_config"], **ids}, vision_config=sizes["vision_config"],
               projection_dim=sizes["projection_dim"]).save_pretrained(out)
    side = sizes["vision_config"]["image_size"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out
