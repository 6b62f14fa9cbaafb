"""The learner: one Ray actor per rank running DeepSpeed ZeRO (stage 2 or 3) on the transformer.

Each rank loads the transformer only (prompt embeddings travel with the rollouts), adds the job's peft LoRA (or
trains all weights), and wraps it in a DeepSpeed engine with torch's AdamW, gradient-norm clipping and fp32/bf16.
The driver builds the group and calls, on all ranks at once:

    group = RankGroup(LearnerActor, cfg.learner)
    ray.get(group.run("setup", cfg, negative=negative_embeds, store=weight_store(key)))
    metrics = ray.get(group.run("train_iteration", groups_ref, rewards_ref))[0]

What is trained is the job's objective (learner/objectives/registry.py): the rank builds each micro-batch with it and
lets it run the loss calls through the rank as its `Trainee` (the model, the reference policy, the trailing adapter
and DeepSpeed's backward). Gradient accumulation: learner/ranks/engine.py. Weights out: after an iteration's updates
rank 0 publishes the policy state (peft LoRA keys, or the full state dict; the trailing adapter when the objective
says the rollouts sample with it) to the WeightStore in buckets of at most learner.publish_bucket_mb, version =
optimizer updates applied so far; under ZeRO-3 every rank takes part in gathering each bucket. The EMA (rank 0, CPU
float32) has the same keys. The recorded log-probs are reproduced exactly only when the learner computes as the
rollout did: `learner.precision` matching `model.dtype`, and `lora.dropout` 0 (the module then stays in eval mode, as
for sampling).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from cluster.config import JobConfig
from cluster.metrics import Recorder
from cluster.quiet import name_deepspeed_accelerator
from learner.objectives.base import UpdateStats
from learner.objectives.batch import batch_advantages, groups_of_rank, sample_order, sort_batch, update_plan
from learner.objectives.grpo_math import nonzero_advantage_indices
from learner.objectives.registry import objective_for
from learner.ranks.checkpoint import export_lora, fill_live, load_tree, rank_stem, save_tree
from learner.ranks.ema import Ema
from learner.ranks.engine import PRECISION_DTYPES, EngineForward, deepspeed_config, micro_batches_per_update
from learner.ranks.lr_schedule import configured_lr
from learner.ranks.process_group import DistributedActor
from learner.ranks.records import Delivered, fetch_records, summary_of
from learner.ranks.trailing_adapter import TrailingAdapter
from rollout.models.compile import compile_blocks
from rollout.models.contract import FlowModel, PromptEmbeds
from rollout.models.loading import load_configured
from rollout.policy import adapter_disabled, add_lora, apply_policy_state, policy_state
from rollout.weights import PackedState, publish_weights, put_buckets, split_buckets


class LearnerActor(DistributedActor):
    """One learner rank: the DeepSpeed engine, the optimizer-step and policy-version counters, (rank 0) the EMA, and
    the objective's trailing adapter if it keeps one. It is the objective's `Trainee`."""

    # ---------------------------------------------------------------------------------------------------------------
    # Set-up

    def setup(self, cfg: JobConfig, negative: PromptEmbeds | None = None, store: Any = None) -> dict[str, Any]:
        """Load the transformer, add the adapter, start DeepSpeed (a collective: call on all ranks at once).

        `negative`: the empty prompt's embeddings (one row), needed for true CFG (SD3). `store`: the job's
        WeightStore actor; without it nothing is published. Returns a short description of the set-up.
        """
        name_deepspeed_accelerator()
        import deepspeed

        started = time.perf_counter()
        # DeepSpeed's collectives call torch.distributed functions that torch deprecates: one warning per call
        warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed",
                                category=FutureWarning)
        self.cfg, lc = cfg, cfg.learner
        self.objective = objective_for(cfg)
        on_gpu = lc.num_gpus_per_actor > 0
        if on_gpu and not torch.cuda.is_available():
            raise RuntimeError("learner.num_gpus_per_actor > 0 but this learner actor sees no CUDA device")
        self.device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        if not on_gpu:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skips a 30-50 s JIT build, same results
        self.init_process_group("nccl" if on_gpu else "gloo")  # bound to the node address only (learner/ranks/process_group.py)
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)  # takes the group as is

        dtype = PRECISION_DTYPES[lc.precision]
        self.model = self._load_model(dtype)
        if self.model.true_cfg and cfg.sampler.guidance_scale != 1.0 and negative is None:
            raise ValueError(f"{cfg.model.family} samples with true CFG (guidance_scale {cfg.sampler.guidance_scale}):"
                             f" the learner needs the negative prompt embeddings; pass negative= to setup")
        self.negative = negative.to(self.device) if negative is not None else None
        transformer = self.model.transformer
        torch.manual_seed(cfg.seed)  # the same initial adapter on every rank and in every run
        if lc.finetune == "lora":
            transformer.requires_grad_(False)
            add_lora(transformer, lc.lora)
            transformer.train(lc.lora.dropout > 0)  # eval mode otherwise: the sampling forward has no dropout
        else:
            transformer.requires_grad_(True)
        if lc.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if cfg.model.compile:  # after LoRA and checkpointing, before DeepSpeed wraps it: as the rollout samples
            compile_blocks(transformer)
        self.frozen: FlowModel | None = None  # full fine-tuning's reference policy
        if lc.finetune == "full" and lc.kl_beta > 0:
            self.frozen = self._load_model(dtype)
            self.frozen.transformer.requires_grad_(False)

        trainable = [p for p in transformer.parameters() if p.requires_grad]
        num_trainable = sum(p.numel() for p in trainable)  # before ZeRO-3 partitions them
        optimizer = torch.optim.AdamW(trainable, lr=lc.lr, betas=tuple(lc.adam_betas), eps=lc.adam_eps,
                                      weight_decay=lc.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=transformer, optimizer=optimizer, config=deepspeed_config(cfg, self.objective.calls_per_micro_batch))
        self.model.transformer = EngineForward(self.engine)
        self.store = store
        self.metrics = Recorder(cfg.metrics.enabled)
        if self.rank == 0:
            self.metrics.zero("updates_skipped_total")
            self.metrics.zero("weight_sync_bytes_total")
        self.optimizer_steps = 0  # applied optimizer updates = the policy version
        self.iterations = 0
        trailing = self.objective.trailing_adapter
        initial = self._policy_state(everyone=trailing is not None)
        self.ema = Ema(initial) if lc.ema.enabled and self.rank == 0 else None
        self.trailing_adapter = TrailingAdapter(trailing, initial, self.device) if trailing is not None else None
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "device": str(self.device),
            "trainable_parameters": num_trainable,
            "gradient_accumulation_steps": self.engine.gradient_accumulation_steps(),
            "setup_s": time.perf_counter() - started,
        }

    def _load_model(self, dtype: torch.dtype) -> FlowModel:
        return load_configured(self.cfg.model, dtype=dtype, device=str(self.device), parts=("transformer",))

    @property
    def module(self) -> torch.nn.Module:
        """The trained transformer itself (inside the engine)."""
        return self.engine.module

    @property
    def policy_version(self) -> int:
        """Number of optimizer updates applied so far: the version of the weights the rollouts sample with."""
        return self.optimizer_steps

    # ---------------------------------------------------------------------------------------------------------------
    # The objective's Trainee (learner/objectives/base.py)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one loss call and DeepSpeed's micro-step (the update applies at the accumulation boundary)."""
        self.engine.backward(loss)
        self.engine.step()

    @contextlib.contextmanager
    def reference(self) -> Iterator[FlowModel]:
        """The reference policy inside the block: the frozen copy of full fine-tuning, or this model with the adapter
        switched off."""
        if self.frozen is not None:
            yield self.frozen
            return
        with adapter_disabled(self.module):
            yield self.model

    def trailing(self) -> contextlib.AbstractContextManager[None]:
        """The trailing adapter's weights in the model inside the block."""
        return self.trailing_adapter.active(self.module)

    # ---------------------------------------------------------------------------------------------------------------
    # Training

    def train_iteration(
        self, groups: Sequence[Delivered],
        rewards: Sequence[Sequence[float] | torch.Tensor],
    ) -> dict[str, Any]:
        """One iteration: advantages over all its groups, `updates_per_iteration` optimizer updates, then publish.

        `groups` are the rollouts' `SampledGroup`s (a summary and a reference to the record) or the records
        themselves; `rewards[i]` is the (G,) weighted reward of `groups[i]`; order does not matter (the batch is
        sorted by group_id). The plan is made from the summaries alone; then the rank fetches the records of the
        samples it trains, and only those. If a record is lost (the node that held it left), no rank trains: every
        rank returns {"lost_groups": [ids]} so that the driver samples them again. Otherwise returns the advantage
        statistics and one metrics dict per update, identical on every rank.
        """
        started = time.perf_counter()
        cfg, lc = self.cfg, self.cfg.learner
        order = sorted(range(len(groups)), key=lambda i: summary_of(groups[i]).group_id)
        groups, rewards = [groups[i] for i in order], [rewards[i] for i in order]
        summaries, rewards = sort_batch([summary_of(g) for g in groups], rewards, cfg.trained_steps)
        adv, adv_stats = batch_advantages(summaries, rewards, std=lc.advantage_std, clip=lc.advantage_clip)
        samples = sample_order(summaries)
        num_micro = micro_batches_per_update(cfg)
        keep = None
        if lc.drop_zero_advantage:
            nonzero = nonzero_advantage_indices(adv)
            if len(nonzero) >= lc.updates_per_iteration * self.world_size * num_micro:
                keep = nonzero  # else too few samples carry signal to fill the fixed micro-batches: keep them all
        plan = update_plan(len(samples), num_updates=lc.updates_per_iteration, num_ranks=self.world_size,
                           micro_batches=num_micro, keep=keep)
        records, lost = fetch_records(groups, groups_of_rank(plan, samples, self.rank))
        lost = self._lost_anywhere(lost, len(groups))
        if lost:
            return {"lost_groups": [summaries[p].group_id for p in lost], "policy_version": self.policy_version}

        updates = []
        for update in plan:
            update_started = time.perf_counter()
            stats = UpdateStats()
            lr = configured_lr(self.optimizer_steps, lc, cfg.iterations)
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
            for positions in update[self.rank]:
                batch = self.objective.micro_batch(records, [samples[i] for i in positions], adv[positions],
                                                   self.device)
                self.objective.train(self, batch, stats)
            trained = adv[[i for share in update for positions in share for i in positions]]
            updates.append({**self._finish_update(stats), "lr": lr, "samples": float(trained.numel()),
                            "advantage_mean": float(trained.mean()),
                            "advantage_std": float(trained.std(correction=0))})
            self.metrics.observe("learner_step_seconds", time.perf_counter() - update_started, rank=self.rank)
        self.iterations += 1
        publish_started = time.perf_counter()
        published = self.publish()
        return {
            "iteration": self.iterations,
            "policy_version": self.policy_version,
            "published": published,
            "samples": len(samples),
            "samples_trained": len(samples) if keep is None else len(keep),
            **adv_stats,
            "updates": updates,
            "train_s": time.perf_counter() - started,
            "publish_s": time.perf_counter() - publish_started,
        }

    def _finish_update(self, stats: UpdateStats) -> dict[str, float]:
        """After an update's last micro-step: counters, EMA, and the update's metrics reduced over ranks."""
        if self.engine.micro_steps % self.engine.gradient_accumulation_steps():
            raise RuntimeError("an update ended off DeepSpeed's accumulation boundary: the micro-batch count changed")
        applied = bool(self.engine.was_step_applied())
        grad_norm = self.engine.get_global_grad_norm()
        if not applied and self.rank == 0:
            self.metrics.inc("updates_skipped_total")
        if applied:
            self.optimizer_steps += 1
            if self.trailing_adapter is not None:
                self.trailing_adapter.follow(self.module, self.objective.trailing_decay(self.optimizer_steps))
            if self.cfg.learner.ema.enabled and self.optimizer_steps % self.cfg.learner.ema.every == 0:
                state = self._policy_state(everyone=False)
                if self.ema is not None:
                    self.ema.update(state)
        stats.reduce(self._all_reduce if self.world_size > 1 else None)
        return {
            **stats.summary(),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "step_applied": float(applied),
            "policy_version": float(self.policy_version),
        }

    def _lost_anywhere(self, lost: list[int], num_groups: int) -> list[int]:
        """The batch positions whose record some rank could not fetch (a collective with several ranks)."""
        if self.world_size == 1:
            return lost
        flags = torch.zeros(num_groups)
        flags[lost] = 1.0
        self._all_reduce(flags, "max")
        return flags.nonzero().flatten().tolist()

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> None:
        import torch.distributed as dist

        work = tensor.to(self.device)
        dist.all_reduce(work, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        tensor.copy_(work.cpu())

    # ---------------------------------------------------------------------------------------------------------------
    # Weights out: publishing, EMA and the state a checkpoint needs

    def _gathered(self, params: list[torch.nn.Parameter], modifier_rank: int | None = None):
        """ZeRO-3: the full parameters on every rank inside the block (a collective); a no-op for ZeRO-2."""
        import deepspeed

        if self.cfg.learner.zero_stage != 3:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    def _policy_params(self) -> list[torch.nn.Parameter]:
        if self.cfg.learner.finetune == "lora":
            return [p for p in self.module.parameters() if p.requires_grad]
        return list(self.module.parameters())

    def _policy_state(self, everyone: bool) -> dict[str, torch.Tensor] | None:
        """CPU copies of the policy weights (peft LoRA keys, or the full state); all ranks must call (ZeRO-3 gathers).

        Returns the state on rank 0, and on the other ranks too when `everyone`; else None there.
        """
        with self._gathered(self._policy_params()):
            if self.rank != 0 and not everyone:
                return None
            state = policy_state(self.module, self.cfg.learner.finetune)
            return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def _policy_buckets(self) -> Iterator[dict[str, torch.Tensor]]:
        """The policy weights as CPU copies, a bucket of at most learner.publish_bucket_mb at a time (a LoRA adapter is
        gathered at once, then cut); every rank iterates (ZeRO-3 gathers each bucket), rank 0 gets the buckets."""
        bucket_bytes = int(self.cfg.learner.publish_bucket_mb * 2**20)
        if self.cfg.learner.finetune == "lora":
            if self.objective.publishes_trailing:  # the rollouts sample with the trailing adapter
                state = self.trailing_adapter.state() if self.rank == 0 else None
            else:
                state = self._policy_state(everyone=False)
            for bucket in split_buckets(state.items(), bucket_bytes) if state is not None else ():
                yield dict(bucket)
            return
        entries = list(self.module.state_dict(keep_vars=True).items())  # parameters unmaterialised under ZeRO-3

        def nbytes(t: torch.Tensor) -> int:
            return getattr(t, "ds_numel", t.numel()) * t.element_size()

        for bucket in split_buckets(entries, bucket_bytes, nbytes):
            with self._gathered([t for _, t in bucket if isinstance(t, torch.nn.Parameter)]):
                if self.rank == 0:
                    yield {name: t.detach().to("cpu", copy=True) for name, t in bucket}

    def publish(self) -> int | None:
        """Publish the current weights to the WeightStore as version = optimizer updates so far (rank 0; all call).

        Bucket by bucket: each is packed into one flat CPU buffer and put in the object store before the next is
        copied, so the publisher holds one bucket at a time. Returns the version published, or None (no store, or
        not rank 0).
        """
        started = time.perf_counter()
        buckets = self._policy_buckets()
        if self.rank != 0 or self.store is None:
            for _ in buckets:  # the other ranks take part in gathering
                pass
            return None
        sizes: list[int] = []

        def counted() -> Iterator[dict[str, torch.Tensor]]:
            for bucket in buckets:
                sizes.append(sum(t.numel() * t.element_size() for t in bucket.values()))
                yield bucket

        publish_weights(self.store, self.policy_version, counted())
        self.metrics.set("weight_sync_seconds", time.perf_counter() - started)
        self.metrics.inc("weight_sync_bytes_total", sum(sizes))
        return self.policy_version

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The policy weights as published (peft LoRA keys, or the full state), CPU copies; all ranks call."""
        return self._policy_state(everyone=True)

    def packed_ema(self) -> PackedState | None:
        """The EMA weights put in the object store in buckets, as rollout workers take them; None off rank 0 or when
        the EMA is off."""
        if self.ema is None:
            return None
        bucket_bytes = int(self.cfg.learner.publish_bucket_mb * 2**20)
        return put_buckets(dict(b) for b in split_buckets(self.ema.weights.items(), bucket_bytes))

    def optimizer_state(self) -> dict[str, Any]:
        """This rank's ZeRO optimizer state (its partition of the fp32 master weights and Adam moments)."""
        return self.engine.optimizer.state_dict()

    def counters(self) -> dict[str, int]:
        """Step counters: optimizer updates (= policy version), iterations, EMA updates."""
        return {"optimizer_steps": self.optimizer_steps, "iterations": self.iterations,
                "ema_updates": self.ema.num_updates if self.ema is not None else 0}

    def state(self) -> dict[str, Any]:
        """Everything this rank needs to resume: weights, its optimizer partition, EMA (rank 0), the trailing adapter
        (under its name, e.g. `old_adapter`), counters."""
        trailing = self.trailing_adapter
        return {"weights": self.trainable_state(), "optimizer": self.optimizer_state(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                **({f"{trailing.name}_adapter": trailing.state()} if trailing is not None else {}),
                "counters": self.counters(), "torch_rng": torch.get_rng_state()}  # only LoRA dropout draws from it

    def save_shard(self, folder: str) -> dict[str, Any]:
        """Write this rank's `state()` into a checkpoint folder (rank 0 also exports the EMA LoRA); all ranks call at
        once (ZeRO-3 gathers). Returns only the files' names and sizes: no model state goes to the caller."""
        state = self.state()
        stem = rank_stem(folder, self.rank)
        save_tree(stem, state)
        written = [stem.with_suffix(".safetensors"), stem.with_suffix(".json")]
        if self.rank == 0 and self.cfg.learner.finetune == "lora":
            export_lora(self.cfg, self.ema.weights if self.ema is not None else state["weights"], Path(folder) / "lora")
            written += sorted(p for p in (Path(folder) / "lora").rglob("*") if p.is_file())
        return {"rank": self.rank, "files": {p.name: p.stat().st_size for p in written}}

    def load_shard(self, folder: str) -> None:
        """Resume from this rank's shard of a checkpoint folder; all ranks call at once."""
        self.load_state(load_tree(rank_stem(folder, self.rank)))

    def load_state(self, state: dict[str, Any]) -> None:
        """Resume from this rank's `state()` (same world size and config); all ranks call at once."""
        with self._gathered(self._policy_params(), modifier_rank=0):
            apply_policy_state(self.module, state["weights"], self.cfg.learner.finetune)
        optimizer_states: list[Any] = [None] * self.world_size
        # values that are not data (loss scaler, fragment maps) come back as placeholders: take them from the engine
        optimizer_states[self.rank] = fill_live(state["optimizer"], self.engine.optimizer.state_dict())
        self.engine.optimizer.load_state_dict(optimizer_states, load_from_fp32_weights=True)
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if state.get("torch_rng") is not None:
            torch.set_rng_state(state["torch_rng"])
        self.optimizer_steps = int(state["counters"]["optimizer_steps"])
        self.iterations = int(state["counters"]["iterations"])
        if self.trailing_adapter is not None:
            self.trailing_adapter.load(state[f"{self.trailing_adapter.name}_adapter"])
