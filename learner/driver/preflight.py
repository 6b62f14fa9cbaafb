"""Checks of the job's inputs that need no Ray, run by `python -m learner.main` before Ray starts or anything waits.

First `check_inputs` (learner/driver/inputs.py) finds every input the job reads and lists all that are missing at
once, one line each. Then each check is one small function `check_...(cfg, resume)` that returns nothing or raises an
error of `learner.main.user_errors()` (exit code 2) with one line: what is wrong, where (the config field; file:line
for a data file) and what is allowed; `preflight` runs CHECKS in order, cheapest first, and stops at the first
failure. No check leaves anything on disk, except the tiny model that `model.build_tiny` asks for (built atomically,
as the job would do next), and what the job downloads first anyway. To add a check, write one more function and list
it in CHECKS.

The files that actors read (the model, LoRA targets from its config, the scorers' weights) are checked here only on a
local Ray, whose one node runs every actor. A job that joins a cluster runs the same `..._here` checks on the nodes
themselves, in a bundle of each pool, once the pools are placed (learner/driver/placement.py).
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path
from typing import Callable

from cluster.config import JobConfig
from learner.driver.inputs import InputError, check_inputs


def check_output_dir(cfg: JobConfig, resume: str) -> None:
    """output_dir, and checkpoint.storage when it is set, are folders or can be created, and a file can be written in
    each (a job that joins a cluster also checks checkpoint.storage on every learner node: placement.py)."""
    writable_here("output_dir", cfg.output_dir)
    if cfg.checkpoint.storage:
        writable_here("checkpoint.storage", cfg.checkpoint.storage)


def writable_here(field: str, value: str, node: str = "") -> None:
    """On this node (`node`: its name in the message), the folder `value` is one or can be created, and a probe file
    can be created, written and removed in it; the probe removes the folders it made."""
    folder = Path(value).absolute()
    where = f"{field} = {value!r}{node}"
    made = []  # folders the probe creates, deepest first: removed again below
    try:
        existing = folder
        while not existing.exists():
            made.append(existing)
            existing = existing.parent
        if not existing.is_dir():
            raise InputError(f"{where}: {existing} is a file, not a folder; give a folder that exists or can be "
                             f"created")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".flowrl-probe-") as probe:
            probe.write(b"probe")
            probe.flush()
    except OSError as e:
        raise InputError(f"{where}: cannot create or write it ({e.strerror or e}); give a folder this user can "
                         f"create and write") from None
    finally:
        for made_folder in made:
            try:
                made_folder.rmdir()
            except OSError:
                pass


def check_logging(cfg: JobConfig, resume: str) -> None:
    """The packages of logging.backends are installed."""
    from learner.driver.tracking import WandbMissing, require_backends

    try:
        require_backends(cfg)
    except WandbMissing as e:
        raise InputError(str(e)) from None


def check_resume(cfg: JobConfig, resume: str) -> None:
    """The checkpoint to resume from ('none', 'auto' or a folder) is one this job can continue, before any model loads:
    a fresh run only where there is no checkpoint; the checkpoint's learner ranks this job's learner.num_actors, its
    shards and every other file intact (sizes and sha256), its training config this job's but for keys given with
    --set (learner/ranks/checkpoint.py `resolve_resume`, which the job runs again to load it)."""
    from learner.ranks.checkpoint import resolve_resume

    resolve_resume(cfg, resume)


def check_rewards(cfg: JobConfig, resume: str) -> None:
    """Every scorer name is registered and its options are parameters of that scorer (nothing is loaded); on a local
    Ray also their values and weights, as the scorer's actor will check them."""
    from cluster.config import RETIRED_KEYS
    from rewards.registry import REGISTRY, registered, scorer_class

    for i, spec in enumerate(cfg.rewards.scorers):
        field = f"rewards.scorers.{i}"
        if spec.name not in REGISTRY:
            raise InputError(f"{field}.name = {spec.name!r}: unknown reward; registered: {', '.join(registered())}")
        if "allow_download" in spec.options:
            raise InputError(f"{field}.options.allow_download: {RETIRED_KEYS['model.allow_download']}")
        params = inspect.signature(scorer_class(spec.name)).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        unknown = sorted(set(spec.options) - set(params))
        if unknown:
            raise InputError(f"{field}.options: {spec.name} has no option {', '.join(map(repr, unknown))}; "
                             f"allowed: {', '.join(params) or 'none'}")
    if not _joins_cluster(cfg):
        for i, spec in enumerate(cfg.rewards.scorers):
            scorer_here(spec.name, spec.options, f"rewards.scorers.{i}.options")


