"""Shared fixtures: the tiny model folder of each family, built once per session on first use, and one local Ray on
loopback."""

from __future__ import annotations

import os

# Before anything imports ray: keep every Ray process of the test session on 127.0.0.1.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.pop("RAY_ADDRESS", None)
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download: a hub id not in the cache fails as it does offline

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TINY_SEED = 0
DATA = Path(__file__).resolve().parents[1] / "data"  # the prompt sets of Flow-GRPO (data/README.md)


class TinyModels:
    """family -> the diffusers folder of its tiny random model (seed TINY_SEED), built on first use of that family and
    kept for the session (read-only for tests): a test that needs only FLUX builds only FLUX."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[str, Path] = {}

    def __getitem__(self, family: str) -> Path:
        if family not in self.built:
            from rollout.models.tiny import build_tiny

            self.built[family] = build_tiny(family, self.root / family, seed=TINY_SEED)
        return self.built[family]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """The tiny models of every family (flux, sd3, flux2, qwen_image, z_image): `tiny_model_dirs["sd3"]`."""
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that starts Ray (through `ray_local`) is a slow one: the fast lane (`-m "not slow"`) starts no Ray."""
    unmarked = [item.nodeid for item in items
                if "ray_local" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("tests that start Ray (ray_local) must be marked slow:\n  " + "\n  ".join(unmarked))
