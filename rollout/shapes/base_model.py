"""Builds the base text-to-image model of the shapes world (rollout.shapes.data) as an SD3 diffusers folder.

The command that builds it, `python bench/shapes_base.py --out DIR`, also scores it (bench/ may use the rewards). The
folder is a standard StableDiffusion3Pipeline that `load_flow_model(DIR, "sd3")` loads, trained in fp32 on CPU,
deterministically from the seed (for a given torch thread count):

- VAE: a 4×-downsampling AutoencoderKL (64×64 RGB <-> 4×16×16 latents) trained on 32×32 crops of shapes images
  (L1 + MSE + a small KL).
  Its latents are normalised per channel by folding each channel's mean and spread into the weights of `quant_conv`
  and `post_quant_conv`, so the saved config has scaling_factor 1 and shift_factor 0 and the latents the adapter sees
  have zero mean and unit spread in every channel.
- Text: a frozen random tiny T5 (`text_encoder_3`) whose tokenizer has one token per word of the caption vocabulary,
  and two frozen random tiny CLIPs whose BPE tokenizers also read each caption word as one token (CLIP length 8). The
  transformer is trained on exactly what `SD3Model.encode_prompts` produces with `max_sequence_length` =
  T5_LENGTH (8), so a job config must set `model.max_sequence_length: 8` and `model.resolution: 64`.
- Transformer: an SD3Transformer2DModel (4 layers, `heads` × 32) trained by rectified flow (x_t = (1−t)·x0 + t·noise,
  target noise − x0, t logit-normal and then shifted like the SD3 sampling schedule, so training sees the noise levels
  that sampling visits) on the 12 train combos only, with 10% of the captions dropped to "" so that classifier-free
  guidance works; the saved weights are an EMA of the training weights.

Training runs its planned `iterations`, then the caller's `validate` scores the EMA model (the bench: exact accuracy
of 10-step ODE samples of the training combos, without CFG); below `target_train_exact` it trains on at the final
learning rate, validating every `check_every` iterations, up to `max_iterations`. A model that never reaches the
target is not saved: BaseModelTooWeak says what it reached. (Floating-point results differ between CPUs and thread
counts, so two machines do not build the same weights; the target makes them equally good.) At the end the caller's
`evaluate` scores the finished folder and VAE reconstructions of training images; what it returns goes into
`shapes_base.json` next to the settings, seed, the validations and wall times. The folder is built next to DIR and
renamed into place; a second call with the same settings returns at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from tqdm import tqdm
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from rollout.models.contract import to_uint8_images
from rollout.models.schedules import DEFAULT_CONFIGS
from rollout.models.tiny import clip_config, move_into_place, seeded, t5_encoder
from rollout.shapes import data as shapes_data

MARKER = "shapes_base.json"
FORMAT = 1
T5_LENGTH = 8  # longest caption: 6 words + </s>
CLIP_LENGTH = 8  # <start> + 6 words + <end>
CLIP_WIDTH, T5_WIDTH = 16, 64
WORDS = ("a", "photo", "of", "an", "image", "square", "squares", *shapes_data.NUMBER_WORDS.values(),
         *shapes_data.COLOURS)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that determines the built model (stored in the marker; a change rebuilds)."""

    seed: int = 0
    num_images: int = 8192
    vae_iterations: int = 1200
    vae_batch: int = 8
    vae_crop: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    heads: int = 3
    iterations: int = 2200
    batch: int = 32
    lr: float = 1.5e-3
    warmup: int = 100
    ema_decay: float = 0.998
    caption_dropout: float = 0.1
    timestep_shift: float = DEFAULT_CONFIGS["sd3"]["shift"]
    eval_samples: int = 256
    eval_steps: int = 10
    guidance_scales: tuple[float, ...] = (1.0, 2.0)
    target_train_exact: float = 0.40  # validated without CFG, as cluster/micro.yaml samples
    validation_samples: int = 192
    check_every: int = 400
    max_iterations: int = 16000