def check_http_scorers(cfg: JobConfig, resume: str) -> None:
    """Every `http` scorer's url, timeouts and batch size are well formed, on any Ray (its server and token file are
    checked where its actors run: `scorer_here`), and its deadline_s ends before rewards.timeout_s, when the reward
    service would kill the call and restart the actor instead of hearing that the server is down."""
    from rewards.registry import REGISTRY, scorer_class
    from rewards.remote import HttpScorer

    defaults = {name: p.default for name, p in inspect.signature(HttpScorer.__init__).parameters.items()
                if p.default is not p.empty}
    for i, spec in enumerate(cfg.rewards.scorers):
        if spec.name not in REGISTRY or not issubclass(scorer_class(spec.name), HttpScorer):
            continue
        field = f"rewards.scorers.{i}.options"
        options = {**defaults, **spec.options, "token_file": None}
        try:
            HttpScorer.check_options(**options)
        except (ValueError, TypeError) as e:
            raise _scorer_error(field, spec.name, e) from None
        if options["deadline_s"] >= cfg.rewards.timeout_s:
            raise InputError(f"{field}.deadline_s = {options['deadline_s']:g}: must be < rewards.timeout_s = "
                             f"{cfg.rewards.timeout_s:g}, after which the reward service kills the call; lower "
                             f"deadline_s (default {defaults['deadline_s']:g}) or raise rewards.timeout_s")


def _scorer_error(field: str, name: str, error: Exception) -> InputError:
    """A scorer's refusal as one line, `<field>: <scorer>: <why>`, named once whether or not its message names it."""
    message = str(error)
    return InputError(f"{field}: {message if message.startswith(f'{name}: ') else f'{name}: {message}'}")


def scorer_here(name: str, options: dict, field: str = "options") -> None:
    """On this node: the scorer's options checked as its constructor checks them, its weights found, none loaded."""
    from rewards.clip_common import RewardLoadError
    from rewards.registry import scorer_class

    try:
        scorer_class(name).check(**options)
    except (ValueError, TypeError, FileNotFoundError, RewardLoadError, RuntimeError) as e:
        raise _scorer_error(field, name, e) from None


def _joins_cluster(cfg: JobConfig) -> bool:
    from cluster.runtime import joins_cluster

    return joins_cluster(cfg.ray)


def check_prompts(cfg: JobConfig, resume: str) -> None:
    """The training prompts, and the evaluation prompts when evaluation is on, can be read (file, format, overlap
    with data.exclude_path). Generating 50 000 GenEval prompts takes ~1.5 s on one core: cheap enough to do twice."""
    from rollout.prompts.sources import eval_prompts, training_prompts

    training_prompts(cfg.data, seed=cfg.seed)
    if cfg.eval.every_n_iterations:
        eval_prompts(cfg.eval)


def check_ocr_targets(cfg: JobConfig, resume: str) -> None:
    """With the `ocr` reward on, every prompt it scores has its target in double quotes, as the scorer parses it."""
    if "ocr" not in {s.name for s in cfg.rewards.scorers}:
        return
    from rewards.ocr import quoted_target
    from rollout.prompts.sources import eval_prompts, training_prompts

    scored = [("data", training_prompts(cfg.data, seed=cfg.seed))]
    if cfg.eval.every_n_iterations:
        scored.append(("eval", eval_prompts(cfg.eval)))
    for section, items in scored:
        for i, item in enumerate(items):
            if quoted_target(item.prompt) is None:
                where = item.where or f"{section}.source {getattr(cfg, section).source!r}, prompt {i + 1}"
                shown = item.prompt if len(item.prompt) <= 80 else item.prompt[:77] + "..."
                raise InputError(f"{where}: {shown!r} has no text in double quotes for the ocr reward; every prompt "
                                 f"it scores needs its target quoted, e.g. 'a sign that says \"Open Late\"'")


def check_local_pools_fit(cfg: JobConfig, resume: str) -> None:
    """A local Ray gets ray.num_cpus / ray.num_gpus when they are set: pools asking for more are refused before Ray
    starts. (Joining a cluster, or with them unset, learner.main checks against Ray's own count once it is up.)"""
    from cluster.runtime import ClusterTooSmall, check_pools_fit, joins_cluster

    if joins_cluster(cfg.ray):
        return
    given = {"CPU": cfg.ray.num_cpus, "GPU": cfg.ray.num_gpus}
    try:
        check_pools_fit(cfg, {res: float("inf") if n is None else float(n) for res, n in given.items()})
    except ClusterTooSmall as e:
        raise ClusterTooSmall(f"{e} (the local Ray gets what ray.num_cpus / ray.num_gpus give it)") from None


def check_metrics_port(cfg: JobConfig, resume: str) -> None:
    """A local Ray's metrics endpoint (ray.host : metrics.port) is free: Ray itself would start without it and the
    metrics would silently go nowhere. (A joined cluster exports on its own ports.)"""
    import socket

    from cluster.runtime import joins_cluster

    if not cfg.metrics.enabled or cfg.metrics.port == 0 or joins_cluster(cfg.ray):
        return
    with socket.socket(socket.AF_INET6 if ":" in cfg.ray.host else socket.AF_INET) as probe:
        try:
            probe.bind((cfg.ray.host, cfg.metrics.port))
        except OSError as e:
            raise InputError(f"metrics.port = {cfg.metrics.port}: {cfg.ray.host}:{cfg.metrics.port} is not free "
                             f"({e.strerror or e}); give a free port, 0 for any free port, or metrics.enabled=false"
                             ) from None


