"""The DeepSpeed side of a learner rank: the engine's config from the job's, and the transformer inside the engine as
the model adapter calls it.

Gradient accumulation: every rank runs M micro-batches x K loss calls per optimizer update (M =
images_per_iteration / (updates_per_iteration x ranks x micro_batch_size), K = the objective's
`calls_per_micro_batch`: GRPO's recorded steps, nft's and awm's noise levels) and calls `engine.backward` once per
call; DeepSpeed divides by its accumulation count M·K and averages over ranks, so an update's gradient is the mean
over its micro-batches and calls.
"""

from __future__ import annotations

from typing import Any

import torch

from cluster.config import JobConfig

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def micro_batches_per_update(cfg: JobConfig) -> int:
    """M: micro-batches per rank per optimizer update (fixed: DeepSpeed's accumulation count depends on it)."""
    lc = cfg.learner
    return cfg.data.images_per_iteration // (lc.updates_per_iteration * lc.num_actors * lc.micro_batch_size)


def deepspeed_config(cfg: JobConfig, calls_per_micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed config of the job: ZeRO stage, precision, clipping, and M·K accumulation steps per update."""
    lc = cfg.learner
    return {
        "train_micro_batch_size_per_gpu": lc.micro_batch_size,
        "gradient_accumulation_steps": micro_batches_per_update(cfg) * calls_per_micro_batch,
        "gradient_clipping": lc.max_grad_norm,
        "zero_optimization": {"stage": lc.zero_stage},
        # a non-finite gradient norm skips the step (DeepSpeed checks it for fp32 always, for bf16 only with this)
        "bf16": {"enabled": lc.precision == "bf16", "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: DeepSpeed's own would JIT-compile FusedAdam
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class EngineForward:
    """The transformer as `FlowModel.velocity` sees it: calls run the DeepSpeed engine's forward (which arms its
    backward hooks), attributes such as `config` are the module's (the engine's own `config` is DeepSpeed's)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine.module, name)
