"""The model adapter contract shared by rollout and learner: encode prompts, velocity, decode.

FLUX.1 and SD3.5 differ in how they condition the transformer, lay out latents and apply guidance; everything above this
package sees one `FlowModel` with the same methods. One adapter per family (`flux.py`, `sd3.py`) implements it and
imports only this module; `loading.py` knows the families and loads them.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rollout.models import schedules


@dataclass(frozen=True)
class PromptEmbeds:
    """Text conditioning for a batch: plain tensors only, so it moves between devices and pickles cheaply.

    FLUX: `prompt_embeds` (B, L, D_t5) from T5 and `pooled` (B, D_clip) from CLIP.
    SD3: `prompt_embeds` (B, 77 + L, D_t5), both CLIPs' hidden states (zero-padded to D_t5) then T5, and `pooled`
    (B, 2 * projection), both CLIPs' projections.
    FLUX.2, Qwen-Image: no pooled vector (B, 0). Qwen-Image's prompts keep their own lengths: `mask` (B, L) bool marks
    the real tokens of rows padded to a common length (None: every token is real).
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.prompt_embeds.ndim != 3 or self.pooled.ndim != 2:
            raise ValueError(
                f"prompt_embeds must be (B, L, D) and pooled (B, P), got {tuple(self.prompt_embeds.shape)} "
                f"and {tuple(self.pooled.shape)}"
            )
        if self.prompt_embeds.shape[0] != self.pooled.shape[0]:
            raise ValueError(
                f"prompt_embeds and pooled disagree on the batch size: "
                f"{self.prompt_embeds.shape[0]} != {self.pooled.shape[0]}"
            )
        if self.mask is not None and (self.mask.dtype != torch.bool or self.mask.shape != self.prompt_embeds.shape[:2]):
            raise ValueError(f"mask must be bool (B, L) = {tuple(self.prompt_embeds.shape[:2])}, got "
                             f"{self.mask.dtype} {tuple(self.mask.shape)}")

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _with(self, fn) -> PromptEmbeds:
        """`fn` applied to every tensor (the mask included, when there is one)."""
        return PromptEmbeds(fn(self.prompt_embeds), fn(self.pooled), None if self.mask is None else fn(self.mask))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PromptEmbeds:
        """The same embeddings on another device and/or in another dtype (the mask stays bool)."""
        return PromptEmbeds(self.prompt_embeds.to(device=device, dtype=dtype),
                            self.pooled.to(device=device, dtype=dtype),
                            None if self.mask is None else self.mask.to(device=device))

    def index_select(self, index: Sequence[int] | torch.Tensor) -> PromptEmbeds:
        """Rows `index` (repeats allowed), e.g. the groups of the samples in a learner micro-batch."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.prompt_embeds.device)
        return self._with(lambda t: t.index_select(0, index))

    def expand(self, n: int) -> PromptEmbeds:
        """One prompt's embeddings repeated for a group of `n` samples, as a view (no copy)."""
        if len(self) != 1:
            raise ValueError(f"expand needs the embeddings of exactly one prompt, got {len(self)}")
        return self._with(lambda t: t.expand(n, *t.shape[1:]))

    @staticmethod
    def cat(parts: Sequence[PromptEmbeds]) -> PromptEmbeds:
        """Concatenate along the batch (e.g. several groups into one forward). Rows of different lengths are padded
        with zeros to the longest, and the mask marks their real tokens."""
        if not parts:
            raise ValueError("cat needs at least one PromptEmbeds")
        pooled = torch.cat([p.pooled for p in parts])
        lengths = {p.prompt_embeds.shape[1] for p in parts}
        if len(lengths) == 1 and all(p.mask is None for p in parts):
            return PromptEmbeds(torch.cat([p.prompt_embeds for p in parts]), pooled)
        longest = max(lengths)
        embeds, masks = [], []
        for p in parts:
            batch, length, _ = p.prompt_embeds.shape
            pad = longest - length
            embeds.append(torch.nn.functional.pad(p.prompt_embeds, (0, 0, 0, pad)))
            mask = p.mask if p.mask is not None else p.prompt_embeds.new_ones(batch, length, dtype=torch.bool)
            masks.append(torch.nn.functional.pad(mask, (0, pad), value=False))
        return PromptEmbeds(torch.cat(embeds), pooled, torch.cat(masks))


