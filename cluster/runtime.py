"""Ray start-up: join a running cluster or start a local one on loopback, and check that the pools fit. Ray's own
notices of a dead worker or node stay out of the job's output (`drop_death_notices`).

Ray binds to the machine's network address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is in the environment before
`import ray`; entry points set it first thing (see learner/main.py). This module imports ray lazily for that reason.
"""

from __future__ import annotations

import json
import os

from cluster.config import JobConfig, RayConfig
from cluster.quiet import RAY_LOGGING_LEVEL

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class ClusterTooSmall(RuntimeError):
    """The configured pools ask for more CPUs or GPUs than the Ray cluster has."""


def runs_in_a_copy() -> bool:
    """Whether this process is a job submitted with a working folder (`ray job submit --working-dir`): it then runs
    in Ray's temporary copy of the submitted folder, which goes away with the job."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return bool(raw and json.loads(raw).get("runtime_env", {}).get("working_dir"))
    except (ValueError, AttributeError):
        return False


RUNS_DIR = "~/flowrl_runs"  # a submitted job's outputs, as Ray Train keeps its runs in ~/ray_results


def outputs_of_a_submitted_job(cfg: JobConfig) -> JobConfig:
    """The config with output paths that outlive the job when it runs in Ray's copy of the submitted folder
    (`runs_in_a_copy`), which goes away with it: a relative output_dir becomes RUNS_DIR/<run_name> in the home folder
    of the driver's user, a relative checkpoint.storage a folder inside output_dir. Otherwise the config as it is."""
    from pathlib import Path

    if not runs_in_a_copy():
        return cfg
    out = Path(cfg.output_dir)
    if not out.is_absolute():
        out = Path(RUNS_DIR).expanduser() / cfg.run_name
    storage = cfg.checkpoint.storage
    if storage and not Path(storage).is_absolute():
        storage = str(out / storage)
    return cfg.model_copy(update={"output_dir": str(out),
                                  "checkpoint": cfg.checkpoint.model_copy(update={"storage": storage})})


def joins_cluster(cfg: RayConfig) -> bool:
    """Whether the job joins a running cluster (ray.address or RAY_ADDRESS) rather than starting a local Ray."""
    return bool(cfg.address or os.environ.get("RAY_ADDRESS"))


def start_ray(cfg: RayConfig, metrics_port: int | None = None) -> str:
    """Connect to `cfg.address` or RAY_ADDRESS when given, else start a local Ray bound to `cfg.host` (127.0.0.1)
    whose metrics agent exports on `metrics_port` (0: any free port); say which."""
    import ray

    if joins_cluster(cfg):
        address = cfg.address or os.environ["RAY_ADDRESS"]
        ray.init(address=address, namespace=cfg.namespace, log_to_driver=True, logging_level=RAY_LOGGING_LEVEL)
        drop_death_notices()
        return f"joined the Ray cluster at {address}"
    if os.environ.get(LOOPBACK_ENV) != "0":
        raise RuntimeError(f"{LOOPBACK_ENV}=0 must be set before `import ray`, or a local Ray listens on every address")
    context = ray.init(
        address="local",  # a new Ray of this job's own, never a cluster another process left running here
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        include_dashboard=cfg.include_dashboard,
        namespace=cfg.namespace,
        _node_ip_address=cfg.host,
        _metrics_export_port=metrics_port or None,
        log_to_driver=True,
        logging_level=RAY_LOGGING_LEVEL,
    )
    drop_death_notices()
    return f"started a local Ray on {cfg.host} (address {context.address_info['gcs_address']})"


# How Ray's own notices of a death start: a worker's (a killed actor, say), a node's raylet, a node marked dead.
DEATH_NOTICES = ("A worker died or was killed", "Raylet is terminated", "The node with node id")


def drop_death_notices() -> None:
    """Keep Ray's "(raylet) A worker died or was killed ..." warnings, and its notices of a lost node (the tail of
    the raylet's log included), out of this driver's output: the pool that saw the death says it in one `[flowrl]`
    line, and the job's node watch the node's loss. Ray pushes these notices to the drivers and prints them through
    `print_to_stdstream`, looked up anew for each; the actors' own output (log_to_driver) goes through a handler
    bound at ray.init, so it is untouched, and so are Ray's other warnings (a task killed for memory, say)."""
    from ray._private import worker

    print_lines = worker.print_to_stdstream
    if getattr(print_lines, "drops_death_notices", False):
        return

    def without_death_notices(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            data = {**data, "lines": [line for line in data.get("lines", []) if not line.startswith(DEATH_NOTICES)]}
            if not data["lines"]:
                return
        print_lines(data, ignore_prefix)

    without_death_notices.drops_death_notices = True
    worker.print_to_stdstream = without_death_notices


def metrics_endpoint(discovery: bool) -> str:
    """Where this node's Prometheus metrics are; with `discovery` (a Ray dashboard runs: it writes the file), also the
    service-discovery file that lists every node's endpoint."""
    from ray._private import worker

    node = worker._global_node  # the node this driver runs on
    where = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    if not discovery:
        return where + " (this node; no service-discovery file without the Ray dashboard)"
    return f"{where} (all nodes: {os.path.join(node.get_session_dir_path(), 'prom_metrics_service_discovery.json')})"


def pool_demand(cfg: JobConfig) -> dict[str, dict[str, float]]:
    """CPUs and GPUs each pool asks for: actors x per-actor resources (the reward pool summed over its scorers)."""
    pools = {"rollout": [cfg.rollout], "rewards": [cfg.rewards.pool_of(s) for s in cfg.rewards.scorers],
             "learner": [cfg.learner]}
    return {
        name: {"CPU": sum(p.num_actors * p.num_cpus_per_actor for p in parts),
               "GPU": sum(p.num_actors * p.num_gpus_per_actor for p in parts)}
        for name, parts in pools.items()
    }


def check_pools_fit(cfg: JobConfig, available: dict[str, float]) -> None:
    """Raise ClusterTooSmall, naming each pool's share, when the cluster's totals cannot hold the pools (on one node
    that is the whole check; across nodes cluster.pools also checks each pool's bundles against every node)."""
    demand = pool_demand(cfg)
    problems = []
    for res in ("CPU", "GPU"):
        total = sum(d[res] for d in demand.values())
        have = float(available.get(res, 0.0))
        if total > have + 1e-9:
            parts = ", ".join(f"{name} {d[res]:g}" for name, d in demand.items())
            problems.append(f"the pools need {total:g} {res}s ({parts}) but the Ray cluster has {have:g}")
    if problems:
        raise ClusterTooSmall("; ".join(problems) + "; lower the pools' num_actors / num_*_per_actor or add nodes")
