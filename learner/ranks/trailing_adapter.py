"""A learner rank's trailing adapter: a second LoRA adapter that follows θ by soft updates (nft's old adapter, awm's
prox adapter; the objective names it and gives its schedule).

It is kept as a state (peft LoRA keys, on the rank's device) and swapped into the LoRA parameters for its own
forwards; θ goes back bit for bit afterwards, so DeepSpeed's ZeRO-2 state never sees it (objectives with a trailing
adapter refuse ZeRO-3 in their config check).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

from learner.objectives.final_sample_math import soft_update
from rollout.policy import apply_policy_state, policy_state


class TrailingAdapter:
    """The trailing adapter's weights; it starts at θ."""

    def __init__(self, name: str, initial: Mapping[str, torch.Tensor], device: torch.device) -> None:
        self.name = name
        self.weights = {k: v.to(device, copy=True) for k, v in initial.items()}

    @contextlib.contextmanager
    def active(self, module: torch.nn.Module) -> Iterator[None]:
        """The trailing weights in the module's LoRA parameters inside the block, θ's back after it (bit-exact)."""
        current = {k: v.detach().clone() for k, v in policy_state(module, "lora").items()}
        apply_policy_state(module, self.weights, "lora")
        try:
            yield
        finally:
            apply_policy_state(module, current, "lora")

    @torch.no_grad()
    def follow(self, module: torch.nn.Module, decay: float) -> None:
        """θ_trail ← decay·θ_trail + (1 − decay)·θ, after an applied optimizer step."""
        theta = policy_state(module, "lora")
        soft_update([self.weights[name] for name in theta], list(theta.values()), decay)

    def state(self) -> dict[str, torch.Tensor]:
        """CPU copies: what a checkpoint keeps (and, for nft, what the rollouts sample with)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.weights.items()}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take the weights of a checkpoint's `state()`."""
        device = next(iter(self.weights.values())).device
        self.weights = {k: v.to(device) for k, v in state.items()}
