"""The job's entry point: `python -m learner.main --cfg cluster/tiny.yaml [--set key.sub=value ...]`.

Today it validates the config, starts or joins Ray and checks that the pools fit, loads (or builds) the model, encodes
one training prompt and samples one image with the ODE, and says so. The GRPO training loop is not part of it yet.
"""

import os

# Before anything imports ray: a local Ray otherwise listens on every network address, not only 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from cluster.config import ConfigError, JobConfig, load_config  # noqa: E402

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m learner.main", description=__doc__.splitlines()[0])
    ap.add_argument("--cfg", required=True, help="YAML job config, e.g. cluster/tiny.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set learner.lr=1e-4 (repeatable)")
    ap.add_argument("--check", action="store_true", help="validate the config, print it, and exit")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap.parse_args(argv)


def say(msg: str) -> None:
    print(f"[flowrl] {msg}", flush=True)


def run(cfg: JobConfig) -> None:
    """Everything the job does today, top to bottom."""
    import ray
    import torch

    from cluster.runtime import check_pools_fit, pool_demand, start_ray
    from rollout.models import load_flow_model
    from rollout.sources import training_prompts
    from rollout.tiny import ensure_tiny

    say(start_ray(cfg.ray))
    try:
        available = ray.cluster_resources()
        check_pools_fit(cfg, available)
        demand = pool_demand(cfg)
        say("pools fit the cluster (CPU/GPU): " + ", ".join(
            f"{k} {v['CPU']:g}/{v['GPU']:g}" for k, v in demand.items())
            + f"; cluster has {available.get('CPU', 0):g}/{available.get('GPU', 0):g}")
    finally:
        ray.shutdown()

    prompts = training_prompts(cfg.data, seed=cfg.seed)
    say(f"{len(prompts)} training prompts from source '{cfg.data.source}'")

    m = cfg.model
    if m.build_tiny:
        ensure_tiny(m.family, Path(m.path), seed=m.tiny_seed)
    device = "cuda" if cfg.rollout.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model = load_flow_model(m.path, m.family, dtype=getattr(torch, m.dtype), device=device,
                            allow_download=m.allow_download, max_sequence_length=m.max_sequence_length)
    n_params = sum(p.numel() for p in model.transformer.parameters())
    say(f"loaded {m.family} from {m.path} on {device} ({m.dtype}, transformer {n_params / 1e6:.2f} M parameters) "
        f"in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    image = sample_ode_image(model, prompts[0].prompt, cfg)
    say(f"sampled one {image.shape[2]}x{image.shape[1]} image of {prompts[0].prompt!r} with {cfg.sampler.num_steps} "
        f"ODE steps in {time.perf_counter() - t0:.1f} s (pixel mean {image.float().mean():.1f})")
    say("the GRPO training loop is not implemented yet: nothing was trained and nothing was written")


def sample_ode_image(model, prompt: str, cfg: JobConfig):
    """One deterministic Euler (ODE) sample from seed cfg.seed; returns uint8 (1, H, W, 3)."""
    import torch

    res = cfg.model.resolution
    embeds = model.encode_prompts([prompt])
    negative = model.negative_embeds() if cfg.model.family == "sd3" else None
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(model.latent_shape(1, res, res), generator=gen).to(model.device)
    sig = model.sigmas(cfg.sampler.num_steps, res, res)
    with torch.no_grad():
        for i in range(len(sig) - 1):
            v = model.velocity(x, float(sig[i]), embeds, guidance_scale=cfg.sampler.guidance_scale,
                               negative=negative, image_size=(res, res))
            x = x + (float(sig[i + 1]) - float(sig[i])) * v
    return model.decode(x, res, res)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.cfg, args.set)
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
    try:
        run(cfg)
    except Exception as e:  # one clear line unless --debug
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2 if isinstance(e, user_errors()) else 1
    return 0


def user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by the job's inputs (config, files, cluster size): exit code 2, like a bad config."""
    from cluster.runtime import ClusterTooSmall
    from rollout.models import ModelLoadError

    return (ValueError, FileNotFoundError, ClusterTooSmall, ModelLoadError)


if __name__ == "__main__":
    sys.exit(main())
