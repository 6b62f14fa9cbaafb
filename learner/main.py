"""The job's entry point: `python -m learner.main --cfg cluster/tiny.yaml [--set key.sub=value ...]`.

Validates the config, starts a local Ray on 127.0.0.1 or joins the running cluster (under `ray job submit`), checks
that the actor pools fit, then trains (learner/driver/job.py), evaluates and checkpoints as the config says.
"""

import os

# Before anything imports ray: a local Ray otherwise listens on every network address, not only 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from cluster.quiet import quiet_here  # noqa: E402

quiet_here()  # before transformers, diffusers and ray are imported: their bars and advice stay off

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from cluster.config import ConfigError, JobConfig  # noqa: E402
from cluster.config_loading import load_config  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m learner.main", description=__doc__.splitlines()[0])
    ap.add_argument("--cfg", required=True, help="YAML job config, e.g. cluster/tiny.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set learner.lr=1e-4 (repeatable)")
    ap.add_argument("--resume", metavar="DIR|auto|none",
                    help="continue from a checkpoint folder, or the newest in checkpoint.storage (overrides "
                         "checkpoint.resume)")
    ap.add_argument("--check", action="store_true", help="validate the config, print it, and exit")
    ap.add_argument("--dry-run", action="store_true",
                    help="run every check, place every pool and check its files on its node, then exit (no model "
                         "is loaded)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap.parse_args(argv)


def say(msg: str) -> None:
    print(f"[flowrl] {msg}", flush=True)


def run(cfg: JobConfig, resume: str, dry_run: bool = False) -> None:
    """Check the inputs (learner/driver/preflight.py), start or join Ray, check the pools fit, build the actors, train,
    shut down. `dry_run`: stop after placing every pool and checking its files on its node."""
    import ray

    from cluster.quiet import name_deepspeed_accelerator
    from cluster.runtime import (check_pools_fit, joins_cluster, metrics_endpoint, outputs_of_a_submitted_job,
                                 runs_in_a_copy, start_ray)
    from learner.driver.preflight import preflight
    from learner.ranks.checkpoint import checkpoint_root

    copy = " (Ray's copy of the submitted folder)" if runs_in_a_copy() else ""
    say(f"relative paths resolve against {Path.cwd()}{copy}")
    cfg = outputs_of_a_submitted_job(cfg)  # not in Ray's copy, which goes away with the job
    say(f"outputs go to {Path(cfg.output_dir).absolute()}, checkpoints to {checkpoint_root(cfg).absolute()}")
    name_deepspeed_accelerator()  # before a tiny model is built here: its imports would load DeepSpeed, which warns
    # every check that needs no Ray: a bad input fails here, before anything starts (its lines: what is downloaded)
    for line in preflight(cfg, resume, dry_run):
        say(line)
    say(start_ray(cfg.ray, cfg.metrics.port))
    if cfg.metrics.enabled and not dry_run:
        say(f"metrics: {metrics_endpoint(discovery=joins_cluster(cfg.ray) or cfg.ray.include_dashboard)}")
    job = None
    try:
        check_pools_fit(cfg, ray.cluster_resources())
        if dry_run:
            from learner.driver.placement import dry_run as check_placed

            for line in check_placed(cfg):
                say(line)
            say("dry run: every check passed; nothing was loaded or trained")
            return
        from learner.driver.job import Job

        job = Job(cfg, say)
        job.resume(resume)
        started = time.perf_counter()
        history = job.run()
        if history:
            first, last = history[0], history[-1]
            say(f"done: {len(history)} iterations in {time.perf_counter() - started:.1f} s, reward "
                f"{first['reward_mean']:.4f} -> {last['reward_mean']:.4f}, policy version {last['policy_version']}; "
                f"checkpoints in {checkpoint_root(job.cfg)}")
        else:
            say(f"nothing to do: the run had already reached {cfg.iterations} iterations")
    finally:
        if job is not None:
            job.shutdown()
        ray.shutdown()


def check_objective(cfg: JobConfig, source: str) -> None:
    """The objective's name and the config relations it needs (ConfigError naming the config file)."""
    from learner.objectives.registry import objective_for

    try:
        objective_for(cfg)
    except ConfigError as e:
        raise ConfigError(e.problems, source) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.cfg, args.set)
        check_objective(cfg, args.cfg)
    except ConfigError as e:
        if args.debug:
            raise
        print(e, file=sys.stderr)
        return 2
    if args.check:
        print(cfg.to_yaml(), end="")
        say(f"{args.cfg}: valid")
        return 0
    say(f"{args.cfg}: valid ({cfg.model.family} at {cfg.model.path}, sampler {cfg.sampler.kind}, "
        f"{cfg.data.images_per_iteration // cfg.data.group_size} groups x {cfg.data.group_size} per iteration)")
    from learner.ranks.checkpoint import given_with_set

    try:
        with given_with_set(args.set):  # keys a resumed run may change from its checkpoint's training config
            run(cfg, args.resume or cfg.checkpoint.resume, dry_run=args.dry_run)
    except Exception as e:  # one clear line unless --debug
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2 if isinstance(e, user_errors()) else 1
    return 0


def user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by the job's inputs (config, files, cluster size): exit code 2, like a bad config."""
    from cluster.pools import PlacementError
    from cluster.runtime import ClusterTooSmall
    from learner.driver.inputs import InputError
    from rollout.models.loading import ModelLoadError

    # CheckpointError, PromptFileError and NodeCheckFailed are ValueErrors too
    return (ValueError, FileNotFoundError, ClusterTooSmall, PlacementError, ModelLoadError, InputError)


def exit_now(code: int) -> None:
    """End the process with `code` once its output is flushed. Everything the job writes is closed and synced by then
    and Ray is shut down; what `sys.exit` would add is the interpreter's teardown of torch, diffusers and Ray's core
    worker, over a second of native destructors that write nothing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