def quick_settings(seed: int = 0) -> Settings:
    """A few iterations of everything: a loadable (untrained) model in seconds, for tests; no accuracy target."""
    return Settings(seed=seed, num_images=32, vae_iterations=2, vae_batch=8, iterations=3, batch=8, warmup=1,
                    eval_samples=8, guidance_scales=(1.0,), target_train_exact=0.0, validation_samples=8,
                    check_every=2, max_iterations=3)


class BaseModelTooWeak(RuntimeError):
    """The base model did not reach its validation target within max_iterations; nothing was saved."""


# --------------------------------------------------------------------------- text encoders


def word_t5_tokenizer() -> T5Tokenizer:
    """A T5 (unigram) tokenizer with one piece per caption word; any other word maps to <unk>."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + word, -1.0) for word in WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_LENGTH)


def word_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer whose merges spell each caption word as one token; other text still tokenizes
    (byte by byte). Longer words' merges rank first so that no shorter word's merge splits them."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    for word in sorted(WORDS, key=len, reverse=True):
        symbol = word[0]
        for k, char in enumerate(word[1:], start=1):
            right = char + ("</w>" if k == len(word) - 1 else "")
            if (symbol, right) not in merges:
                merges.append((symbol, right))
            symbol += right
            vocab.setdefault(symbol, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)  # like real CLIP, the start/end tokens have the largest ids
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_LENGTH)


def text_components(seed: int) -> dict:
    """The frozen tokenizers and random text encoders of the SD3 pipeline, in eval mode."""
    parts = {}
    for index, name in enumerate(("", "_2"), start=1):
        tokenizer = word_clip_tokenizer()
        with seeded(seed, index):
            encoder = CLIPTextModelWithProjection(clip_config(tokenizer, CLIP_WIDTH, CLIP_WIDTH))
        parts[f"tokenizer{name}"], parts[f"text_encoder{name}"] = tokenizer, encoder.eval().requires_grad_(False)
    parts["tokenizer_3"] = word_t5_tokenizer()
    with seeded(seed, 3):
        parts["text_encoder_3"] = t5_encoder(parts["tokenizer_3"], T5_WIDTH).eval().requires_grad_(False)
    return parts


def encode_captions(text: dict, captions: list[str]):
    """Prompt embeddings exactly as the SD3 adapter computes them at sampling time."""
    from rollout.models.sd3 import SD3Model

    return SD3Model(text, max_sequence_length=T5_LENGTH).encode_prompts(captions)


# --------------------------------------------------------------------------- VAE


def new_vae() -> AutoencoderKL:
    """64×64×3 <-> 16×16×4 (three blocks: 4× downsampling), fully convolutional (no attention), so it trains on
    crops."""
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=shapes_data.IMAGE_SIZE, scaling_factor=1.0, shift_factor=0.0, mid_block_add_attention=False,
    )


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, s: Settings, generator: torch.Generator) -> list[float]:
    """L1 + MSE reconstruction plus kl_weight × KL on random `vae_crop`² crops, Adam; returns the loss curve."""
    vae.train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=s.vae_lr)
    losses, size = [], pixels.shape[-1]
    for _ in tqdm(range(s.vae_iterations), desc="VAE", unit="it", mininterval=5):
        rows = torch.randint(len(pixels), (s.vae_batch,), generator=generator)
        corners = torch.randint(0, (size - s.vae_crop) // 4 + 1, (s.vae_batch, 2), generator=generator) * 4
        x = torch.stack([pixels[i, :, top:top + s.vae_crop, left:left + s.vae_crop]
                         for i, (top, left) in zip(rows.tolist(), corners.tolist())])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + s.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def latent_means(vae: AutoencoderKL, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means (N, 4, 16, 16)."""
    return torch.cat([vae.encode(pixels[i:i + batch]).latent_dist.mean for i in range(0, len(pixels), batch)])


