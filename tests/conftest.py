"""Shared fixtures: tiny FLUX / SD3 model folders built once per session, and one local Ray on loopback."""

from __future__ import annotations

import os

# Before anything imports ray: keep every Ray process of the test session on 127.0.0.1.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.pop("RAY_ADDRESS", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from rollout.models.tiny import build_tiny  # noqa: E402

TINY_SEED = 0
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> diffusers folder of the tiny random model built with TINY_SEED (read-only for tests)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_tiny(family, root / family, seed=TINY_SEED) for family in ("flux", "sd3")}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on one torch thread (use per module): on a busy 2-core machine two OpenMP threads run many times
    slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, loopback only, no dashboard); tests share it."""
    import ray

    from cluster.config import RayConfig
    from cluster.runtime import start_ray

    if not ray.is_initialized():
        start_ray(RayConfig(num_cpus=2, namespace="tests"))
    yield ray
    ray.shutdown()
