"""Checkpoints: one folder per iteration, written atomically (temporary folder + rename), tensors in safetensors and
everything else in JSON — nothing is ever unpickled.

    <checkpoint.storage, default output_dir/checkpoints>/iter-000004/
        learner-rank0.safetensors    each learner rank's weights, optimizer (ZeRO partition), EMA, counters ...
        learner-rank0.json           ... and the non-tensor structure around them, written by that rank itself
        lora/                        the exported LoRA (EMA weights when EMA is on), for `pipe.load_lora_weights(dir)`,
                                     written by rank 0
        trainer.json                 iteration, policy version, prompt cursor, advantage statistics, config: written
                                     by the driver last, once every shard is there

The ranks write their shards into a temporary folder (`begin_checkpoint`); the driver, which never holds model state,
checks that every shard is there, writes `trainer.json` and renames the folder into place (`finish_checkpoint`). A
run stopped mid-write leaves the previous checkpoint intact and no folder that looks complete; on a cluster the
storage must be a folder every learner node and the driver can reach.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cluster.config import JobConfig

CHECKPOINT_NAME = re.compile(r"^iter-(\d{6})$")
TRAINER_FILE = "trainer.json"


class CheckpointError(ValueError):
    """A folder given to resume from is not a complete checkpoint of this project."""


# ---------------------------------------------------------------------------------------------------------------------
# Nested state <-> (flat tensors, JSON skeleton)

class Live:
    """Stands for a value that is not data (DeepSpeed's loss scaler, its parameter-fragment maps): such values follow
    from the config and the model, so `fill_live` takes them from the freshly built object when the state is loaded."""

    def __repr__(self) -> str:
        return "<taken from the live object on load>"


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able skeleton of `obj`; its tensors go into `tensors` under generated names."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, tensors)] for k, v in obj.items()]}  # keeps int keys (optimizers)
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__": [_flatten(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return {"__live__": type(obj).__name__}


def _unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: _unflatten(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [_unflatten(v, tensors) for v in skeleton["__list__"]]
        if "__tuple__" in skeleton:
            return tuple(_unflatten(v, tensors) for v in skeleton["__tuple__"])
        if "__live__" in skeleton:
            return Live()
    return skeleton


def fill_live(saved: Any, live: Any) -> Any:
    """`saved` with every `Live` placeholder replaced by the value at the same place in `live`."""
    if isinstance(saved, Live):
        return live
    if isinstance(saved, dict) and isinstance(live, dict):
        return {k: fill_live(v, live.get(k)) for k, v in saved.items()}
    if isinstance(saved, (list, tuple)) and isinstance(live, (list, tuple)) and len(saved) == len(live):
        return type(saved)(fill_live(s, x) for s, x in zip(saved, live))
    return saved


def save_tree(stem: Path, obj: Any) -> None:
    """Write a nested state as `<stem>.safetensors` + `<stem>.json`."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(obj, tensors)
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(skeleton))


def load_tree(stem: Path) -> Any:
    """Read what `save_tree` wrote."""
    return _unflatten(json.loads(stem.with_suffix(".json").read_text()), load_file(str(stem.with_suffix(".safetensors"))))


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint folders


def checkpoint_root(cfg: JobConfig) -> Path:
    """Where the job's checkpoints go: `checkpoint.storage`, or output_dir/checkpoints."""
    return Path(cfg.checkpoint.storage) if cfg.checkpoint.storage else Path(cfg.output_dir) / "checkpoints"


def rank_stem(folder: Path | str, rank: int) -> Path:
    """The shard of learner rank `rank` in a checkpoint folder (`save_tree` adds .safetensors and .json)."""
    return Path(folder) / f"learner-rank{rank}"


def begin_checkpoint(cfg: JobConfig, iteration: int) -> Path:
    """A fresh temporary folder for the checkpoint of `iteration`, for the ranks to write their shards into; the
    leftovers of a writer killed earlier go first (they never count as checkpoints)."""
    root = checkpoint_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-iter-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-iter-{iteration:06d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def write_trainer(folder: Path, trainer: dict[str, Any]) -> None:
    """The driver's part of a checkpoint, written after every shard: what makes the folder a checkpoint."""
    (folder / TRAINER_FILE).write_text(json.dumps(trainer, indent=1))


def finish_checkpoint(cfg: JobConfig, tmp: Path, iteration: int, trainer: dict[str, Any], world_size: int) -> Path:
    """Check that every rank's shard is in `tmp`, write trainer.json, rename the folder into place, and keep only the
    newest `checkpoint.keep_last`; the temporary folder goes whatever fails."""
    final = tmp.parent / f"iter-{iteration:06d}"
    try:
        missing = [rank for rank in range(world_size)
                   if not all(rank_stem(tmp, rank).with_suffix(s).is_file() for s in (".safetensors", ".json"))]
        if missing:
            raise CheckpointError(f"{tmp}: learner ranks {missing} wrote no shard there; checkpoint.storage must be a "
                                  f"folder that every learner node and the driver see")
        write_trainer(tmp, dict(trainer, iteration=iteration, world_size=world_size,
                                config=cfg.model_dump(mode="json")))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(tmp.parent)[:-cfg.checkpoint.keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_NAME.match(p.name) and (p / TRAINER_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(cfg: JobConfig, resume: str) -> Path | None:
    """The checkpoint folder `resume` names: None for 'none', the newest for 'auto' (None if there is none)."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(checkpoint_root(cfg))
        return found[-1] if found else None
    folder = Path(resume)
    what = f"resume {resume!r} (--resume or checkpoint.resume)"
    allowed = f"expected a checkpoint folder like {checkpoint_root(cfg)}/iter-000004, 'auto' or 'none'"
    if not folder.is_dir():
        raise CheckpointError(f"{what}: no such folder; {allowed}")
    if not (folder / TRAINER_FILE).is_file():
        raise CheckpointError(f"{what}: not a checkpoint folder (no {TRAINER_FILE}); {allowed}")
    try:
        trainer = json.loads((folder / TRAINER_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / TRAINER_FILE}: unreadable ({e}); the checkpoint is damaged, resume from "
                              f"another one") from None
    ranks = trainer.get("world_size") if isinstance(trainer, dict) else None
    if ranks != cfg.learner.num_actors:
        raise CheckpointError(f"{what}: written by {ranks} learner ranks, this job has learner.num_actors = "
                              f"{cfg.learner.num_actors}; they must match to resume")
    return folder


def load_trainer(folder: Path, world_size: int) -> dict[str, Any]:
    """The driver's part of a checkpoint written with the same number of learner ranks (each rank reads its own)."""
    trainer = json.loads((folder / TRAINER_FILE).read_text())
    if trainer.get("world_size") != world_size:
        raise CheckpointError(f"{folder} was written by {trainer.get('world_size')} learner ranks; this job has "
                              f"{world_size} (learner.num_actors must match to resume)")
    return trainer


def export_lora(cfg: JobConfig, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Write a LoRA state (peft names) in the layout `pipe.load_lora_weights(folder)` reads, alpha included."""
    from peft import LoraConfig

    import diffusers

    from rollout.models.loading import adapter

    Pipeline = getattr(diffusers, adapter(cfg.model.family).pipeline)  # its save_lora_weights: what it loads
    lora = cfg.learner.lora
    metadata = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules)).to_dict()
    metadata = json.loads(json.dumps(metadata, default=list))  # sets -> lists: the metadata must be JSON
    Pipeline.save_lora_weights(str(folder), transformer_lora_layers={k: v.contiguous() for k, v in state.items()},
                               transformer_lora_adapter_metadata=metadata)
