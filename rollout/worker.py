"""`RolloutWorker`: the Ray actor that holds one model (text encoders, VAE, transformer + the policy's LoRA) and samples
whole groups with `RolloutSampler`, always with the newest published policy weights.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import ray
import torch

from cluster.config import JobConfig
from cluster.metrics import Recorder
from rollout.models.compile import compile_blocks
from rollout.models.contract import PromptEmbeds
from rollout.models.loading import load_configured
from rollout.policy import add_lora, apply_policy_state, policy_state
from rollout.prompts.groups import PromptGroup
from rollout.sampling.loop import RolloutSampler
from rollout.sampling.trajectory import GroupRecord, RecordSummary, SamplerSettings
from rollout.weights import PackedState, fetch_state


class RolloutWorker:
    """One rollout actor, created by `RolloutPool` through the pool helper (cluster.pools) with the rollout pool's
    resources and restarts.

    The constructor looks up the job's `WeightStore` by its name (when given) and loads the latest published weights,
    so a restarted or newly added actor is never stale; before each group it checks the store again.
    """

    def __init__(self, cfg: JobConfig, settings: SamplerSettings, store_name: str | None = None,
                 name: str = "rollout-0") -> None:
        """`settings`: how the training rollouts sample and what they return (the objective's `rollout_settings`).
        `name`: the actor's label in the metrics (kept across Ray's restarts of the actor)."""
        self._name = name
        self._metrics = Recorder(cfg.metrics.enabled)
        self._metrics.zero("rollout_images_total", actor=name)
        device = "cuda" if cfg.rollout.num_gpus_per_actor > 0 else "cpu"
        model = load_configured(cfg.model, dtype=getattr(torch, cfg.model.dtype), device=device)
        self._finetune = cfg.learner.finetune
        if self._finetune == "lora":
            add_lora(model.transformer, cfg.learner.lora)
        model.transformer.requires_grad_(False).eval()
        if cfg.model.compile:  # after the LoRA: the same compiled blocks as the learner's recompute
            compile_blocks(model.transformer)
        self._sampler = RolloutSampler(model, settings, cfg.seed)
        self._eval = cfg.eval
        self._store: Any = None
        if store_name is not None:
            try:
                self._store = ray.get_actor(store_name)
            except ValueError:
                raise ValueError(
                    f"no WeightStore named {store_name!r} in this Ray namespace: the driver creates it with "
                    f"rollout.weights.weight_store(key) before starting rollout workers"
                ) from None
        self._version = 0  # the base model (LoRA B = 0) until a version is published
        self.refresh_weights()

    def pid(self) -> int:
        """The actor's process id."""
        import os

        return os.getpid()

    def node(self) -> str:
        """The id of the Ray node the actor runs on."""
        return ray.get_runtime_context().get_node_id()

    def policy_version(self) -> int:
        """The version of the weights in force."""
        return self._version

    def load_weights(self, version: int, refs: list[ray.ObjectRef], metas: list) -> int:
        """Apply a published state if `version` is newer than the one in force, once all its buckets have arrived;
        return the version in force."""
        if version > self._version:
            started = time.perf_counter()
            state = fetch_state((refs, metas))
            apply_policy_state(self._sampler.model.transformer, state, self._finetune)
            self._version = version
            self._metrics.set("weight_load_seconds", time.perf_counter() - started, actor=self._name)
        return self._version

    def refresh_weights(self) -> int:
        """Load the store's latest version if it is newer; return the version in force. A version whose buffer went
        with its publisher (a learner rank that died) is skipped: the groups keep the version in force, tagged so,
        and the driver stops the job on the learner's death."""
        if self._store is not None:
            entry = ray.get(self._store.latest.remote(self._version))
            if entry is not None:
                try:
                    self.load_weights(*entry)
                except ray.exceptions.ObjectLostError:  # OwnerDiedError among them
                    pass
        return self._version

    @ray.method(num_returns=3)
    def sample_group(self, group: PromptGroup) -> tuple[RecordSummary, GroupRecord, torch.Tensor]:
        """One group sampled with the newest weights, tagged with their policy version, as three objects
        (rollout/sampled.py): its summary, its record without images, its images."""
        self.refresh_weights()
        started = time.perf_counter()
        record = self._sampler.sample_group(group, self._version)
        self._metrics.inc("rollout_images_total", len(group.seeds), actor=self._name)
        self._metrics.set("rollout_images_per_second", len(group.seeds) / (time.perf_counter() - started),
                          actor=self._name)
        return record.summary(), record.without_images(), record.images

    def sample_eval(self, prompts: Sequence[str], seeds: Sequence[int],
                    weights: PackedState | None = None) -> torch.Tensor:
        """Evaluation images (ODE, eval.num_steps, fixed seeds): uint8 (B, H, W, 3).

        With the newest policy weights, or with `weights`, a packed state (the EMA weights) applied for this call only.
        """
        self.refresh_weights()
        transformer = self._sampler.model.transformer
        policy = None
        if weights is not None:
            policy = {k: v.clone() for k, v in policy_state(transformer, self._finetune).items()}
            apply_policy_state(transformer, fetch_state(weights), self._finetune)
        try:
            return self._sampler.sample_eval(prompts, seeds, num_steps=self._eval.num_steps,
                                             batch_size=self._eval.batch_size)
        finally:
            if policy is not None:
                apply_policy_state(transformer, policy, self._finetune)

    def negative_embeds(self) -> PromptEmbeds | None:
        """The empty prompt's embeddings (CPU) that true CFG needs in the learner's forward; None for FLUX."""
        negative = self._sampler.negative
        return negative.to("cpu") if negative is not None else None
