"""SD3.5 adapter: two CLIPs + T5 joint conditioning, (B, 16, H/8, W/8) latents, true classifier-free guidance."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from rollout.models.contract import Conditioning, FlowModel, PromptEmbeds, sigma_batch


class SD3Model(FlowModel):
    """Stable Diffusion 3.5 as StableDiffusion3Pipeline runs it."""

    family = "sd3"
    pipeline = "StableDiffusion3Pipeline"
    true_cfg = True
    default_max_sequence_length = 256
    components = {
        "tokenizer": ("text", CLIPTokenizer),
        "text_encoder": ("text", CLIPTextModelWithProjection),
        "tokenizer_2": ("text", CLIPTokenizer),
        "text_encoder_2": ("text", CLIPTextModelWithProjection),
        "tokenizer_3": ("text", T5Tokenizer),
        "text_encoder_3": ("text", T5EncoderModel),
        "vae": ("vae", AutoencoderKL),
        "transformer": ("transformer", SD3Transformer2DModel),
    }

    def _latent_channels_from_transformer(self) -> int:
        return self.transformer.config.in_channels

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Both CLIPs' penultimate hidden states (zero-padded to the T5 width), then T5's; pooled = both projections."""
        self._require("text")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        clip_length = self.modules["tokenizer"].model_max_length  # the pipeline uses the first tokenizer's for both
        hidden, pooled = [], []
        for tokenizer, encoder in (
            (self.modules["tokenizer"], self.modules["text_encoder"]),
            (self.modules["tokenizer_2"], self.modules["text_encoder_2"]),
        ):
            out = encoder(self._tokenize(tokenizer, prompts, clip_length), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(self.dtype))
            pooled.append(out.text_embeds.to(self.dtype))
        t5_ids = self._tokenize(self.modules["tokenizer_3"], prompts, self.max_sequence_length)
        t5_hidden = self.modules["text_encoder_3"](t5_ids)[0].to(self.dtype)
        clip_hidden = torch.cat(hidden, dim=-1)
        clip_hidden = F.pad(clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1]))
        return PromptEmbeds(torch.cat([clip_hidden, t5_hidden], dim=-2), torch.cat(pooled, dim=-1))

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """VAE latents: (B, 16, H/8, W/8)."""
        self._check_size(height, width)
        factor = self.vae_scale_factor
        return (batch, self.latent_channels, height // factor, width // factor)

    def guides(self, guidance_scale: float) -> bool:
        return float(guidance_scale) != 1.0

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
        """`v_u + g·(v_c − v_u)` from one batched forward over [negative, positive]; g = 1 is a single plain forward.

        `image_size` is accepted for symmetry with FLUX and ignored (the latent carries its size).
        """
        self._require("transformer")
        if latents.ndim != 4:
            raise ValueError(f"SD3 latents must be (B, C, H/8, W/8), got shape {tuple(latents.shape)}")
        batch = latents.shape[0]
        timestep = 1000 * sigma_batch(sigma, batch, self.device)  # SD3 takes timesteps in [0, 1000]
        x, timestep, cond = self._conditioned(latents.to(self.device, self.dtype), timestep, embeds, negative,
                                              guidance_scale)
        out = self.transformer(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=cond.embeds.prompt_embeds,
            pooled_projections=cond.embeds.pooled,
            return_dict=False,
        )[0].float()
        if not cond.guided:
            return out
        v_uncond, v_cond = out.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Undo the VAE scaling and shift, decode, and quantise to uint8 (B, H, W, 3)."""
        self._require("vae")
        expected = self.latent_shape(latents.shape[0], height, width)
        if tuple(latents.shape) != expected:
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not decode to {height}x{width}: {expected}")
        return self._decode_scaled(latents)
