"""Qwen-Image adapter: Qwen2.5-VL conditioning (the last hidden layer of the prompt in a system template, each prompt
at its own length), FLUX-style packed 2x2 latents of a 3D VAE with per-channel mean and std, and true classifier-free
guidance against the negative prompt " " with the combined velocity rescaled to the conditional one's norm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from rollout.models.contract import Conditioning, FlowModel, PromptEmbeds, sigma_batch, to_uint8_images, unpack_patches

TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
TEMPLATE_TOKENS = 34  # what the pipeline drops of each prompt's hidden states: the template's prefix (real tokenizer)
TOKENIZER_MAX_LENGTH = 1024


class QwenImageModel(FlowModel):
    """Qwen-Image as QwenImagePipeline runs it, latents kept packed: (B, (H/16)*(W/16), 4*16)."""

    family = "qwen_image"
    pipeline = "QwenImagePipeline"
    true_cfg = True
    negative_prompt = " "  # the negative prompt Qwen-Image is run with (an empty one encodes to nothing)
    default_max_sequence_length = 512
    components = {
        "tokenizer": ("text", Qwen2Tokenizer),
        "text_encoder": ("text", Qwen2_5_VLForConditionalGeneration),
        "vae": ("vae", AutoencoderKLQwenImage),
        "transformer": ("transformer", QwenImageTransformer2DModel),
    }

    @property
    def latent_channels(self) -> int:
        if self.vae is not None:
            return self.vae.config.z_dim
        return self.transformer.config.in_channels // 4 if self.transformer is not None else 16

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample) if self.vae is not None else 8

    def _latent_channels_from_transformer(self) -> int:
        return self.transformer.config.in_channels // 4

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """The last hidden states of each prompt in the template, its first 34 tokens dropped, at most
        max_sequence_length tokens; rows padded to the longest with `mask` marking the real tokens."""
        self._require("text")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokenizer, encoder = self.modules["tokenizer"], self.modules["text_encoder"]
        tokens = tokenizer([TEMPLATE.format(p) for p in prompts], max_length=TOKENIZER_MAX_LENGTH + TEMPLATE_TOKENS,
                           padding=True, truncation=True, return_tensors="pt").to(self.device)
        hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                         output_hidden_states=True).hidden_states[-1]
        rows = [h[m.bool()][TEMPLATE_TOKENS:][:self.max_sequence_length]
                for h, m in zip(hidden, tokens.attention_mask)]
        parts = [PromptEmbeds(r[None].to(self.dtype), r.new_zeros(1, 0, dtype=self.dtype)) for r in rows]
        return PromptEmbeds.cat(parts)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        return (batch, self.image_seq_len(height, width), 4 * self.latent_channels)

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
        """For g > 1, `c = v_u + g·(v_c − v_u)` rescaled per token to the norm of `v_c` (one batched forward over
        [negative, positive], padded to a common text length); else `v_c`."""
        self._require("transformer")
        if latents.ndim != 3:
            raise ValueError(f"Qwen-Image latents must be packed (B, tokens, channels), got {tuple(latents.shape)}")
        batch, tokens, _ = latents.shape
        timestep = sigma_batch(sigma, batch, self.device).to(self.dtype)
        x, timestep, cond = self._conditioned(latents.to(self.device, self.dtype), timestep, embeds, negative,
                                              guidance_scale)
        rows, cols = self._token_grid(tokens, image_size)
        out = self.transformer(hidden_states=x, timestep=timestep, guidance=None,
                               encoder_hidden_states=cond.embeds.prompt_embeds,
                               encoder_hidden_states_mask=cond.embeds.mask,
                               img_shapes=[[(1, rows, cols)]] * len(x), return_dict=False)[0].float()
        if not cond.guided:
            return out
        v_uncond, v_cond = out.chunk(2)
        combined = v_uncond + guidance_scale * (v_cond - v_uncond)
        return combined * (v_cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Unpack to (B, C, 1, H/8, W/8), undo the per-channel normalisation, decode the first frame, quantise."""
        self._require("vae")
        rows, cols = self._token_grid(latents.shape[1], (height, width))
        x = unpack_patches(latents.to(self.device, torch.float32), rows, cols).unsqueeze(2)  # one frame
        config = self.vae.config
        mean = torch.tensor(config.latents_mean, device=self.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(config.latents_std, device=self.device).view(1, -1, 1, 1, 1)
        x = x * std + mean
        return to_uint8_images(self.vae.decode(x.to(self.vae.dtype), return_dict=False)[0][:, :, 0])
