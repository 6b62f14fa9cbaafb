"""FLUX.2 [klein] adapter: Qwen3 conditioning (three hidden layers stacked), 2x2-patchified latents normalised by the
VAE's batch-norm statistics and packed into tokens, true classifier-free guidance against the empty prompt.

The step-distilled klein models ignore guidance in their pipeline: run them with guidance_scale 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from transformers import Qwen2Tokenizer, Qwen3ForCausalLM

from rollout.models.contract import Conditioning, FlowModel, PromptEmbeds, sigma_batch, to_uint8_images, unpack_patches

HIDDEN_LAYERS = (9, 18, 27)  # the text encoder's hidden states the pipeline stacks into the conditioning


class Flux2Model(FlowModel):
    """FLUX.2 [klein] as Flux2KleinPipeline runs it, with the latents kept packed: (B, (H/16)*(W/16), 4*C)."""

    family = "flux2"
    pipeline = "Flux2KleinPipeline"
    true_cfg = True
    default_max_sequence_length = 512
    components = {
        "tokenizer": ("text", Qwen2Tokenizer),
        "text_encoder": ("text", Qwen3ForCausalLM),
        "vae": ("vae", AutoencoderKLFlux2),
        "transformer": ("transformer", Flux2Transformer2DModel),
    }

    def _latent_channels_from_transformer(self) -> int:
        return self.transformer.config.in_channels // 4

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Each prompt in the chat template (no thinking), padded to max_sequence_length; hidden states of layers
        9, 18 and 27 side by side per token. No pooled vector (an empty one)."""
        self._require("text")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokenizer, encoder = self.modules["tokenizer"], self.modules["text_encoder"]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False) for p in prompts]
        inputs = tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                           max_length=self.max_sequence_length)
        out = encoder(input_ids=inputs.input_ids.to(self.device), attention_mask=inputs.attention_mask.to(self.device),
                      output_hidden_states=True, use_cache=False)
        hidden = torch.stack([out.hidden_states[k] for k in HIDDEN_LAYERS], dim=2)  # (B, L, 3, D)
        hidden = hidden.reshape(hidden.shape[0], hidden.shape[1], -1).to(self.dtype)
        return PromptEmbeds(hidden, hidden.new_zeros(hidden.shape[0], 0))

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """Packed latents: one token per 2x2 patch of the (H/8, W/8) latent, 4 * latent_channels features."""
        return (batch, self.image_seq_len(height, width), 4 * self.latent_channels)

    def _ids(self, rows: int, cols: int, text_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids (t, h, w, l): (0, row, col, 0) per image token, (0, 0, 0, i) per text token."""
        image = torch.zeros(rows, cols, 4, device=self.device)  # built on the device: no host copy per step
        image[..., 1] = torch.arange(rows, device=self.device)[:, None]
        image[..., 2] = torch.arange(cols, device=self.device)[None, :]
        text = torch.zeros(text_length, 4, device=self.device)
        text[:, 3] = torch.arange(text_length, device=self.device)
        return image.reshape(rows * cols, 4), text

    def guides(self, guidance_scale: float) -> bool:
        return float(guidance_scale) > 1.0

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
        """`v_u + g·(v_c − v_u)` for g > 1 (one batched forward over [negative, positive]), else the conditional
        velocity alone, as the pipeline does."""
        self._require("transformer")
        if latents.ndim != 3:
            raise ValueError(f"FLUX.2 latents must be packed (B, tokens, channels), got shape {tuple(latents.shape)}")
        batch, tokens, _ = latents.shape
        timestep = sigma_batch(sigma, batch, self.device).to(self.dtype)  # t in [0, 1]: the model scales by 1000
        x, timestep, cond = self._conditioned(latents.to(self.device, self.dtype), timestep, embeds, negative,
                                              guidance_scale)
        image_ids, text_ids = self._ids(*self._token_grid(tokens, image_size), cond.embeds.prompt_embeds.shape[1])
        out = self.transformer(hidden_states=x, timestep=timestep, guidance=None,
                               encoder_hidden_states=cond.embeds.prompt_embeds, txt_ids=text_ids, img_ids=image_ids,
                               return_dict=False)[0].float()
        if not cond.guided:
            return out
        v_uncond, v_cond = out.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Undo the batch-norm normalisation (per token feature), unpack the 2x2 patches, decode, quantise to uint8."""
        self._require("vae")
        rows, cols = self._token_grid(latents.shape[1], (height, width))
        bn = self.vae.bn  # statistics of the patchified latent's 4C channels: the tokens' features
        x = latents.to(self.device, torch.float32)
        x = x * torch.sqrt(bn.running_var.float() + self.vae.config.batch_norm_eps) + bn.running_mean.float()
        x = unpack_patches(x, rows, cols)
        return to_uint8_images(self.vae.decode(x.to(self.vae.dtype), return_dict=False)[0])
