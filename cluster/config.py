"""The job configuration: one pydantic model for the whole run (read from YAML by cluster/config_loading.py).

Every field has a default or is required; the model is validated once (field types and ranges by pydantic, relations
between fields by `_cross_field_problems`) and frozen. Any problem is reported as one line naming the dotted field,
the bad value and what is allowed.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The one list of each vocabulary: the config's choices below and the code that dispatches on them derive from these.
MODEL_FAMILIES = ("flux", "sd3", "flux2", "qwen_image", "z_image")
MODEL_INITS = ("pretrained", "random")  # rollout/models/loading.py
STEP_KINDS = ("ode", "sde", "dance", "cps", "sde_exact")  # docs/math.md "Step rules"; only "ode" has no log-prob
TRAINABLE_KINDS = tuple(kind for kind in STEP_KINDS if kind != "ode")
GUARD_KINDS = ("sde", "sde_exact")  # the rules GRPO-Guard normalises (docs/math.md "GRPO-Guard")
LOG_PROB_FORMS = ("gaussian", "squared")
LR_SCHEDULES = ("constant", "linear", "cosine")  # learner/ranks/lr_schedule.py
LOGGING_BACKENDS = ("tensorboard", "wandb")  # learner/driver/tracking.py
FILE_SOURCES = ("text", "geneval_jsonl")  # prompt sources read from `path`
EVAL_SOURCES = ("builtin", *FILE_SOURCES, "shapes_train", "shapes_heldout", "shapes_all")
DATA_SOURCES = (*EVAL_SOURCES, "geneval_generate")  # training prompts may also be generated
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's placement-group strategies
RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")  # set by num_*_per_actor, not `resources`
# Keys a config may still carry from an earlier version: what became of each, said instead of "unknown key".
RETIRED_KEYS = {
    "learner.beta": "split in two: learner.kl_beta (grpo: the KL of each recorded step to the reference policy) and "
                    "learner.ref_beta (nft, awm: the velocity distance to the reference)",
    "model.allow_download": "removed: a hub id that is not in the local Hugging Face cache is now downloaded on first "
                            "use, as diffusers and transformers do (HF_HUB_OFFLINE=1 forbids it); delete the line",
}


class ConfigError(Exception):
    """A configuration that cannot run: one human-readable line per problem."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(f"config error: {prefix}{p}" for p in problems))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(Section):
    """Which model to load and how."""

    family: Literal[MODEL_FAMILIES]
    path: str = Field(description="a local diffusers folder, or a hub id (from the local Hugging Face cache, "
                      "downloaded there first when missing unless HF_HUB_OFFLINE=1)")
    build_tiny: bool = Field(False, description="build the offline tiny model of this family at `path` if it is missing")
    tiny_seed: int = 0
    init: Literal[MODEL_INITS] = Field(
        "pretrained", description="pretrained: the weights in `path`; random: the components built from the configs "
        "in `path` with random weights, directly on the actor's device (text encoders without a config there: random "
        "prompt embeddings of their shapes), the same weights in every process (rollout/models/random_init.py)")
    init_seed: int = Field(0, description="init random: the seed of the random weights")
    compile: bool = Field(False, description="torch.compile each transformer block (regional compilation), in the "
                          "rollout and the learner alike")
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    resolution: int = Field(512, ge=16, description="image height and width in pixels, a multiple of 16")
    max_sequence_length: int = Field(512, ge=1, le=512)


class FastWindow(Section):
    """Fast variant: ODE everywhere but `size` consecutive stochastic steps in the first half, drawn per batch."""

    size: int = Field(2, ge=1)


class SamplerConfig(Section):
    """The training rollouts' step rule (docs/math.md "Step rules")."""

    kind: Literal[STEP_KINDS] = "cps"
    noise_level: float = Field(0.7, ge=0.0, description="a for sde/sde_exact, eta for dance and cps")
    log_prob_form: Optional[Literal[LOG_PROB_FORMS]] = Field(
        None, description="None: gaussian for sde/dance/sde_exact, squared for cps")
    num_steps: int = Field(10, ge=2, description="denoising steps of a training rollout")
    trained_steps: Optional[int] = Field(None, ge=1, description="steps trained per trajectory; None: num_steps - 1")
    guidance_scale: float = Field(4.5, ge=0.0, description="SD3: true CFG scale; FLUX: the guidance embedding")
    same_initial_noise: bool = Field(False, description="one initial noise for the whole group (with a Fast window, "
                                     "the ODE steps before it are then computed once per group)")
    fast_window: Optional[FastWindow] = None
    antithetic: bool = Field(False, description="the stochastic steps' fresh noise in (z, -z) pairs within a group "
                             "(samples 2m and 2m+1); needs an even data.group_size")


