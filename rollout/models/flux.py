"""FLUX.1 adapter: CLIP-pooled + T5 conditioning, packed 2x2-patch latents, guidance embedding (no true CFG)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from rollout.models.contract import Conditioning, FlowModel, PromptEmbeds, sigma_batch, unpack_patches


class FluxModel(FlowModel):
    """FLUX.1 as FluxPipeline runs it, with the latents kept packed: (B, (H/16)*(W/16), 4*16)."""

    family = "flux"
    pipeline = "FluxPipeline"
    true_cfg = False
    default_max_sequence_length = 512
    components = {
        "tokenizer": ("text", CLIPTokenizer),
        "text_encoder": ("text", CLIPTextModel),
        "tokenizer_2": ("text", T5Tokenizer),
        "text_encoder_2": ("text", T5EncoderModel),
        "vae": ("vae", AutoencoderKL),
        "transformer": ("transformer", FluxTransformer2DModel),
    }

    def _latent_channels_from_transformer(self) -> int:
        return self.transformer.config.in_channels // 4

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """T5 hidden states (max_sequence_length tokens) and CLIP's pooled output, one encoder pass each."""
        self._require("text")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokenizer, clip = self.modules["tokenizer"], self.modules["text_encoder"]
        tokenizer_2, t5 = self.modules["tokenizer_2"], self.modules["text_encoder_2"]
        pooled = clip(self._tokenize(tokenizer, prompts, tokenizer.model_max_length)).pooler_output
        hidden = t5(self._tokenize(tokenizer_2, prompts, self.max_sequence_length))[0]
        return PromptEmbeds(hidden.to(self.dtype), pooled.to(self.dtype))

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """Packed latents: one token per 2x2 patch of the (H/8, W/8) latent, 4 * latent_channels features."""
        return (batch, self.image_seq_len(height, width), 4 * self.latent_channels)

    def _image_ids(self, rows: int, cols: int) -> torch.Tensor:
        """Position ids (0, row, col) of each packed token, as FluxPipeline builds img_ids."""
        ids = torch.zeros(rows, cols, 3, device=self.device)  # built on the device: no host copy per step
        ids[..., 1] = torch.arange(rows, device=self.device)[:, None]
        ids[..., 2] = torch.arange(cols, device=self.device)[None, :]
        return ids.reshape(rows * cols, 3).to(self.dtype)

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
        """One transformer forward; `guidance_scale` goes into the guidance embedding (FLUX.1-dev).

        `image_size` (pixels) fixes the token grid of non-square images; square is assumed without it.
        """
        self._require("transformer")
        if negative is not None:
            raise ValueError("FLUX.1 has no true classifier-free guidance: call velocity without negative embeddings")
        if latents.ndim != 3:
            raise ValueError(f"FLUX latents must be packed (B, tokens, channels), got shape {tuple(latents.shape)}")
        batch, tokens, _ = latents.shape
        timestep = sigma_batch(sigma, batch, self.device).to(self.dtype)  # t in [0, 1]: the model scales by 1000
        x, timestep, cond = self._conditioned(latents.to(self.device, self.dtype), timestep, embeds, None,
                                              guidance_scale)  # never guided: FLUX.1 has no negative rows
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), float(guidance_scale), dtype=torch.float32, device=self.device)
        out = self.transformer(
            hidden_states=x,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=cond.embeds.pooled,
            encoder_hidden_states=cond.embeds.prompt_embeds,
            txt_ids=torch.zeros(cond.embeds.prompt_embeds.shape[1], 3, device=self.device, dtype=self.dtype),
            img_ids=self._image_ids(*self._token_grid(tokens, image_size)),
            return_dict=False,
        )[0]
        return out.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Unpack, undo the VAE scaling and shift, decode, and quantise to uint8 (B, H, W, 3)."""
        self._require("vae")
        rows, cols = self._token_grid(latents.shape[1], (height, width))
        return self._decode_scaled(unpack_patches(latents.to(self.device, torch.float32), rows, cols))