@torch.no_grad()
def fold_latent_normalisation(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Rewrite quant_conv / post_quant_conv so that the encoder's latents become (z − mean_c) / std_c per channel and
    the decoder undoes it; returns the normalised `latents`. Decoding is unchanged."""
    mean = latents.mean(dim=(0, 2, 3))
    std = latents.std(dim=(0, 2, 3)).clamp_min(1e-6)
    c = len(mean)
    quant, post = vae.quant_conv, vae.post_quant_conv  # 1×1 convs: (2C -> 2C) moments, (C -> C)
    quant.weight[:c] /= std[:, None, None, None]
    quant.bias[:c] = (quant.bias[:c] - mean) / std
    quant.bias[c:] -= 2 * torch.log(std)  # log-variance of z / std
    post.bias += (post.weight[:, :, 0, 0] * mean).sum(dim=1)
    post.weight *= std[None, :, None, None]
    return (latents - mean[None, :, None, None]) / std[None, :, None, None]


# --------------------------------------------------------------------------- transformer


def new_transformer(heads: int) -> SD3Transformer2DModel:
    """An MMDiT over 8×8 patches of the 16×16×4 latent, 4 joint blocks of `heads` heads × 32."""
    head_dim = 32
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=T5_WIDTH,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=2 * CLIP_WIDTH,
        pos_embed_max_size=16, qk_norm="rms_norm",
    )


def learning_rate(s: Settings, iteration: int) -> float:
    """Linear warm-up, then cosine decay to a tenth over `iterations`; a tenth after that."""
    if iteration < s.warmup:
        return s.lr * (iteration + 1) / s.warmup
    progress = min(1.0, (iteration - s.warmup) / max(1, s.iterations - s.warmup))
    return s.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_transformer(transformer: SD3Transformer2DModel, latents: torch.Tensor, caption_ids: torch.Tensor,
                      embeds, empty: int, s: Settings, generator: torch.Generator,
                      good_enough: Callable[[dict, int], bool]) -> tuple[dict, list[float], bool]:
    """Rectified flow with shifted logit-normal t; `caption_ids` index `embeds` (row `empty` is ""). After
    `iterations`, and every `check_every` after that up to `max_iterations`, `good_enough(ema, iteration)` decides
    whether to stop. Returns the EMA state dict, the loss curve and whether it was good enough."""
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=s.lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    losses, done = [], False
    for iteration in tqdm(range(max(s.iterations, s.max_iterations)), desc="transformer", unit="it", mininterval=5):
        rows = torch.randint(len(latents), (s.batch,), generator=generator)
        x0 = latents[rows]
        ids = caption_ids[rows].clone()
        ids[torch.rand(s.batch, generator=generator) < s.caption_dropout] = empty
        noise = torch.randn(x0.shape, generator=generator)
        u = torch.sigmoid(torch.randn(s.batch, generator=generator))
        t = s.timestep_shift * u / (1 + (s.timestep_shift - 1) * u)  # where the shifted sampling schedule looks
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        v = transformer(hidden_states=xt, timestep=1000 * t, encoder_hidden_states=embeds.prompt_embeds[ids],
                        pooled_projections=embeds.pooled[ids], return_dict=False)[0]
        loss = F.mse_loss(v, noise - x0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(s, iteration)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        decay = min(s.ema_decay, (1 + iteration) / (10 + iteration))
        with torch.no_grad():
            for k, v in transformer.state_dict().items():
                ema[k].lerp_(v, 1 - decay)
        losses.append(loss.item())
        trained = iteration + 1
        if trained >= s.iterations and (trained - s.iterations) % s.check_every == 0 or trained == s.max_iterations:
            transformer.eval()
            done = good_enough(ema, trained)
            transformer.train()
            if done:
                break
    transformer.eval()
    return ema, losses, done


# --------------------------------------------------------------------------- the build


def _marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


# evaluate(folder, settings, reconstructions uint8 (N, 64, 64, 3), their captions, their metadata) -> marker entries
Evaluate = Callable[[Path, "Settings", np.ndarray, list[str], list[dict]], dict]
# validate(folder, settings) -> exact accuracy on the training combos
Validate = Callable[[Path, "Settings"], float]


def build_shapes_base(out_dir: Path | str, settings: Settings = Settings(), *, evaluate: Evaluate,
                      validate: Validate, overwrite: bool = False) -> dict:
    """Build (or find cached) the shapes base model at `out_dir`; returns its marker (settings, validations,
    `evaluate`'s figures, times). BaseModelTooWeak when validation stays below the target."""
    out_dir = Path(out_dir).absolute()
    wanted = json.loads(json.dumps({"format": FORMAT, **dataclasses.asdict(settings)}))  # as the marker stores it
    found = _marker(out_dir)
    if found is not None and found.get("settings") == wanted:
        return found
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} holds something else (another model or other settings); pass --overwrite")

    s, times, start = settings, {}, time.perf_counter()
    generator = torch.Generator().manual_seed(s.seed)
    images, captions, metadata = shapes_data.dataset(s.num_images, seed=s.seed, split="train")
    pixels = to_pixels(images)
    text = text_components(s.seed)
    prompts = sorted(set(captions))
    embeds = encode_captions(text, prompts + [""])
    caption_ids = torch.tensor([prompts.index(c) for c in captions])
    times["data_s"] = time.perf_counter() - start

    with seeded(s.seed, 4):
        vae = new_vae()
    vae_losses = train_vae(vae, pixels, s, generator)
    latents = fold_latent_normalisation(vae, latent_means(vae, pixels))
    with torch.no_grad():
        reconstructions = to_uint8_images(vae.decode(latents[:256]).sample).numpy()
    times["vae_s"] = time.perf_counter() - start - times["data_s"]

    with seeded(s.seed, 5):
        transformer = new_transformer(s.heads)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(**DEFAULT_CONFIGS["sd3"]),
        **text,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    validations: list[list] = []  # [iteration, train exact accuracy]

    def good_enough(ema: dict, iteration: int) -> bool:
        """Save the EMA model to the temporary folder and validate it there."""
        training = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
        transformer.load_state_dict(ema)
        pipe.save_pretrained(tmp)
        transformer.load_state_dict(training)
        validations.append([iteration, round(validate(tmp, s), 4)])
        print(f"iteration {iteration}: train exact accuracy {validations[-1][1]:.3f} "
              f"(target {s.target_train_exact})", flush=True)
        return validations[-1][1] >= s.target_train_exact

    try:
        ema, losses, reached = train_transformer(transformer, latents, caption_ids, embeds, len(prompts), s,
                                                 generator, good_enough)
        if not reached:
            best = max(validations, key=lambda v: v[1])
            raise BaseModelTooWeak(
                f"the shapes base model reached train exact accuracy {validations[-1][1]:.3f} after "
                f"{validations[-1][0]} iterations (best {best[1]:.3f} at {best[0]}), below the target "
                f"{s.target_train_exact} within max_iterations = {s.max_iterations}: not saved. Build with another "
                f"--seed, or raise max_iterations")
        transformer.load_state_dict(ema)
        times["transformer_s"] = time.perf_counter() - start - times["data_s"] - times["vae_s"]
        pipe.save_pretrained(tmp)
        evaluation_start = time.perf_counter()
        figures = evaluate(tmp, s, reconstructions, captions[:256], metadata[:256])
        times["eval_s"] = time.perf_counter() - evaluation_start
        times["total_s"] = time.perf_counter() - start
        marker = {
            "settings": wanted,
            "job_config": {"model.family": "sd3", "model.resolution": 64, "model.max_sequence_length": T5_LENGTH},
            "validations": validations,
            **figures,
            "vae_loss_last50": float(np.mean(vae_losses[-50:])),
            "loss_last100": float(np.mean(losses[-100:])),
            **{k: round(v, 1) for k, v in times.items()},
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return marker
