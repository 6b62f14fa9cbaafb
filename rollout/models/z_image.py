"""Z-Image adapter: Qwen3 conditioning (the second-to-last hidden layer of each prompt in the chat template, at its own
length), (B, C, H/8, W/8) latents of the FLUX VAE that the transformer patchifies itself, a transformer that takes
lists of samples and time 1 − t and predicts −v, and Z-Image's guidance `v_c + g·(v_c − v_u)` (g = 0: none, as the
distilled Turbo model runs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, ZImageTransformer2DModel
from transformers import Qwen2Tokenizer, Qwen3Model

from rollout.models.contract import Conditioning, FlowModel, PromptEmbeds, sigma_batch


class ZImageModel(FlowModel):
    """Z-Image as ZImagePipeline runs it (CFG truncation and renormalisation off, the pipeline's defaults)."""

    family = "z_image"
    pipeline = "ZImagePipeline"
    true_cfg = True
    negative_first = False  # its guided forward takes the positive rows first
    default_max_sequence_length = 512
    components = {
        "tokenizer": ("text", Qwen2Tokenizer),
        "text_encoder": ("text", Qwen3Model),
        "vae": ("vae", AutoencoderKL),
        "transformer": ("transformer", ZImageTransformer2DModel),
    }

    def _latent_channels_from_transformer(self) -> int:
        return self.transformer.config.in_channels

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Each prompt in the chat template (thinking on, as the pipeline asks), padded to max_sequence_length; the
        second-to-last hidden states of its real tokens; rows padded to the longest, `mask` marking the real tokens."""
        self._require("text")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokenizer, encoder = self.modules["tokenizer"], self.modules["text_encoder"]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True) for p in prompts]
        tokens = tokenizer(texts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                           return_tensors="pt").to(self.device)
        mask = tokens.attention_mask.bool()
        hidden = encoder(input_ids=tokens.input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return PromptEmbeds.cat([PromptEmbeds(h[m][None].to(self.dtype), h.new_zeros(1, 0, dtype=self.dtype))
                                 for h, m in zip(hidden, mask)])

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        self._check_size(height, width)
        return (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    @staticmethod
    def _rows(embeds: PromptEmbeds) -> list[torch.Tensor]:
        """Each sample's caption features at its own length."""
        if embeds.mask is None:
            return list(embeds.prompt_embeds.unbind(0))
        return [e[m] for e, m in zip(embeds.prompt_embeds, embeds.mask)]

    def guides(self, guidance_scale: float) -> bool:
        return float(guidance_scale) > 0.0

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
        """For g > 0, `v_c + g·(v_c − v_u)` (one forward over the positive then the negative samples), else `v_c`;
        the model's output is −v. `image_size` is ignored (the latent carries its size)."""
        self._require("transformer")
        if latents.ndim != 4:
            raise ValueError(f"Z-Image latents must be (B, C, H/8, W/8), got shape {tuple(latents.shape)}")
        batch = latents.shape[0]
        time = 1 - sigma_batch(sigma, batch, self.device)  # the model's time runs from 0 (noise) to 1 (image)
        x, time, cond = self._conditioned(latents.to(self.device, self.dtype), time, embeds, negative, guidance_scale)
        out = self.transformer(list(x.unsqueeze(2).unbind(0)), time.to(self.dtype), self._rows(cond.embeds),
                               return_dict=False)[0]
        out = -torch.stack([o.float() for o in out]).squeeze(2)
        if not cond.guided:
            return out
        v_cond, v_uncond = out.chunk(2)
        return v_cond + guidance_scale * (v_cond - v_uncond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Undo the VAE scaling and shift, decode, and quantise to uint8 (B, H, W, 3)."""
        self._require("vae")
        return self._decode_scaled(latents)
