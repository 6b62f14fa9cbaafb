"""Third-party chatter off, so the job's own `[flowrl]` lines and real errors stand out: progress bars ("Loading
weights"), library warnings and INFO lines of transformers, diffusers, huggingface_hub, DeepSpeed and Ray.

The settings are environment variables, read by each library when it is imported: `quiet_runtime_env()` gives them to
every actor (cluster/pools.py) and `quiet_here()` sets them in this process before the libraries load. Errors still
show.
"""

from __future__ import annotations

import logging
import os

QUIET_ENV: dict[str, str] = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # the tqdm bars of huggingface_hub, transformers and diffusers
    "TRANSFORMERS_VERBOSITY": "error",  # e.g. the torchvision fallback warning of every CLIP image processor
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
RAY_LOGGING_LEVEL = logging.ERROR  # ray.init's logging_level: no "Started a local Ray instance", no token advice


def quiet_here() -> None:
    """Set QUIET_ENV in this process; a value the user set is kept."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def quiet_runtime_env() -> dict:
    """The runtime_env of every actor and task the job starts: QUIET_ENV, with the values this process has (so a
    variable the user set, e.g. TRANSFORMERS_VERBOSITY=info, reaches the actors too)."""
    return {"env_vars": {key: os.environ.get(key, value) for key, value in QUIET_ENV.items()}}


def name_deepspeed_accelerator() -> None:
    """DS_ACCELERATOR for this process (cuda when torch sees a GPU, else cpu), unless the user set it: DeepSpeed then
    skips the detection that warns "Setting accelerator to CPU"."""
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