def check_model(cfg: JobConfig, resume: str) -> None:
    """On a local Ray: `model_here`."""
    if not _joins_cluster(cfg):
        model_here(cfg)


def model_here(cfg: JobConfig, parts: tuple[str, ...] | None = None) -> Path:
    """On this node: the model folder holds every part (a hub id resolves through the local cache, downloaded there
    first when missing unless HF_HUB_OFFLINE=1); with `model.build_tiny` the tiny model is built there first if the
    folder is missing or empty, as the job would do next."""
    from rollout.models.loading import PARTS, locate_configured

    return locate_configured(cfg.model, parts or PARTS)[0]


def check_lora_targets(cfg: JobConfig, resume: str) -> None:
    """On a local Ray: `lora_targets_here`."""
    if not _joins_cluster(cfg):
        lora_targets_here(cfg)


def lora_targets_here(cfg: JobConfig) -> None:
    """On this node: every learner.lora.target_modules entry names at least one layer of the transformer, and only
    layers LoRA can wrap. Names match as peft matches them (its `check_target_module_exists`: the module's full name,
    or its ending after a dot). The transformer is built from its config.json on the meta device: no weights are
    read."""
    lora = cfg.learner.lora
    if cfg.learner.finetune != "lora" or lora is None:
        return
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from rollout.models.loading import ModelLoadError, locate_configured

    folder, classes = locate_configured(cfg.model, parts=("transformer",))
    cls = classes["transformer"]
    try:
        with torch.device("meta"):
            transformer = cls.from_config(cls.load_config(folder, subfolder="transformer"))
    except Exception as e:  # noqa: BLE001 - any failure here is a config.json that does not fit the family
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ModelLoadError(f"{folder / 'transformer' / 'config.json'}: cannot build a {cls.__name__} from it "
                             f"({type(e).__name__}: {reason}); is model.family right?") from None
    modules = dict(transformer.named_modules())
    wrappable = {name for name, module in modules.items() if isinstance(module, _lora_layer_types())}
    allowed = f"allowed: the name or name ending of a Linear/Conv/Embedding layer: {', '.join(_endings(wrappable))}"
    for target in lora.target_modules:
        match = LoraConfig(target_modules=[target])
        matched = [name for name in modules if name and check_target_module_exists(match, name)]
        if not matched:
            raise InputError(f"learner.lora.target_modules: {target!r} matches no module of the {cls.__name__} at "
                             f"{folder}; {allowed}")
        unwrappable = [name for name in matched if name not in wrappable]
        if unwrappable:
            name = unwrappable[0]
            raise InputError(f"learner.lora.target_modules: {target!r} matches {name} "
                             f"({type(modules[name]).__name__}), which LoRA cannot wrap; {allowed}")


def _lora_layer_types() -> tuple[type, ...]:
    """The layer types peft's LoRA wraps (its 'is not supported' error lists the same)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    nn = torch.nn
    return nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D


def _endings(names: set[str]) -> list[str]:
    """Distinct endings of module names as one writes them in target_modules ('blocks.0.attn.to_out.0' -> 'to_out.0')."""
    short = set()
    for name in names:
        parts = name.split(".")
        short.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    return sorted(short)


def absolute_paths(cfg: JobConfig) -> JobConfig:
    """The config with local paths made absolute, so that actors (whatever their working folder) find them."""

    def local(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path and Path(path).exists() else path

    m = cfg.model
    model_path = str(Path(m.path).resolve()) if m.build_tiny or Path(m.path).exists() else m.path
    storage = cfg.checkpoint.storage
    return cfg.model_copy(update={
        "output_dir": str(Path(cfg.output_dir).resolve()),
        "checkpoint": cfg.checkpoint.model_copy(update={"storage": str(Path(storage).resolve()) if storage else None}),
        "model": m.model_copy(update={"path": model_path}),
        "data": cfg.data.model_copy(update={"path": local(cfg.data.path),
                                            "exclude_path": local(cfg.data.exclude_path)}),
        "eval": cfg.eval.model_copy(update={"path": local(cfg.eval.path)}),
    })


CHECKS: list[Callable[[JobConfig, str], None]] = [
    check_output_dir,
    check_resume,
    check_logging,
    check_rewards,
    check_http_scorers,
    check_prompts,
    check_ocr_targets,
    check_local_pools_fit,
    check_metrics_port,
    check_model,
    check_lora_targets,
]


def preflight(cfg: JobConfig, resume: str, dry_run: bool = False) -> list[str]:
    """Every check that needs no Ray: `check_inputs` (every missing input listed at once), then CHECKS in order, the
    first failure raising (one line, exit code 2). Returns a line for each hub id the job downloads first."""
    downloads = check_inputs(cfg, dry_run)
    for check in CHECKS:
        check(cfg, resume)
    return downloads
