"""Checkpoints: one folder per iteration, written atomically (temporary folder + rename) and durably (fsync), tensors
in safetensors and everything else in JSON — nothing is ever unpickled.

    <checkpoint.storage, default output_dir/checkpoints>/iter-000004/
        learner-rank0.safetensors    each learner rank's weights, optimizer (ZeRO partition), EMA, counters ...
        learner-rank0.json           ... and the non-tensor structure around them, written by that rank itself
        lora/                        the exported LoRA (EMA weights when EMA is on), for `pipe.load_lora_weights(dir)`,
                                     written by rank 0
        trainer.json                 the run's id, iteration, policy version, prompt cursor, advantage statistics, the
                                     config, its training part and that part's fingerprint, and every other file of
                                     the folder with its size and sha256: written by the driver last

The ranks write their shards into a temporary folder (`begin_checkpoint`); the driver, which never holds model state,
checks that every shard is there, hashes and fsyncs every file, writes `trainer.json` and renames the folder into
place (`finish_checkpoint`). A run stopped mid-write leaves the previous checkpoint intact and no folder that looks
complete; on a cluster the storage must be a folder every learner node and the driver can reach.

Runs. Every run has an id, made when it starts fresh and kept when it resumes, in each of its checkpoints. Pruning
(`checkpoint.keep_last`), the leftovers of a killed writer and `--resume auto` concern the run's own checkpoints only;
no run replaces a folder of another. `resolve_resume`, run by the preflight before Ray starts and again by the job,
refuses a fresh run where checkpoints already are, takes the newest intact checkpoint of the newest checkpoint's run
for 'auto' (passing over damaged ones: a missing, truncated or changed file), and checks before any model loads that
the checkpoint has this job's number of learner ranks and its run's training config (`TRAINED_KEYS`), but for the keys
given with `--set` on this command line.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file

from cluster.config import JobConfig, RestartablePoolConfig

CHECKPOINT_NAME = re.compile(r"^iter-(\d{6})$")
TRAINER_FILE = "trainer.json"


class CheckpointError(ValueError):
    """A checkpoint this job cannot continue, or a checkpoint folder it may not write to."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint folder whose trainer.json cannot be read or whose files are not those it lists (missing,
    truncated, changed): `--resume auto` takes the run's previous checkpoint instead."""


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


def _storage_field(cfg: JobConfig) -> str:
    """The config field that places the checkpoints, for messages."""
    return "checkpoint.storage" if cfg.checkpoint.storage else "output_dir"


def rank_stem(folder: Path | str, rank: int) -> Path:
    """The shard of learner rank `rank` in a checkpoint folder (`save_tree` adds .safetensors and .json)."""
    return Path(folder) / f"learner-rank{rank}"


def new_run_id() -> str:
    """The id of a run that starts fresh, kept by every resume of it: what tells its checkpoints from another run's."""
    return uuid.uuid4().hex


def begin_checkpoint(cfg: JobConfig, iteration: int, run_id: str) -> Path:
    """A fresh temporary folder of run `run_id` for the ranks to write the shards of `iteration` into. The run's own
    leftovers of a writer killed earlier go first (they never count as checkpoints; another run's are left alone), and
    a checkpoint of `iteration` by another run is refused before any rank writes."""
    root = checkpoint_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".tmp-iter-*-{run_id}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    _claim(cfg, root / f"iter-{iteration:06d}", run_id)
    tmp = _temporary(root, iteration, run_id)
    tmp.mkdir()
    return tmp


def _temporary(root: Path, iteration: int, run_id: str) -> Path:
    """A new temporary folder name of run `run_id` in `root`: never a checkpoint, and the run's next
    `begin_checkpoint` removes whatever is left under it."""
    return root / f".tmp-iter-{iteration:06d}-{run_id}-{uuid.uuid4().hex[:8]}"


def _claim(cfg: JobConfig, final: Path, run_id: str) -> None:
    """`final` may become run `run_id`'s checkpoint: it is absent or already one of the run's. Another run's
    checkpoint, or a folder whose run cannot be told, is never replaced."""
    if not final.exists():
        return
    owner = run_of(final)
    if owner != run_id:
        whose = f"a checkpoint of run {owner}" if owner else "a folder of no run that can be told"
        raise CheckpointError(f"{final}: {whose} is there, which run {run_id} will not replace; two runs write to "
                              f"{_storage_field(cfg)} {checkpoint_root(cfg)}: give each run its own output_dir or "
                              f"checkpoint.storage")


