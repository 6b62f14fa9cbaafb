"""The learner rank's part of the forward-process objectives (nft, awm): a second LoRA adapter that follows θ by soft
updates (nft: the old adapter the rollouts sample with; awm: the prox adapter), and the training calls on final
samples. A mixin of learner/ranks/actor.py's LearnerActor, whose engine, model and counters it uses.

The second adapter is kept as a state (peft LoRA keys, on the rank's device) and swapped into the LoRA parameters
around its forwards; θ goes back bit for bit, so DeepSpeed's ZeRO-2 state never sees it (ZeRO-3 is refused in the
config).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from learner.objectives.final_batch import FinalBatch, forward_step_loss, noised_inputs
from learner.objectives.final_sample_math import old_adapter_decay, prox_adapter_decay, soft_update
from learner.objectives.grpo_loss import UpdateStats, adapter_disabled
from rollout.sampling.forward import guided_velocity
from rollout.policy import apply_policy_state, policy_state


class ForwardTraining:
    """Methods of LearnerActor for nft and awm; `self.second` is None for grpo."""

    cfg: Any
    engine: Any
    model: Any
    module: torch.nn.Module
    negative: Any
    optimizer_steps: int
    second: dict[str, torch.Tensor] | None

    def _train_final(self, fb: FinalBatch, stats: UpdateStats) -> None:
        """One (micro-batch, noise level) call per trained level: loss, backward and DeepSpeed's micro-step."""
        lc, s = self.cfg.learner, fb.settings
        inputs = noised_inputs(fb, lc.objective, self.cfg.trained_steps, self.cfg.seed, self.optimizer_steps)

        def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided_velocity(self.model, x_t, t, fb.embeds, self.negative, s)

        with torch.no_grad(), self._second_adapter():
            v_second = [velocity(x_t, t) for t, x_t, _ in inputs]
        for (t, x_t, v), v_old in zip(inputs, v_second):
            v_ref = None
            if lc.beta > 0:
                with torch.no_grad(), adapter_disabled(self.module):
                    v_ref = velocity(x_t, t)
            call = forward_step_loss(lc, fb, t, x_t, v, velocity(x_t, t), v_old, v_ref)
            self.engine.backward(call.loss)
            self.engine.step()  # applies the update only at the accumulation boundary
            stats.add(call)

    @contextlib.contextmanager
    def _second_adapter(self) -> Iterator[None]:
        """The second adapter's weights in the LoRA parameters inside the block, θ's back after it (bit-exact)."""
        current = {k: v.detach().clone() for k, v in policy_state(self.module, "lora").items()}
        apply_policy_state(self.module, self.second, "lora")
        try:
            yield
        finally:
            apply_policy_state(self.module, current, "lora")

    @torch.no_grad()
    def _follow_theta(self) -> None:
        """After applied optimizer step k: θ_second ← d_k·θ_second + (1 − d_k)·θ (nft's or awm's schedule)."""
        if self.second is None:
            return
        lc, k = self.cfg.learner, self.optimizer_steps
        decay = old_adapter_decay(k, lc.old_adapter_schedule) if lc.objective == "nft" else prox_adapter_decay(k)
        theta = policy_state(self.module, "lora")
        soft_update([self.second[name] for name in theta], list(theta.values()), decay)

    def second_state(self) -> dict[str, torch.Tensor] | None:
        """CPU copies of the second adapter (None for grpo): what nft publishes, and what a checkpoint keeps."""
        return None if self.second is None else {k: v.detach().to("cpu", copy=True) for k, v in self.second.items()}
