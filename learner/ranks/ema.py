"""Exponential moving average of the trained weights, for evaluation and the exported checkpoint (docs/math.md,
"EMA").

The learner updates the average every `learner.ema.every` optimizer steps with decay min((1 + n)/(10 + n), 0.9),
n = the number of EMA updates made so far, so it warms up quickly from the initial weights. It lives on the CPU in
float32 whatever the training precision.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def ema_decay(num_updates: int, max_decay: float = 0.9) -> float:
    """Decay of EMA update number `num_updates` (0-based): min((1 + n)/(10 + n), max_decay)."""
    return min((1.0 + num_updates) / (10.0 + num_updates), max_decay)


class Ema:
    """EMA of named tensors (CPU float32), started from their current values."""

    def __init__(self, weights: Mapping[str, torch.Tensor], *, max_decay: float = 0.9) -> None:
        self.max_decay = max_decay
        self.num_updates = 0
        self.weights = {name: w.detach().to("cpu", torch.float32, copy=True) for name, w in weights.items()}

    @torch.no_grad()
    def update(self, weights: Mapping[str, torch.Tensor]) -> float:
        """ema ← decay·ema + (1 − decay)·w for every tensor; returns the decay used."""
        if set(weights) != set(self.weights):
            missing, extra = sorted(set(self.weights) - set(weights)), sorted(set(weights) - set(self.weights))
            raise ValueError(f"EMA update with other tensors: missing {missing[:3]}, unexpected {extra[:3]}")
        decay = ema_decay(self.num_updates, self.max_decay)
        for name, avg in self.weights.items():
            avg.mul_(decay).add_(weights[name].detach().to("cpu", torch.float32), alpha=1.0 - decay)
        self.num_updates += 1
        return decay

    def state_dict(self) -> dict[str, Any]:
        """The averaged tensors (copies) and the update count, for checkpoints."""
        return {"weights": {k: v.clone() for k, v in self.weights.items()}, "num_updates": self.num_updates,
                "max_decay": self.max_decay}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from `state_dict` (same tensor names)."""
        if set(state["weights"]) != set(self.weights):
            raise ValueError("the EMA state holds other tensors than this model's trained weights")
        self.weights = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state["weights"].items()}
        self.num_updates = int(state["num_updates"])
        self.max_decay = float(state["max_decay"])