def write_trainer(folder: Path, trainer: dict[str, Any]) -> None:
    """The driver's part of a checkpoint, written after every shard and flushed to storage: what makes the folder a
    checkpoint."""
    with open(folder / TRAINER_FILE, "w") as f:
        f.write(json.dumps(trainer, indent=1))
        f.flush()
        os.fsync(f.fileno())


def finish_checkpoint(cfg: JobConfig, tmp: Path, iteration: int, trainer: dict[str, Any], world_size: int) -> Path:
    """Check that every rank's shard is in `tmp`, list (size, sha256) and fsync every file, write trainer.json (the
    run is `trainer["run_id"]`), rename the folder into place durably, and keep only the run's newest
    `checkpoint.keep_last`; the temporary folder goes whatever fails."""
    final = tmp.parent / f"iter-{iteration:06d}"
    try:
        run_id = trainer.get("run_id")
        if not run_id:
            raise CheckpointError("the trainer state has no run_id; the driver passes its run's id (Job.run_id)")
        missing = [rank for rank in range(world_size)
                   if not all(rank_stem(tmp, rank).with_suffix(s).is_file() for s in (".safetensors", ".json"))]
        if missing:
            raise CheckpointError(f"{tmp}: learner ranks {missing} wrote no shard there; checkpoint.storage must be a "
                                  f"folder that every learner node and the driver see")
        _claim(cfg, final, run_id)
        files = seal_files(tmp)
        training = training_config(cfg)
        write_trainer(tmp, dict(trainer, iteration=iteration, world_size=world_size, files=files,
                                fingerprint=fingerprint(training), training_config=training,
                                config=cfg.model_dump(mode="json")))
        for folder in [*(p for p in tmp.rglob("*") if p.is_dir()), tmp]:
            _fsync_folder(folder)
        _put_in_place(tmp, final, iteration, run_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(cfg, run_id, iteration)
    return final


def _put_in_place(tmp: Path, final: Path, iteration: int, run_id: str) -> None:
    """Rename the complete `tmp` to `final` and fsync their folder, so that the rename outlives a power loss. A folder
    of the run already at `final` (one that `--resume auto` passed over as damaged) is moved aside first and removed
    after: a stop in between leaves the previous checkpoints and a leftover, never a mix."""
    aside = None
    if final.exists():
        aside = _temporary(final.parent, iteration, run_id)
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_folder(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (files created or renamed in it) to storage."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(cfg: JobConfig, run_id: str, iteration: int) -> None:
    """After run `run_id`'s checkpoint of `iteration`: the run's checkpoints of later iterations go (damaged ones that
    `--resume auto` passed over to continue from an earlier one), and of the others only the newest
    `checkpoint.keep_last` stay. Other runs' checkpoints are never touched."""
    own = list_checkpoints(checkpoint_root(cfg), run_id)
    later = [p for p in own if iteration_of(p) > iteration]
    older = [p for p in own if iteration_of(p) <= iteration][:-cfg.checkpoint.keep_last]
    for old in later + older:
        shutil.rmtree(old, ignore_errors=True)


def iteration_of(folder: Path) -> int:
    """The iteration of a checkpoint folder, from its name."""
    return int(CHECKPOINT_NAME.match(folder.name).group(1))


def list_checkpoints(root: Path, run_id: str | None = None) -> list[Path]:
    """Complete checkpoint folders under `root` (a trainer.json in place), oldest first; only run `run_id`'s when
    given."""
    if not root.is_dir():
        return []
    found = sorted((p for p in root.iterdir() if CHECKPOINT_NAME.match(p.name) and (p / TRAINER_FILE).is_file()),
                   key=lambda p: p.name)
    return found if run_id is None else [p for p in found if run_of(p) == run_id]


def read_trainer(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's trainer.json as a dict; CheckpointDamaged when it cannot be read as one."""
    path = folder / TRAINER_FILE
    try:
        trainer = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointDamaged(f"{path}: unreadable ({e})") from None
    if not isinstance(trainer, dict):
        raise CheckpointDamaged(f"{path}: not a JSON object")
    return trainer


def run_of(folder: Path) -> str | None:
    """The run a checkpoint folder belongs to; None when its trainer.json is missing, unreadable or names none."""
    try:
        return read_trainer(folder).get("run_id")
    except CheckpointDamaged:
        return None


# ---------------------------------------------------------------------------------------------------------------------
# The files of a checkpoint: listed with size and sha256 when written, verified before use

HASH_CHUNK = 1 << 24  # bytes read at a time while hashing
HASH_THREADS = 8  # files hashed side by side (hashlib releases the GIL): a checkpoint has a shard pair per rank

_verified: dict[Path, list[tuple[str, int, int, str]]] = {}  # folder -> (file, size, mtime, listed sha256) of each


def _digest(path: Path, sync: bool) -> tuple[int, str]:
    """The size and sha256 of a file, read once; `sync`: also flush it to storage (fsync)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return size, h.hexdigest()


def _digests(paths: list[Path], sync: bool) -> list[tuple[int, str]]:
    """`_digest` of each path, several at once."""
    with ThreadPoolExecutor(max_workers=max(1, min(HASH_THREADS, len(paths)))) as pool:
        return list(pool.map(lambda p: _digest(p, sync), paths))


def seal_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under `folder` but trainer.json, by its path relative to `folder`, with its size and sha256, each
    flushed to storage (fsync) on the way: what trainer.json lists and `verify_files` checks."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / TRAINER_FILE)
    return {p.relative_to(folder).as_posix(): {"size": size, "sha256": sha}
            for p, (size, sha) in zip(paths, _digests(paths, sync=True))}


def verify_files(folder: Path, trainer: dict[str, Any]) -> None:
    """The files `trainer` (the folder's trainer.json) lists are in `folder` with their sizes and sha256, each learner
    rank's shard among them; CheckpointDamaged names the first that is not. The sizes cost a stat; the hashes read the
    whole checkpoint, once per process: a folder verified before whose files kept their sizes, modification times and
    listed hashes is not read again (the preflight and the job both resolve the checkpoint)."""
    files = trainer.get("files")
    if not isinstance(files, dict) or not trainer.get("run_id") or "training_config" not in trainer:
        raise CheckpointDamaged(f"{folder / TRAINER_FILE}: names no run_id, files or training_config (written before "
                                f"checkpoints carried them, or damaged)")
    shards = [rank_stem("", rank).with_suffix(s).as_posix() for rank in range(trainer["world_size"])
              for s in (".safetensors", ".json")]
    unlisted = [name for name in shards if name not in files]
    if unlisted:
        raise CheckpointDamaged(f"{folder / TRAINER_FILE}: lists no {', '.join(unlisted)}")
    names = sorted(files)
    stamps = []
    for name in names:
        try:
            stat = (folder / name).stat()
        except FileNotFoundError:
            raise CheckpointDamaged(f"{folder / name}: missing") from None
        if stat.st_size != files[name]["size"]:
            raise CheckpointDamaged(f"{folder / name}: {stat.st_size} bytes, trainer.json lists {files[name]['size']} "
                                    f"(truncated or changed)")
        stamps.append((name, stat.st_size, stat.st_mtime_ns, files[name]["sha256"]))
    key = folder.resolve()
    if _verified.get(key) == stamps:
        return
    for name, (_, sha) in zip(names, _digests([folder / name for name in names], sync=False)):
        if sha != files[name]["sha256"]:
            raise CheckpointDamaged(f"{folder / name}: its sha256 is not the one trainer.json lists (changed after it "
                                    f"was written)")
    _verified[key] = stamps


# ---------------------------------------------------------------------------------------------------------------------
# The training config of a run: what must match to resume it

# The dotted config keys (fnmatch patterns; list entries by index) that define what a run trains: the seed, the model,
# the sampler, the scorers and their weights, the learner and the prompts ...
TRAINED_KEYS = ("seed", "model.*", "sampler.*", "rewards.scorers.*", "learner.*", "data.*")
# ... but where and how fast it runs (pools, compilation, gradient checkpointing, publishing buckets, model.build_tiny
# which only builds a missing folder) and when it gives up. learner.num_actors is the world size, checked on its own;
# output, logging, metrics, Ray, evaluation, checkpoint cadence and `iterations` are outside TRAINED_KEYS.
POOL_KEYS = tuple(RestartablePoolConfig.model_fields)
UNTRAINED_KEYS = ("model.compile", "model.build_tiny", *(f"rewards.scorers.*.{key}" for key in POOL_KEYS),
                  *(f"learner.{key}" for key in POOL_KEYS), "learner.gradient_checkpointing",
                  "learner.publish_bucket_mb", "learner.max_skipped_updates")
PROMPT_FILE_KEYS = ("data.path", "data.exclude_path")  # given by their content
UNSET = "(unset)"  # a key that one of two training configs lacks (one written before the key existed)

_given_with_set: ContextVar[frozenset[str]] = ContextVar("given_with_set", default=frozenset())


@contextmanager
def given_with_set(overrides: Iterable[str]) -> Iterator[None]:
    """Within: the keys of these `--set key=value` overrides (this command line's) may differ from the training config
    of the checkpoint a run resumes from, as may every key under them. A context, not a parameter: the preflight and
    the job both resolve the checkpoint, through calls that carry only (cfg, resume); learner.main wraps the run."""
    token = _given_with_set.set(frozenset(o.partition("=")[0].strip() for o in overrides))
    try:
        yield
    finally:
        _given_with_set.reset(token)


def training_config(cfg: JobConfig) -> dict[str, Any]:
    """The config's TRAINED_KEYS but UNTRAINED_KEYS, by dotted key: a prompt file given by its content (the same
    prompts moved elsewhere resume, other prompts under the same name do not), a local model path as given from the
    working folder (Ray's copy of a submitted folder, and so every absolute path in it, moves with each submission)."""
    flat = _dotted(cfg.model_dump(mode="json"))
    kept = {key: value for key, value in flat.items()
            if _matches(key, TRAINED_KEYS) and not _matches(key, UNTRAINED_KEYS)}
    kept["model.path"] = _from_here(cfg.model.path)
    for key in PROMPT_FILE_KEYS:
        if kept.get(key) and Path(kept[key]).is_file():
            kept[key] = "sha256:" + _digest(Path(kept[key]), sync=False)[1]
    return kept


def fingerprint(training: dict[str, Any]) -> str:
    """A short hash of a training config: equal for equal configs."""
    return hashlib.sha256(json.dumps(training, sort_keys=True).encode()).hexdigest()[:16]


def _dotted(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: value}: into mappings and lists of mappings (by index); other lists, empty
    mappings and scalars are values."""
    if isinstance(value, dict) and value:
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, child in items:
        flat.update(_dotted(child, f"{prefix}.{key}" if prefix else key))
    return flat


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def _from_here(path: str) -> str:
    """A path relative to the working folder when it lies inside it (a hub id stays as it is), else absolute."""
    absolute = Path(path).resolve()
    try:
        return absolute.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(absolute)


def check_training_config(cfg: JobConfig, folder: Path, trainer: dict[str, Any]) -> None:
    """The checkpoint's training config (its trainer.json) is this job's, but for keys given with --set on this command
    line; otherwise CheckpointError naming each key that differs, with its value in the checkpoint and now."""
    now = training_config(cfg)
    if fingerprint(now) == trainer.get("fingerprint"):
        return
    given = _given_with_set.get()
    stored = trainer["training_config"]
    changed = [key for key in sorted(stored.keys() | now.keys())
               if stored.get(key, UNSET) != now.get(key, UNSET)
               and not any(key == g or key.startswith(g + ".") for g in given)]
    if not changed:
        return
    shown = "; ".join(f"{key} {_short(stored.get(key, UNSET))} -> {_short(now.get(key, UNSET))}" for key in changed[:6])
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    raise CheckpointError(f"{folder}: this job's config differs from the one its run trained with: {shown}{more}; "
                          f"resume with the run's values, or give each key you change on purpose with --set on this "
                          f"command line (e.g. --set {changed[0]}=...)")


def _short(value: Any) -> str:
    """A config value for a message, at most 40 characters."""
    text = value if value == UNSET else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------------------------------
# Resuming


def resolve_resume(cfg: JobConfig, resume: str, say: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint this job continues, checked by `check_checkpoint` before anything loads: None for a fresh run
    ('none', or 'auto' finding no checkpoint), for 'auto' the newest intact checkpoint of the newest checkpoint's run
    (damaged newer ones passed over, said in one line through `say`), else the folder `resume` names. Refused with one
    line: a fresh run where checkpoints already are; a named folder whose run has other runs' checkpoints, or later ones
    of its own, where this job writes (it would prune and overwrite them, or leave them beside its own)."""
    root = checkpoint_root(cfg)
    if resume == "none":
        _refuse_fresh_start(cfg, root)
        return None
    if resume == "auto":
        return _newest_intact(cfg, root, say)
    folder = _named(cfg, resume)
    _refuse_mixing(cfg, root, folder)
    return folder


def check_checkpoint(cfg: JobConfig, folder: Path) -> dict[str, Any]:
    """`folder` is a checkpoint this job can continue: its trainer.json readable, written by as many learner ranks as
    this job has, every file it lists intact (`verify_files`; CheckpointDamaged otherwise), its training config this
    job's (`check_training_config`). Returns its trainer.json."""
    trainer = read_trainer(folder)
    ranks = trainer.get("world_size")
    if ranks != cfg.learner.num_actors:
        raise CheckpointError(f"{folder}: written by {ranks} learner ranks, this job has learner.num_actors = "
                              f"{cfg.learner.num_actors}; they must match to resume")
    verify_files(folder, trainer)
    check_training_config(cfg, folder, trainer)
    return trainer


def _refuse_fresh_start(cfg: JobConfig, root: Path) -> None:
    """A fresh run starts only where there is no checkpoint: it would otherwise overwrite and prune another run's."""
    found = list_checkpoints(root)
    if found:
        run = run_of(found[-1])
        raise CheckpointError(f"{_storage_field(cfg)}: {root} already holds the checkpoints of another run (newest "
                              f"{found[-1].name}{f', run {run}' if run else ''}), which a fresh run would overwrite "
                              f"and prune; continue that run with --resume auto, or give this one a new output_dir "
                              f"or checkpoint.storage")


def _newest_intact(cfg: JobConfig, root: Path, say: Callable[[str], None] | None) -> Path | None:
    """'auto': the newest checkpoint whose run can be told names the run; its newest checkpoint that
    `check_checkpoint` finds intact is the one (None when `root` holds no checkpoint)."""
    newest_first = list_checkpoints(root)[::-1]
    owners = {folder: run_of(folder) for folder in newest_first}
    run = next((owner for owner in owners.values() if owner), None)
    if newest_first and run is None:
        raise CheckpointError(f"{root}: no checkpoint there names its run (trainer.json unreadable, or written before "
                              f"runs had ids); resume from one folder by its path, or give a new output_dir or "
                              f"checkpoint.storage")
    damaged: list[CheckpointDamaged] = []
    for folder in (f for f in newest_first if owners[f] in (run, None)):
        try:
            check_checkpoint(cfg, folder)
        except CheckpointDamaged as e:
            damaged.append(e)
            continue
        if damaged and say is not None:
            also = f" (and {len(damaged) - 1} newer)" if len(damaged) > 1 else ""
            say(f"newest checkpoint damaged: {damaged[0]}{also}; resuming from {folder} instead")
        return folder
    if damaged:
        raise CheckpointError(f"{root}: no intact checkpoint of run {run}; the newest: {damaged[0]}")
    return None


def _named(cfg: JobConfig, resume: str) -> Path:
    """The checkpoint folder `resume` names, checked by `check_checkpoint`."""
    folder = Path(resume)
    what = f"resume {resume!r} (--resume or checkpoint.resume)"
    allowed = f"expected a checkpoint folder like {checkpoint_root(cfg)}/iter-000004, 'auto' or 'none'"
    if not folder.is_dir():
        raise CheckpointError(f"{what}: no such folder; {allowed}")
    if not (folder / TRAINER_FILE).is_file():
        raise CheckpointError(f"{what}: not a checkpoint folder (no {TRAINER_FILE}); {allowed}")
    try:
        check_checkpoint(cfg, folder)
    except CheckpointDamaged as e:
        raise CheckpointError(f"{what}: the checkpoint is damaged: {e}; resume from another one (--resume auto takes "
                              f"the newest intact one)") from None
    return folder


def _refuse_mixing(cfg: JobConfig, root: Path, folder: Path) -> None:
    """A run resumed from a named folder writes where only its own checkpoints are, none later than `folder`."""
    trainer = read_trainer(folder)
    run, iteration = trainer["run_id"], trainer["iteration"]
    for other in list_checkpoints(root):
        owner = run_of(other)
        if owner != run:
            raise CheckpointError(f"{_storage_field(cfg)}: {root} holds {other.name} of another run "
                                  f"({owner or 'unknown'}), beside which run {run} would write; resume that run with "
                                  f"--resume auto, or give this one a new output_dir or checkpoint.storage")
        if iteration_of(other) > iteration:
            raise CheckpointError(f"{_storage_field(cfg)}: {root} holds {other.name}, later than {folder.name}, of the "
                                  f"same run, which resuming from {folder} would overwrite or leave beside its own; "
                                  f"resume from the newest with --resume auto, or give a new output_dir or "
                                  f"checkpoint.storage to go on from {folder.name}")


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