@dataclass(frozen=True)
class Conditioning:
    """The text conditioning of one transformer forward, ready to use: on the model's device and dtype, one row per
    latent, and with classifier-free guidance (`guided`) the negative rows joined to the positive ones in the order
    the family's forward takes them (2B rows). `FlowModel.conditioning` builds it; a sampler builds it once per group
    and batch size instead of at every step."""

    embeds: PromptEmbeds
    guided: bool

    @property
    def batch(self) -> int:
        """The latents one forward with this conditioning takes."""
        return len(self.embeds) // 2 if self.guided else len(self.embeds)


def sigma_batch(sigma: float | torch.Tensor, batch: int, device: torch.device | str) -> torch.Tensor:
    """Noise level(s) as a float32 (B,) tensor: a scalar is broadcast to the batch."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if sigma.ndim == 0:
        return sigma.expand(batch)
    if sigma.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or a ({batch},) tensor, got shape {tuple(sigma.shape)}")
    return sigma


def unpack_patches(latents: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Tokens (B, rows*cols, 4C) of 2x2 latent patches, features ordered (channel, dy, dx) -> latents
    (B, C, 2*rows, 2*cols): the inverse of the FLUX.1 / Qwen-Image packing."""
    batch, _, packed = latents.shape
    channels = packed // 4
    latents = latents.reshape(batch, rows, cols, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels, 2 * rows, 2 * cols)


