"""`python -m learner.main` end to end on the tiny config, and its one-line errors for bad inputs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_main(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "learner.main", "--cfg", "cluster/tiny.yaml", "--set", "metrics.port=0",
                           *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_tiny_job_builds_the_model_on_first_use_and_trains(tmp_path):
    model_dir = tmp_path / "tiny-flux"
    r = run_main("--set", f"model.path={model_dir}", "--set", f"output_dir={tmp_path / 'out'}",
                 "--set", "iterations=1", "--set", "eval.every_n_iterations=0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (model_dir / "transformer" / "config.json").is_file()  # built on first use
    out = r.stdout
    assert "started a local Ray on 127.0.0.1" in out
    assert "iter 1/1 v1" in out and "done: 1 iterations" in out
    assert (tmp_path / "out" / "checkpoints" / "iter-000001" / "trainer.json").is_file()


@pytest.mark.slow
def test_missing_model_folder_is_one_line_and_exit_2(tmp_path):
    r = run_main("--set", f"model.path={tmp_path / 'absent'}", "--set", "model.build_tiny=false")
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "absent" in errors[0] and "allow_download" in errors[0]
    assert "Traceback" not in r.stderr


def test_a_submitted_job_refuses_relative_output_paths_and_says_where_relative_paths_resolve(tmp_path):
    # as `ray job submit --working-dir` starts the entrypoint: in Ray's temporary copy of the submitted folder
    job_config = '{"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}'
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for field in ("output_dir=runs/relative", "checkpoint.storage=ckpt/relative"):
        r = subprocess.run([sys.executable, "-m", "learner.main", "--cfg", "cluster/tiny.yaml", "--set", field,
                            *([] if field.startswith("output_dir") else ["--set", f"output_dir={tmp_path}"])],
                           cwd=ROOT, env={**env, "RAY_JOB_CONFIG_JSON_ENV_VAR": job_config}, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2, r.stderr[-2000:]
        assert f"relative paths resolve against {ROOT} (Ray's copy of the submitted folder)" in r.stdout
        [error] = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        name, value = field.split("=")
        assert f"{name} = '{value}' is relative, and this job runs in Ray's temporary copy" in error
        assert "give an absolute path" in error
    assert not (ROOT / "runs" / "relative").exists() and not (ROOT / "ckpt").exists()
