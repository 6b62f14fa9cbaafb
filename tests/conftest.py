"""Shared fixtures: tiny FLUX / SD3 model folders, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from rollout.tiny import build_tiny

TINY_SEED = 0


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> diffusers folder of the tiny random model built with TINY_SEED (read-only for tests)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_tiny(family, root / family, seed=TINY_SEED) for family in ("flux", "sd3")}
