"""The tiny job learns: the JPEG-compressibility reward rises clearly under GRPO (CPS and Flow-SDE) and under the
forward-process objectives (DiffusionNFT and AWM on ODE samples)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind,noise_level", [("cps", 0.9), ("sde", 0.7)])
def test_tiny_run_raises_the_reward(kind, noise_level, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "learner.main", "--cfg", "cluster/tiny.yaml",
                        "--set", f"output_dir={tmp_path}", "--set", f"sampler.kind={kind}",
                        "--set", f"sampler.noise_level={noise_level}",
                        "--set", "eval.every_n_iterations=0", "--set", "checkpoint.every_n_iterations=0",
                        "--set", "metrics.port=0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert len(rows) == 50
    first = sum(h["reward_mean"] for h in rows[:3]) / 3
    last = sum(h["reward_mean"] for h in rows[-3:]) / 3
    spread = rows[0]["reward_std"]  # of single images within the first iteration
    assert last - first > 4 * spread, (first, last, spread)


@pytest.mark.slow
@pytest.mark.parametrize("objective,lr", [("nft", 1.5e-2), ("awm", 3e-2)])
def test_tiny_run_raises_the_reward_with_a_forward_objective(objective, lr, tmp_path):
    """50 iterations (seeded, so the same on every run of one machine); the rise is smaller than GRPO's, so the bar
    is 3 spreads. AWM divides the advantage by its clip (5): it takes a larger learning rate."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "learner.main", "--cfg", "cluster/tiny.yaml",
                        "--set", f"output_dir={tmp_path}", "--set", f"learner.objective={objective}",
                        "--set", "sampler.kind=ode", "--set", f"learner.lr={lr}",
                        "--set", "eval.every_n_iterations=0", "--set", "checkpoint.every_n_iterations=0",
                        "--set", "metrics.port=0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and "ratio_mean" not in rows[0]  # no importance ratio in these objectives
    first = sum(h["reward_mean"] for h in rows[:3]) / 3
    last = sum(h["reward_mean"] for h in rows[-3:]) / 3
    spread = rows[0]["reward_std"]
    assert last - first > 3 * spread, (first, last, spread)
