"""The sampling schedule (noise levels from 1 down to 0) of a model, computed by diffusers' own scheduler from the
model's scheduler config, the way each family's diffusers pipeline asks for it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler


@dataclass(frozen=True)
class PipelineRule:
    """How a family's pipeline calls `set_timesteps`: with explicit linear sigmas 1 … 1/N or with N steps only, and the
    defaults it falls back to for a resolution-dependent shift (mu) when the config leaves them out."""

    linear_sigmas: bool
    empirical_mu: bool = False  # FLUX.2: mu from the token count and the step count (`empirical_mu`)
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15


RULES: dict[str, PipelineRule] = {
    "flux": PipelineRule(linear_sigmas=True),  # FluxPipeline
    "sd3": PipelineRule(linear_sigmas=False, max_shift=1.16),  # StableDiffusion3Pipeline
    "flux2": PipelineRule(linear_sigmas=True, empirical_mu=True),  # Flux2KleinPipeline
    "qwen_image": PipelineRule(linear_sigmas=True),  # QwenImagePipeline
    "z_image": PipelineRule(linear_sigmas=True),  # ZImagePipeline
}

# What a model folder without scheduler/scheduler_config.json is taken to have: the configurations FLUX.1-dev,
# SD3.5, FLUX.2 [klein], Qwen-Image and Z-Image-Turbo ship.
DEFAULT_CONFIGS: dict[str, dict] = {
    "flux": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096),
    "sd3": dict(shift=3.0),
    "flux2": dict(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential", base_shift=0.5,
                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
    "qwen_image": dict(shift=1.0, use_dynamic_shifting=True, time_shift_type="exponential", base_shift=0.5,
                       max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02),
    "z_image": dict(shift=3.0, use_dynamic_shifting=False),
}


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's shift: two lines in the token count L (fitted at 10 and 200 steps), interpolated linearly in the
    step count; above 4300 tokens the 200-step line alone."""
    at_200 = 0.00016927 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return at_200
    at_10 = 8.73809524e-05 * image_seq_len + 1.89833333
    slope = (at_200 - at_10) / 190.0
    return at_200 + slope * (num_steps - 200.0)


def read_config(folder: Path | str, family: str) -> dict:
    """The scheduler config of the model in `folder` (its scheduler/scheduler_config.json), or the family's default
    when the folder has none."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return dict(DEFAULT_CONFIGS[family])
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable scheduler config ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a scheduler config is a JSON object, got {type(config).__name__}")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def sigmas(family: str, num_steps: int, *, image_seq_len: int | None = None,
           config: Mapping | None = None) -> torch.Tensor:
    """Noise levels t (float32, length num_steps + 1, from 1 down to 0) as `family`'s pipeline schedules them with
    scheduler `config` (default: the family's default config).

    A config with dynamic shifting shifts the schedule by the number of image tokens `image_seq_len` (then required).
    """
    if family not in RULES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(RULES)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    rule = RULES[family]
    config = dict(DEFAULT_CONFIGS[family] if config is None else config)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    kwargs = {}
    if config.get("use_dynamic_shifting"):
        if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len < 1:
            raise ValueError(f"a schedule with dynamic shifting needs image_seq_len (image tokens) >= 1, "
                             f"got {image_seq_len!r}")
    if config.get("use_dynamic_shifting") and rule.empirical_mu:
        kwargs["mu"] = empirical_mu(image_seq_len, num_steps)
    elif config.get("use_dynamic_shifting"):
        # mu linear in the token count: base_shift at base_image_seq_len, max_shift at max_image_seq_len
        base_len = config.get("base_image_seq_len", rule.base_image_seq_len)
        max_len = config.get("max_image_seq_len", rule.max_image_seq_len)
        base_shift = config.get("base_shift", rule.base_shift)
        max_shift = config.get("max_shift", rule.max_shift)
        kwargs["mu"] = base_shift + (image_seq_len - base_len) * (max_shift - base_shift) / (max_len - base_len)
    if rule.linear_sigmas and not config.get("use_flow_sigmas"):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), **kwargs)
    else:
        scheduler.set_timesteps(num_steps, **kwargs)
    return scheduler.sigmas.to(device="cpu", dtype=torch.float32).clone()
