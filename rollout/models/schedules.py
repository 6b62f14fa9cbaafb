"""The sampling schedule of each model family (noise levels from 1 down to 0), computed by diffusers' own scheduler."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

# The real models' scheduler configurations: FLUX.1-dev (resolution-dependent shift) and SD3.5 (static shift 3).
SCHEDULER_CONFIGS: dict[str, dict] = {
    "flux": dict(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
    "sd3": dict(shift=3.0),
}


def sigmas(family: str, num_steps: int, *, image_seq_len: int | None = None) -> torch.Tensor:
    """Noise levels t (float32, length num_steps + 1, from 1 down to 0) as the FLUX / SD3 pipelines schedule them.

    FLUX shifts the schedule by the number of packed image tokens `image_seq_len` (required); SD3 ignores it.
    """
    if family not in SCHEDULER_CONFIGS:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(SCHEDULER_CONFIGS)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    config = SCHEDULER_CONFIGS[family]
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    if family == "flux":
        if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len < 1:
            raise ValueError(f"flux schedules need image_seq_len (packed image tokens) >= 1, got {image_seq_len!r}")
        # mu grows linearly in the token count: base_shift at base_image_seq_len, max_shift at max_image_seq_len
        # (diffusers' calculate_shift, as FluxPipeline computes it).
        base_len, max_len = config["base_image_seq_len"], config["max_image_seq_len"]
        slope = (config["max_shift"] - config["base_shift"]) / (max_len - base_len)
        mu = config["base_shift"] + (image_seq_len - base_len) * slope
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu)
    else:
        scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.to(device="cpu", dtype=torch.float32).clone()
