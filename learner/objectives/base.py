"""What every objective is: one class behind one small interface, and the statistics of an update's loss calls.

An objective says what the rollouts must return (`rollout_settings`), how many loss calls one micro-batch makes
(`calls_per_micro_batch`, DeepSpeed's accumulation count depends on it), how a micro-batch is built from the
iteration's groups (`micro_batch`), and runs those calls (`train`), each a loss, its statistics and one backward
through the `Trainee` a learner rank hands it. An objective may keep a trailing adapter: a second LoRA adapter that
follows θ by soft updates (`trailing_adapter` names it, `trailing_decay` is its schedule); `publishes_trailing` says
whether the rollouts sample with it instead of θ. Config relations an objective needs are its `problems`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, NamedTuple, Protocol

import torch

from cluster.config import JobConfig
from learner.objectives.batch import SampleRef
from learner.objectives.grpo_math import RatioStats
from rollout.models.contract import FlowModel, PromptEmbeds
from rollout.sampling.trajectory import SamplerSettings


class StepLoss(NamedTuple):
    """The loss of one call, its two terms (the objective's own and the reference penalty), and the ratio statistics
    of its samples (all zero for objectives without a ratio)."""

    loss: torch.Tensor
    policy: torch.Tensor
    kl: torch.Tensor
    ratio: RatioStats


def no_ratio() -> RatioStats:
    """The ratio statistics of a call that has no ratio (nft, awm)."""
    return RatioStats(torch.zeros(len(RatioStats.SUMS), dtype=torch.float64), torch.zeros((), dtype=torch.float64))


class UpdateStats:
    """Sums over the loss calls of one update, reducible over ranks: the losses per call, the ratio statistics over
    all (sample, step)."""

    LOSSES = ("calls", "loss", "policy_loss", "kl")

    def __init__(self) -> None:
        self.losses = torch.zeros(len(self.LOSSES), dtype=torch.float64)
        self.ratio_sums = torch.zeros(len(RatioStats.SUMS), dtype=torch.float64)
        self.max_ratio_dev = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def add(self, call: StepLoss) -> None:
        """Record one loss call."""
        self.losses += torch.tensor([1.0, float(call.loss), float(call.policy), float(call.kl)], dtype=torch.float64)
        self.ratio_sums += call.ratio.sums
        self.max_ratio_dev = torch.maximum(self.max_ratio_dev, call.ratio.max_dev)

    def reduce(self, all_reduce: Callable[[torch.Tensor, str], None] | None) -> None:
        """Combine with the other ranks in place: `all_reduce(tensor, "sum" | "max")`; None for one process."""
        if all_reduce is not None:
            all_reduce(self.losses, "sum")
            all_reduce(self.ratio_sums, "sum")
            all_reduce(self.max_ratio_dev, "max")

    def summary(self) -> dict[str, float]:
        """Means per call (loss, policy_loss, kl) and per (sample, step) (clip fraction, ratio, approx-KL; only when
        some call had a ratio)."""
        s = dict(zip(self.LOSSES, self.losses.tolist()))
        calls = max(s["calls"], 1.0)
        ratio = RatioStats(self.ratio_sums, self.max_ratio_dev)
        return {
            "loss": s["loss"] / calls,
            "policy_loss": s["policy_loss"] / calls,
            "kl": s["kl"] / calls,
            **(ratio.means() if self.ratio_sums[0] > 0 else {}),  # none without a ratio (nft, awm)
        }


class Trainee(Protocol):
    """What an objective trains through: a learner rank's model and its DeepSpeed step."""

    model: FlowModel  # the trained transformer (inside the engine) with the family's adapter
    negative: PromptEmbeds | None  # the empty prompt's embeddings, for true CFG
    policy_version: int  # optimizer updates applied so far

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one loss call and DeepSpeed's micro-step (it applies the update at the accumulation
        boundary)."""

    def reference(self) -> AbstractContextManager[FlowModel]:
        """The reference policy inside the block: the adapter switched off, or the frozen copy of full fine-tuning."""

    def trailing(self) -> AbstractContextManager[None]:
        """The trailing adapter's weights in the model inside the block, θ's back after it."""


class Objective(ABC):
    """One training objective; the registry (learner/objectives/registry.py) makes it from the job's config."""

    name: ClassVar[str]
    trailing_adapter: ClassVar[str | None] = None  # the second adapter's name, None when there is none
    publishes_trailing: ClassVar[bool] = False  # the rollouts sample with the trailing adapter instead of θ

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg

    @staticmethod
    def problems(cfg: JobConfig) -> list[str]:
        """The config relations this objective needs that do not hold, one line each (none by default)."""
        return []

    @abstractmethod
    def rollout_settings(self) -> SamplerSettings:
        """How the training rollouts sample and what they return (recorded steps or final samples)."""

    @property
    @abstractmethod
    def calls_per_micro_batch(self) -> int:
        """Loss calls (and backwards) one micro-batch makes."""

    @abstractmethod
    def micro_batch(self, groups: Sequence[Any], samples: Sequence[SampleRef], advantages: torch.Tensor,
                    device: torch.device | str) -> Any:
        """The samples' rollout data and advantages (aligned with `samples`) as one learner forward takes them."""

    @abstractmethod
    def train(self, trainee: Trainee, batch: Any, stats: UpdateStats) -> None:
        """The micro-batch's loss calls, each recorded in `stats` and followed by `trainee.backward`."""

    def trailing_decay(self, step: int) -> float:
        """d_k of the trailing adapter's soft update θ_trail ← d·θ_trail + (1 − d)·θ after optimizer step k."""
        raise NotImplementedError(f"{self.name} keeps no trailing adapter")