def _custom_resources(resources: dict[str, float] | None) -> dict[str, float] | None:
    """Custom resource names (not CPU, GPU or memory, which have fields of their own) with positive amounts."""
    for name, amount in (resources or {}).items():
        if not name or name in RESERVED_RESOURCES:
            raise ValueError(f"{name!r} is not a custom resource name (CPUs and GPUs are num_*_per_actor)")
        if not amount > 0:
            raise ValueError(f"{name}: {amount} must be > 0")
    return resources


class PoolConfig(Section):
    """One pool of Ray actors, reserved as one placement group with a bundle per actor (cluster/pools.py)."""

    num_actors: int = Field(1, ge=1)
    num_gpus_per_actor: float = Field(0.0, ge=0.0)
    num_cpus_per_actor: float = Field(1.0, gt=0.0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom resources added to each actor's "
                                        "bundle, e.g. {rollout_node: 0.01} or {'accelerator_type:H100': 0.001}")
    placement_strategy: Literal[PLACEMENT_STRATEGIES] = Field(
        "PACK", description="how the pool's bundles spread over nodes (Ray's placement-group strategies)")

    @field_validator("resources")
    @classmethod
    def _check_resources(cls, resources: dict[str, float] | None) -> dict[str, float] | None:
        return _custom_resources(resources)

    def bundle(self) -> dict[str, float]:
        """What one actor of the pool reserves: its CPUs, GPUs (if any) and custom resources."""
        gpus = {"GPU": self.num_gpus_per_actor} if self.num_gpus_per_actor else {}
        return {"CPU": self.num_cpus_per_actor, **gpus, **self.resources}


class RestartablePoolConfig(PoolConfig):
    """A pool whose actors Ray restarts when they die (rollout workers, scorers; a learner rank never restarts)."""

    max_restarts: int = Field(3, ge=0)


class RolloutConfig(RestartablePoolConfig):
    samples_per_forward: int = Field(8, ge=1, description="trajectories batched into one transformer forward")
    node_wait_s: float = Field(300.0, ge=0.0, description="after a node loss leaves no rollout actor, how long to "
                               "wait for a node to take them before the job stops")
    call_timeout_s: float = Field(1800.0, gt=0.0, description="a group not returned this long after it was sent "
                                  "to a rollout actor is sampled again elsewhere, and the actor gets no group until it "
                                  "answers (a hung actor, or one on a node that is leaving)")


class RewardSpec(Section):
    """One scorer; its actors take the reward pool's resources unless its own entry overrides them."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    weight: float = 1.0
    options: dict[str, Any] = Field(default_factory=dict)
    num_actors: Optional[int] = Field(None, ge=1)
    num_gpus_per_actor: Optional[float] = Field(None, ge=0.0)
    num_cpus_per_actor: Optional[float] = Field(None, gt=0.0)
    resources: Optional[dict[str, float]] = None

    @field_validator("resources")
    @classmethod
    def _check_resources(cls, resources: dict[str, float] | None) -> dict[str, float] | None:
        return _custom_resources(resources)


class RewardsConfig(RestartablePoolConfig):
    scorers: list[RewardSpec] = Field(min_length=1)
    timeout_s: float = Field(120.0, gt=0.0)
    max_retries: int = Field(2, ge=0, description="times a batch is sent again after a failure its actor answered "
                             "(a scorer backend unavailable) or a call past timeout_s; calls cut off by an actor's "
                             "restart wait for it and are not counted")
    max_restarts: int = Field(3, ge=0, description="deaths of one reward actor allowed within restart_window_s, each "
                              "followed by Ray's restart (or a new actor in its bundle once Ray gives up); one more "
                              "retires the actor, and a scorer with no actor left fails its groups")
    restart_window_s: float = Field(600.0, gt=0.0, description="seconds over which the deaths of a reward actor count "
                                    "against max_restarts; older ones no longer count")

    def pool_of(self, scorer: RewardSpec) -> RestartablePoolConfig:
        """The pool of one scorer's actors: the reward pool's settings with the scorer's own overrides."""
        own = {field: getattr(scorer, field) for field in ("num_actors", "num_gpus_per_actor", "num_cpus_per_actor",
                                                           "resources") if getattr(scorer, field) is not None}
        shared = {field: getattr(self, field) for field in RestartablePoolConfig.model_fields}
        return RestartablePoolConfig(**{**shared, **own})


