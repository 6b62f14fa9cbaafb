"""`python -m learner.main --dry-run` with the shipped GPU configs: given their prompt data, a model and reward weights,
every pool is placed (on a local Ray with eight logical GPUs) and its files are found where it is placed, nothing is
loaded or written; options that cannot build are refused before Ray starts.

The model folders are the tiny random FLUX / SD3 in the real layout, the reward weights tiny random checkpoints in
the layouts the scorers load (tests/reward_checkpoints.py); the prompt sets are the real ones from ../shared/datasets,
or a few lines in their formats where that folder is absent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED
from tests.reward_checkpoints import save_tiny_clip, save_tiny_mask2former

ROOT = Path(__file__).resolve().parents[1]
# One 8-GPU node, as the shipped configs expect; the GPUs are Ray's bookkeeping only, nothing runs on them.
EIGHT_GPUS = ["ray.num_cpus=32", "ray.num_gpus=8", "metrics.port=0"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> dict[str, Path]:
    """The Pick-a-Pic and GenEval prompt files of the papers, or a few lines of each format without ../shared."""
    files = {"pickscore_train": SHARED / "pickscore" / "train.txt", "pickscore_test": SHARED / "pickscore" / "test.txt",
             "geneval": SHARED / "geneval" / "test_metadata.jsonl"}
    if all(p.is_file() for p in files.values()):
        return files
    root = tmp_path_factory.mktemp("prompts")
    for name in ("pickscore_train", "pickscore_test"):
        files[name] = root / f"{name}.txt"
        files[name].write_text("a cat on a sofa\na lighthouse at dusk\n")
    files["geneval"] = root / "geneval.jsonl"
    files["geneval"].write_text(json.dumps({"tag": "single_object", "include": [{"class": "dog", "count": 1}],
                                            "prompt": "a photo of a dog"}) + "\n")
    return files


@pytest.fixture(scope="module")
def reward_weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward-weights")
    return {"clip": save_tiny_clip(root / "clip"), "mask2former": save_tiny_mask2former(root / "mask2former")}


def dry_run(name: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "learner.main", "--cfg", f"cluster/{name}.yaml", "--dry-run",
            "--set", f"output_dir={out}"]
    for o in EIGHT_GPUS + list(overrides):
        args += ["--set", o]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def assert_placed_and_nothing_written(r: subprocess.CompletedProcess, out: Path, pools: dict[str, str]) -> None:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for pool, bundles in pools.items():
        assert f"{pool}: {bundles} (PACK), checked on node" in r.stdout, r.stdout[-3000:]
    assert "dry run: every check passed" in r.stdout and "actors up" not in r.stdout
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_flux_yaml_passes_the_dry_run(tiny_model_dirs, prompts, reward_weights, tmp_path):
    clip = reward_weights["clip"]
    r = dry_run("flux", tmp_path, f"model.path={tiny_model_dirs['flux']}",
                f"data.path={prompts['pickscore_train']}", f"eval.path={prompts['pickscore_test']}",
                f"rewards.scorers=[{{name: pickscore, options: {{path: '{clip}', processor_path: '{clip}'}}}}]")
    assert_placed_and_nothing_written(r, tmp_path, {
        "learner": "3 x {CPU 4, GPU 1}", "rollout": "4 x {CPU 4, GPU 1}", "rewards/pickscore": "1 x {CPU 2, GPU 1}"})


@pytest.mark.slow
def test_sd3_yaml_passes_the_dry_run(tiny_model_dirs, prompts, reward_weights, tmp_path):
    geneval = prompts["geneval"]
    options = f"{{detector: mask2former, detector_model: '{reward_weights['mask2former']}', " \
              f"clip_model: '{reward_weights['clip']}'}}"
    r = dry_run("sd3", tmp_path, f"model.path={tiny_model_dirs['sd3']}", f"eval.path={geneval}",
                f"data.exclude_path={geneval}", f"rewards.scorers=[{{name: geneval, options: {options}}}]")
    assert_placed_and_nothing_written(r, tmp_path, {
        "learner": "3 x {CPU 4, GPU 1}", "rollout": "4 x {CPU 4, GPU 1}", "rewards/geneval": "1 x {CPU 4, GPU 1}"})


@pytest.mark.slow
def test_scorer_options_that_cannot_build_are_refused_before_ray_starts(tiny_model_dirs, prompts, tmp_path):
    geneval = prompts["geneval"]
    r = dry_run("sd3", tmp_path, f"model.path={tiny_model_dirs['sd3']}", f"eval.path={geneval}",
                f"data.exclude_path={geneval}", "rewards.scorers=[{name: geneval, options: {detector: mask2former}}]")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    [error] = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert "rewards.scorers.0.options: geneval: detector 'mask2former' needs detector_model" in error
    assert "Ray" not in r.stdout and "Traceback" not in r.stderr



@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux2", "qwen_image", "z_image"])
def test_the_new_families_yamls_pass_the_dry_run(family, prompts, reward_weights, tmp_path):
    from rollout.models.tiny import build_tiny

    model = build_tiny(family, tmp_path / "model")  # the tiny random model in the real layout
    clip, out = reward_weights["clip"], tmp_path / "out"
    out.mkdir()
    r = dry_run(family, out, f"model.path={model}", f"data.path={prompts['pickscore_train']}",
                f"eval.path={prompts['pickscore_test']}",
                f"rewards.scorers=[{{name: pickscore, options: {{path: '{clip}', processor_path: '{clip}'}}}}]")
    assert_placed_and_nothing_written(r, out, {
        "learner": "3 x {CPU 4, GPU 1}", "rollout": "4 x {CPU 4, GPU 1}", "rewards/pickscore": "1 x {CPU 2, GPU 1}"})
