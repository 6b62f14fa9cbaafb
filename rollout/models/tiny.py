"""Offline builder of tiny random FLUX.1 / SD3.5 / FLUX.2 [klein] / Qwen-Image / Z-Image pipelines in diffusers
format, for tests and the CPU demo.

The folders have the real layout (transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/, model_index.json), so
they load through exactly the same `from_pretrained` path as the real models; only the widths are tiny.

    python -m rollout.models.tiny --family flux --out /tmp/tiny-flux [--seed 0] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from cluster.config import MODEL_FAMILIES
from rollout.models.schedules import DEFAULT_CONFIGS

if TYPE_CHECKING:
    from diffusers import (DiffusionPipeline, Flux2KleinPipeline, FluxPipeline, QwenImagePipeline,
                           StableDiffusion3Pipeline, ZImagePipeline)

MARKER = "tiny_model.json"

# The real VAEs' latent normalisation (FLUX.1 and SD3.5 both use 16 latent channels).
FLUX_VAE_SCALING = (0.3611, 0.1159)
SD3_VAE_SCALING = (1.5305, 0.0609)

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512


@contextmanager
def seeded(seed: int, component: int) -> Iterator[None]:
    """Initialise one component from its own seed without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + component)
        yield


def clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with one token per byte (and per word-final byte): any text tokenizes."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    # Like real CLIP, the start/end tokens have the largest ids.
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer over printable ASCII characters (word-initial and inner); others map to <unk>."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    for code in range(33, 127):
        pieces += [("▁" + chr(code), -4.0), (chr(code), -5.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def clip_config(tokenizer: CLIPTokenizer, hidden: int, projection: int) -> CLIPTextConfig:
    """A 2-layer CLIP text encoder config of width `hidden` for `tokenizer`."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def t5_encoder(tokenizer: T5Tokenizer, d_model: int) -> T5EncoderModel:
    """A random 2-layer T5 v1.1 encoder of width `d_model` for `tokenizer`."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",  # as T5 v1.1, which both FLUX.1 and SD3.5 use
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """An 8x-downsampling (4 blocks) VAE with 16 latent channels, like the FLUX.1 / SD3.5 VAEs."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


# The pipeline classes are imported where a pipeline is assembled: importing them prints transformers' torchvision
# warnings, and `ensure_tiny` on a folder that is already built (every actor of a tiny job) needs none of them.


def _build_flux(seed: int) -> FluxPipeline:
    from diffusers import FluxPipeline

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    clip_width, t5_width, heads, head_dim = 32, 48, 2, 16
    with seeded(seed, 1):
        text_encoder = CLIPTextModel(clip_config(tokenizer, clip_width, clip_width))
    with seeded(seed, 2):
        text_encoder_2 = t5_encoder(tokenizer_2, t5_width)
    with seeded(seed, 3):
        vae = _vae(*FLUX_VAE_SCALING)
    with seeded(seed, 4):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * vae.config.latent_channels,  # 2x2 patches of the latent, packed
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=t5_width,
            pooled_projection_dim=clip_width,
            guidance_embeds=True,  # FLUX.1-dev: guidance embedding instead of true CFG
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**DEFAULT_CONFIGS["flux"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _build_sd3(seed: int) -> StableDiffusion3Pipeline:
    from diffusers import StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    # The two CLIP hidden states (16 + 16) are zero-padded to the T5 width (48) by the pipeline.
    clip_width, t5_width, heads, head_dim = 16, 48, 2, 16
    with seeded(seed, 1):
        text_encoder = CLIPTextModelWithProjection(clip_config(tokenizer, clip_width, clip_width))
    with seeded(seed, 2):
        text_encoder_2 = CLIPTextModelWithProjection(clip_config(tokenizer_2, clip_width, clip_width))
    with seeded(seed, 3):
        text_encoder_3 = t5_encoder(tokenizer_3, t5_width)
    with seeded(seed, 4):
        vae = _vae(*SD3_VAE_SCALING)
    with seeded(seed, 5):
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=vae.config.latent_channels,
            out_channels=vae.config.latent_channels,
            num_layers=2,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=t5_width,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=2 * clip_width,  # both CLIP projections, concatenated
            pos_embed_max_size=64,  # up to 1024 px
            dual_attention_layers=(0,),  # SD3.5 (MMDiT-X) blocks
            qk_norm="rms_norm",
        )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**DEFAULT_CONFIGS["sd3"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


# A chat template with Qwen3's layout for one user turn and the generation prompt without thinking.
QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
                      "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level Qwen tokenizer with one token per byte, Qwen's chat markers and a chat template."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _build_flux2(seed: int) -> Flux2KleinPipeline:
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel

    tokenizer = qwen_tokenizer()
    width, heads, head_dim = 16, 2, 16
    with seeded(seed, 1):  # 27 layers: the pipeline stacks hidden states 9, 18 and 27
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=27,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id))
    with seeded(seed, 3):
        vae = AutoencoderKLFlux2(block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
                                 norm_num_groups=4, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
                                 mid_block_add_attention=False)
        # the real VAE's batch-norm statistics normalise its latents; random ones here, so that they matter
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    with seeded(seed, 4):
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=4 * vae.config.latent_channels, num_layers=1, num_single_layers=1,
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=3 * width,
            timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**DEFAULT_CONFIGS["flux2"]), vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              is_distilled=False)


def _build_qwen_image(seed: int) -> QwenImagePipeline:
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    tokenizer = qwen_tokenizer()
    width = 16
    special = len(tokenizer)  # vision token ids, never produced by a text prompt
    with seeded(seed, 1):
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=2048, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                             eos_token_id=tokenizer.eos_token_id),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=width,
                               fullatt_block_indexes=[0]),
            image_token_id=special, video_token_id=special + 1, vision_start_token_id=special + 2,
            vision_end_token_id=special + 3))
    with seeded(seed, 3):  # a 3D VAE with 8x spatial compression and random per-channel statistics
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0])
    with seeded(seed, 4):
        transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * vae.config.z_dim,
                                                  out_channels=vae.config.z_dim, num_layers=1, attention_head_dim=16,
                                                  num_attention_heads=2, joint_attention_dim=width,
                                                  axes_dims_rope=(4, 6, 6))
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**DEFAULT_CONFIGS["qwen_image"]), vae=vae,
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


def _build_z_image(seed: int) -> ZImagePipeline:
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    tokenizer = qwen_tokenizer()
    width = 16
    with seeded(seed, 1):
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id))
    with seeded(seed, 3):
        vae = _vae(*FLUX_VAE_SCALING)  # Z-Image decodes with the FLUX.1 VAE
    with seeded(seed, 4):
        transformer = ZImageTransformer2DModel(in_channels=vae.config.latent_channels, dim=32, n_layers=1,
                                               n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=width,
                                               axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64])
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**DEFAULT_CONFIGS["z_image"]), vae=vae,
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


BUILDERS = {"flux": _build_flux, "sd3": _build_sd3, "flux2": _build_flux2, "qwen_image": _build_qwen_image,
            "z_image": _build_z_image}


def build_tiny_pipeline(family: str, *, seed: int = 0) -> DiffusionPipeline:
    """Build a tiny random pipeline in memory, deterministically from `seed`, all modules in eval mode."""
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(MODEL_FAMILIES)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the computed buffers (SD3's sin-cos position table) differ in the last bit by thread count
    try:
        pipe = BUILDERS[family](seed)
    finally:
        torch.set_num_threads(threads)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # built from configs they start in train mode (T5 dropout)
    return pipe


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def build_tiny(family: str, out_dir: Path | str, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny pipeline folder atomically (built in a sibling temp folder, then moved into place)."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if _is_nonempty_dir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to replace it")
    pipe = build_tiny_pipeline(family, seed=seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        pipe.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"family": family, "seed": seed}) + "\n")
        move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename a finished folder to `out_dir`; an existing one is moved aside first (a rename cannot replace it)."""
    if out_dir.exists():
        trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, trash)
        os.replace(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def ensure_tiny(family: str, out_dir: Path | str, seed: int = 0) -> Path:
    """Return `out_dir`, building the tiny model there first if the folder is missing or empty (cached after that)."""
    out_dir = Path(out_dir).absolute()
    marker = out_dir / MARKER
    if _is_nonempty_dir(out_dir):
        if marker.is_file():
            built = json.loads(marker.read_text())
            if built != {"family": family, "seed": seed}:
                raise ValueError(
                    f"{out_dir} holds a tiny {built.get('family')} model with seed {built.get('seed')}, "
                    f"not {family} with seed {seed}; delete it or choose another folder"
                )
        return out_dir
    start = time.perf_counter()
    try:
        build_tiny(family, out_dir, seed=seed)
    except OSError:
        if not marker.is_file():  # not a concurrent builder that finished first
            raise
        return out_dir
    print(f"[flowrl] built tiny {family} model (seed {seed}) at {out_dir} in {time.perf_counter() - start:.1f} s",
          flush=True)
    return out_dir


def _parameter_counts(path: Path) -> dict[str, int]:
    """Parameter counts per module, read back from the written folder."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: build one tiny model folder and report what was written."""
    parser = argparse.ArgumentParser(prog="python -m rollout.models.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=MODEL_FAMILIES)
    parser.add_argument("--out", required=True, type=Path, help="folder to write (must be missing or empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty folder")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = build_tiny(args.family, args.out, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as err:
        parser.exit(2, f"error: {err}\n")
    seconds = time.perf_counter() - start
    counts = _parameter_counts(path)
    print(f"wrote tiny {args.family} pipeline (seed {args.seed}) to {path} in {seconds:.1f} s")
    for name, count in counts.items():
        print(f"  {name:<15} {count:>9,} parameters")
    print(f"  {'total':<15} {sum(counts.values()):>9,} parameters")


if __name__ == "__main__":
    main()