class LoraConfig(Section):
    rank: int = Field(64, ge=1)
    alpha: float = Field(128.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(min_length=1)


class EmaConfig(Section):
    enabled: bool = True
    every: int = Field(8, ge=1, description="optimizer steps between EMA updates")


class LearnerConfig(PoolConfig):
    """DeepSpeed ZeRO learner: GRPO on recorded steps, or DiffusionNFT / AWM on clean samples (docs/math.md "GRPO",
    "Forward-process objectives")."""

    objective: str = Field("grpo", description="grpo: the clipped ratio on recorded steps; nft / awm: forward-process "
                           "objectives on the rollouts' final samples (any sampler; the papers sample with the ODE, "
                           "sampler.kind: ode). Looked up in learner/objectives/registry.py")
    nft_beta: float = Field(1.0, gt=0.0, description="nft: β of the implicit policies v± (papers: 1, 0.1 for OCR)")
    nft_weighting: Literal["adaptive", "none"] = "adaptive"
    old_adapter_schedule: Literal["default", "ocr"] = Field(
        "default", description="nft: the sampling adapter's soft-update decay, min(0.001k, 0.5) or the OCR schedule")

    zero_stage: Literal[2, 3] = 2
    precision: Literal["fp32", "bf16"] = "bf16"
    finetune: Literal["lora", "full"] = "lora"
    lora: Optional[LoraConfig] = None
    lr: float = Field(3e-4, gt=0.0)
    lr_schedule: Literal[LR_SCHEDULES] = Field("constant", description="after the warm-up: constant, or linear / "
                                               "cosine decay to 0 at the job's last update")
    lr_warmup_updates: int = Field(0, ge=0, description="optimizer updates of linear warm-up, lr·(k+1)/W")
    weight_decay: float = Field(1e-4, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    max_skipped_updates: int = Field(3, ge=1, description="stop the job after this many updates in a row are skipped "
                                     "for a non-finite loss or gradient")
    clip_range: float = Field(1e-4, gt=0.0)
    log_prob_reduction: Literal["mean", "sum"] = Field(
        "mean", description="per-element mean (the papers, clip ~1e-4) or sum over the latent (an ordinary clip ~0.2)")
    kl_beta: float = Field(0.0, ge=0.0, description="grpo: weight of the KL of each recorded step's Gaussian to the "
                           "reference policy's (the adapter switched off, or a frozen copy for full fine-tuning)")
    ref_beta: float = Field(0.0, ge=0.0, description="nft / awm: weight of the velocity distance to the reference, "
                            "mean (v_θ − v_ref)² with the adapter switched off")
    updates_per_iteration: int = Field(2, ge=1)
    micro_batch_size: int = Field(1, ge=1, description="samples per learner rank per forward")
    gradient_checkpointing: bool = False
    advantage_std: Literal["global", "group"] = "global"
    advantage_clip: float = Field(5.0, gt=0.0)
    drop_zero_advantage: bool = False
    mode: Literal["sync", "async"] = Field("sync", description="async: rollouts sample ahead while the learner trains")
    publish_bucket_mb: float = Field(512.0, gt=0.0, description="the published weights go to the rollout actors in "
                                     "buckets of at most this size (one for a LoRA adapter)")
    ratio_norm: bool = Field(False, description="GRPO-Guard (Flow-SDE and sde_exact): the ratio normalised with the "
                             "recorded rollout mean, each step's loss weighted by 1/Δ; papers' clip_range 2e-6, "
                             "lr 1e-4, beta 0, advantage_std group")
    max_staleness: int = Field(1, ge=0, description="async mode: policy versions a trained group may lag, checked per "
                               "group when its iteration starts (a staler one is sampled again); 0: synchronous")
    ema: EmaConfig = EmaConfig()


class DataConfig(Section):
    """Training prompts and batch shape."""

    source: Literal[DATA_SOURCES] = "builtin"
    path: Optional[str] = Field(None, description="prompt file for source text / geneval_jsonl")
    num_prompts: int = Field(10000, ge=1, description="prompts to generate for source geneval_generate")
    exclude_path: Optional[str] = Field(None, description="GenEval test file that training prompts must not overlap")
    group_size: int = Field(24, ge=2, description="samples per prompt (G)")
    images_per_iteration: int = Field(1152, ge=2)
    shuffle: bool = True


class EvalConfig(Section):
    every_n_iterations: int = Field(0, ge=0, description="0: no evaluation")
    at_start: bool = Field(True, description="when evaluation is on, also evaluate the starting weights (iteration 0) "
                           "before the first iteration of a fresh run")
    num_steps: int = Field(28, ge=2, description="ODE steps of an evaluation image")
    source: Literal[EVAL_SOURCES] = "builtin"
    path: Optional[str] = None
    num_prompts: Optional[int] = Field(None, ge=1, description="None: every prompt of the source")
    seed: int = 0
    batch_size: int = Field(8, ge=1)


class CheckpointConfig(Section):
    every_n_iterations: int = Field(0, ge=0, description="0: only at the end")
    keep_last: int = Field(2, ge=1)
    storage: Optional[str] = Field(None, description="folder of the checkpoints, which every learner rank writes its "
                                   "own shard into (on a cluster: storage every learner node can write); None: "
                                   "output_dir/checkpoints")
    resume: str = Field("none", description="'none', 'auto' (the newest in checkpoint.storage) or a checkpoint folder")


class MetricsConfig(Section):
    """Prometheus metrics (cluster/metrics.py), exported by Ray's metrics agent of each node."""

    enabled: bool = True
    port: int = Field(9400, ge=0, le=65535, description="metrics port of a local Ray's node (on ray.host); 0: any "
                      "free port. A joined cluster exports on the ports its nodes were started with")


class LoggingConfig(Section):
    """Experiment trackers the driver writes each iteration to (learner/driver/tracking.py), besides history.jsonl."""

    backends: list[Literal[LOGGING_BACKENDS]] = Field(default_factory=list, description="tensorboard (event files "
                                                      "in output_dir/tensorboard) and/or wandb (the optional extra)")
    wandb_project: str = "flowrl"
    wandb_entity: Optional[str] = None
    wandb_mode: Literal["online", "offline"] = Field("online", description="offline: files in output_dir/wandb, "
                                                     "uploaded later with `wandb sync`")

    @field_validator("backends")
    @classmethod
    def _once_each(cls, backends: list[str]) -> list[str]:
        if len(set(backends)) != len(backends):
            raise ValueError(f"each backend once, got {backends}")
        return backends


class RayConfig(Section):
    address: Optional[str] = Field(None, description="None: RAY_ADDRESS if set (ray job submit), else start a local Ray")
    host: str = Field("127.0.0.1", description="address a local Ray (and its metrics endpoint) binds to; anything "
                      "but loopback exposes the cluster's ports to the network")
    num_cpus: Optional[int] = Field(None, ge=1, description="local Ray only; None: all cores")
    num_gpus: Optional[int] = Field(None, ge=0, description="local Ray only; None: detected")
    namespace: str = "flowrl"
    include_dashboard: bool = False
    placement_timeout_s: float = Field(60.0, gt=0.0, description="how long a pool may wait for its placement group "
                                       "before the job stops (the nodes' free resources are then listed)")


class JobConfig(Section):
    """The whole job."""

    run_name: str = Field("flowrl", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    iterations: int = Field(100, ge=1)
    output_dir: str = "runs/flowrl"
    model: ModelConfig
    sampler: SamplerConfig = SamplerConfig()
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardsConfig
    learner: LearnerConfig = LearnerConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check_relations(self) -> "JobConfig":
        problems = _cross_field_problems(self)
        if problems:
            raise ConfigError(problems)
        return self

    @property
    def trained_steps(self) -> int:
        """Steps recorded and trained per trajectory: the Fast window, the configured count, or all but the last."""
        s = self.sampler
        if s.fast_window is not None:
            return s.fast_window.size
        return s.trained_steps if s.trained_steps is not None else s.num_steps - 1

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _cross_field_problems(cfg: JobConfig) -> list[str]:
    """Relations between fields that no single field can check."""
    p: list[str] = []
    s, d, lr = cfg.sampler, cfg.data, cfg.learner
    n = s.num_steps

    if s.kind != "ode" and s.noise_level <= 0:
        p.append(f"sampler.noise_level = {s.noise_level}: a {s.kind} rollout needs noise to have a log-prob; must be > 0")
    if s.kind == "cps" and s.noise_level > 1:
        p.append(f"sampler.noise_level = {s.noise_level}: CPS eta must lie in [0, 1]")
    if s.trained_steps is not None and s.trained_steps > n - 1:
        p.append(f"sampler.trained_steps = {s.trained_steps}: at most num_steps - 1 = {n - 1} of {n} steps are trained "
                 f"(the last step is (near-)deterministic)")
    if s.fast_window is not None:
        if s.fast_window.size > n // 2:
            p.append(f"sampler.fast_window.size = {s.fast_window.size}: the window must lie in the first half of the "
                     f"{n} steps; allowed 1..{n // 2}")
        if s.trained_steps is not None and s.trained_steps != s.fast_window.size:
            p.append(f"sampler.trained_steps = {s.trained_steps}: with a Fast window only the window is trained; "
                     f"leave it unset or equal to fast_window.size ({s.fast_window.size})")

    if s.antithetic and d.group_size % 2:
        p.append(f"sampler.antithetic = true: the noise comes in (z, -z) pairs within a group, so data.group_size "
                 f"must be even, got {d.group_size}")
    if d.images_per_iteration % d.group_size:
        p.append(f"data.images_per_iteration = {d.images_per_iteration}: must be a multiple of "
                 f"data.group_size = {d.group_size} (whole groups only)")
    per_update = lr.updates_per_iteration * lr.num_actors * lr.micro_batch_size
    if d.images_per_iteration % per_update:
        p.append(f"learner.micro_batch_size = {lr.micro_batch_size}: images_per_iteration "
                 f"({d.images_per_iteration}) must split evenly into updates_per_iteration ({lr.updates_per_iteration})"
                 f" x learner.num_actors ({lr.num_actors}) x micro_batch_size; "
                 f"{d.images_per_iteration} is not a multiple of {per_update}")
    total_updates = cfg.iterations * lr.updates_per_iteration
    if lr.lr_warmup_updates >= total_updates:
        p.append(f"learner.lr_warmup_updates = {lr.lr_warmup_updates}: the warm-up must end before the job's last "
                 f"update; the job has iterations x updates_per_iteration = {total_updates} updates")
    if d.source in FILE_SOURCES and not d.path:
        p.append(f"data.path = None: source '{d.source}' reads prompts from a file; give its path")
    if cfg.eval.source in FILE_SOURCES and not cfg.eval.path:
        p.append(f"eval.path = None: source '{cfg.eval.source}' reads prompts from a file; give its path")

    if lr.finetune == "lora" and lr.lora is None:
        p.append("learner.lora = None: finetune 'lora' needs a lora section (rank, alpha, target_modules)")

    if cfg.model.resolution % 16:
        p.append(f"model.resolution = {cfg.model.resolution}: must be a multiple of 16 (8x VAE, 2x2 patches)")

    weights = [r.weight for r in cfg.rewards.scorers]
    if all(w == 0 for w in weights):
        p.append(f"rewards.scorers: every weight is 0 ({weights}); at least one scorer needs a non-zero weight")
    names = [r.name for r in cfg.rewards.scorers]
    for dup in sorted({x for x in names if names.count(x) > 1}):
        p.append(f"rewards.scorers: '{dup}' is listed more than once; each scorer once, with its weight")

    gpus = {pool: getattr(cfg, pool).num_gpus_per_actor for pool in ("rollout", "rewards", "learner")}
    gpus.update({f"rewards.scorers.{i}": s.num_gpus_per_actor for i, s in enumerate(cfg.rewards.scorers)
                 if s.num_gpus_per_actor is not None})
    for pool, g in gpus.items():
        if g > 1 and not float(g).is_integer():
            p.append(f"{pool}.num_gpus_per_actor = {g}: above 1 Ray needs a whole number of GPUs")
    return p