def to_uint8_images(decoded: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1], (B, 3, H, W) -> uint8 (B, H, W, 3) on its device, rounded as diffusers' image processor
    does."""
    images = (decoded.float() / 2 + 0.5).clamp(0, 1)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class FlowModel(abc.ABC):
    """A text-to-image flow-matching model: the velocity field v(x_t, t) plus its text encoders and VAE."""

    family: ClassVar[str]
    pipeline: ClassVar[str]  # the diffusers pipeline class this adapter reproduces
    # True when guidance is classifier-free (needs negative embeddings), False for a guidance embedding.
    true_cfg: ClassVar[bool]
    negative_prompt: ClassVar[str] = ""  # the prompt whose velocity classifier-free guidance pushes away from
    negative_first: ClassVar[bool] = True  # guided forwards take [negative, positive] rows (else [positive, negative])
    default_max_sequence_length: ClassVar[int]
    # subfolder -> (part, loader class): what `loading.load_flow_model` loads for each part.
    components: ClassVar[dict[str, tuple[str, type]]]

    def __init__(
        self,
        modules: Mapping[str, Any],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_sequence_length: int | None = None,
        scheduler_config: Mapping | None = None,
    ) -> None:
        self.modules = dict(modules)
        self.parts = frozenset(part for sub, (part, _) in self.components.items() if sub in self.modules)
        self.transformer = self.modules.get("transformer")
        self.vae = self.modules.get("vae")
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        # the model's own scheduler config (scheduler/scheduler_config.json); None: the family's default
        self.scheduler_config = dict(scheduler_config) if scheduler_config is not None else None
        self._negative: PromptEmbeds | None = None

    def _require(self, part: str) -> None:
        if part not in self.parts:
            raise RuntimeError(
                f"this {self.family} model was loaded without its {part!r} part (loaded: {sorted(self.parts)}); "
                f"pass parts including {part!r} to load_flow_model"
            )

    def _check_size(self, height: int, width: int) -> None:
        if height <= 0 or width <= 0 or height % 16 or width % 16:
            raise ValueError(f"image height and width must be positive multiples of 16, got {height}x{width}")

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latent (16 for FLUX.1 and SD3.5)."""
        if self.vae is not None:
            return self.vae.config.latent_channels
        if self.transformer is not None:
            return self._latent_channels_from_transformer()
        return 16

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8)."""
        if self.vae is not None:
            return 2 ** (len(self.vae.config.block_out_channels) - 1)
        return 8

    def negative_embeds(self) -> PromptEmbeds:
        """Embeddings of the negative prompt (one row), encoded on first use and cached."""
        if self._negative is None:
            self._negative = self.encode_prompts([self.negative_prompt])
        return self._negative

    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The sampling schedule at this image size, from the model's scheduler config as its pipeline computes it."""
        return schedules.sigmas(self.family, num_steps, image_seq_len=self.image_seq_len(height, width),
                                config=self.scheduler_config)

    def image_seq_len(self, height: int, width: int) -> int:
        """Number of image tokens the transformer sees (2x2 latent patches)."""
        self._check_size(height, width)
        return (height // (2 * self.vae_scale_factor)) * (width // (2 * self.vae_scale_factor))

    def _token_grid(self, tokens: int, image_size: tuple[int, int] | None) -> tuple[int, int]:
        """(rows, cols) of a grid of 2x2-patch tokens: from the pixel size, or square when it is not given."""
        if image_size is not None:
            height, width = image_size
            self._check_size(height, width)
            grid = (height // (2 * self.vae_scale_factor), width // (2 * self.vae_scale_factor))
            if grid[0] * grid[1] != tokens:
                raise ValueError(f"latents have {tokens} tokens but a {height}x{width} image has {grid[0] * grid[1]}")
            return grid
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"{tokens} latent tokens are not a square grid: pass image_size=(height, width)")
        return side, side

    def _decode_scaled(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, C, h, w) -> uint8 images, undoing the VAE's scaling factor and shift first."""
        config = self.vae.config
        latents = latents.to(self.device, torch.float32) / config.scaling_factor + config.shift_factor
        return to_uint8_images(self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0])

    def guides(self, guidance_scale: float) -> bool:
        """Whether this guidance scale runs the negative prompt beside the positive one (classifier-free guidance)."""
        return False

    def conditioning(self, embeds: PromptEmbeds, negative: PromptEmbeds | None, batch: int,
                     guidance_scale: float) -> Conditioning:
        """The conditioning of a forward over `batch` latents with these prompt (and negative) embeddings."""
        embeds = self._batch_embeds(embeds, batch, "prompt")
        if not self.guides(guidance_scale):
            return Conditioning(embeds, guided=False)
        if negative is None:
            raise ValueError(f"{self.family} with guidance_scale={guidance_scale} needs negative embeddings "
                             f"(model.negative_embeds())")
        negative = self._batch_embeds(negative, batch, "negative")
        rows = [negative, embeds] if self.negative_first else [embeds, negative]
        return Conditioning(PromptEmbeds.cat(rows), guided=True)

    def _conditioned(self, x: torch.Tensor, timestep: torch.Tensor, embeds: PromptEmbeds | Conditioning,
                     negative: PromptEmbeds | None, guidance_scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """Inputs of one forward: the latents and timesteps repeated for the guidance rows, and the conditioning
        (built here from plain embeddings, or checked when it was built once for many steps)."""
        if isinstance(embeds, Conditioning):
            cond = embeds
            if cond.batch != len(x):
                raise ValueError(f"conditioning for a batch of {cond.batch} latents used with {len(x)}")
        else:
            cond = self.conditioning(embeds, negative, len(x), guidance_scale)
        if cond.guided:
            x, timestep = torch.cat([x, x]), torch.cat([timestep, timestep])
        return x, timestep, cond

    def _batch_embeds(self, embeds: PromptEmbeds, batch: int, what: str) -> PromptEmbeds:
        """Embeddings with one row per latent (a single row is broadcast), on the model's device and dtype."""
        if len(embeds) == 1 and batch > 1:
            embeds = embeds.expand(batch)
        if len(embeds) != batch:
            raise ValueError(f"{len(embeds)} {what} embeddings for a batch of {batch} latents")
        return embeds.to(self.device, self.dtype)

    def _tokenize(self, tokenizer: Any, prompts: Sequence[str], max_length: int) -> torch.Tensor:
        """Token ids padded/truncated to `max_length`, as the diffusers pipelines tokenize."""
        return tokenizer(
            list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    @abc.abstractmethod
    def _latent_channels_from_transformer(self) -> int: ...

    @abc.abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Run the text encoders once for a batch of prompts."""

    @abc.abstractmethod
    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """Shape of the model-native latents the sampler works on."""

    @abc.abstractmethod
    def velocity(
        self,
        latents: torch.Tensor,
        sigma: float | torch.Tensor,
        embeds: PromptEmbeds | Conditioning,
        *,
        guidance_scale: float,
        negative: PromptEmbeds | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Predicted velocity (float32, shape of `latents`) at noise level `sigma`, with guidance; differentiable.

        `embeds`: the prompts' embeddings (with `negative` for guidance), or a `Conditioning` built for this batch."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Final latents -> uint8 images (B, H, W, 3) on the model's device."""
