"""The checks that `learner.driver.placement.check_where_placed` runs as Ray tasks in a bundle of each pool, on the node
where that pool's actors will run. Each task imports this module afresh in a worker process of its own, so it imports
only what the checks need, never the actor classes."""

from __future__ import annotations

from typing import Any

import ray

from cluster.config import JobConfig
from learner.driver.inputs import inputs_here, model_inputs, scorer_inputs
from learner.driver.preflight import lora_targets_here, model_here, scorer_here, writable_here


def learner_node(cfg: JobConfig, dry_run: bool) -> str:
    """The transformer (downloaded unless `dry_run`) and the LoRA targets in it, found here."""
    downloads = inputs_here(model_inputs(cfg, ("transformer",)), dry_run)
    folder = model_here(cfg, ("transformer",))
    lora_targets_here(cfg)
    return "; ".join([*downloads, f"transformer at {folder}"])


def rollout_node(cfg: JobConfig, dry_run: bool) -> str:
    """Every part of the model (downloaded unless `dry_run`), found here."""
    downloads = inputs_here(model_inputs(cfg), dry_run)
    return "; ".join([*downloads, f"model at {model_here(cfg)}"])


def scorer_node(name: str, options: dict[str, Any], field: str, dry_run: bool) -> str:
    """The scorer's weights (downloaded unless `dry_run`) found here, and its options accepted."""
    downloads = inputs_here(scorer_inputs(name, options, field), dry_run)
    scorer_here(name, options, field)
    return "; ".join([*downloads, "options and weights found"])


def storage_node(storage: str) -> None:
    """A probe file written and removed in the checkpoint storage, from here."""
    node = f" on node {ray.get_runtime_context().get_node_id()[:8]} ({ray.util.get_node_ip_address()})"
    writable_here("checkpoint.storage", storage, node)
