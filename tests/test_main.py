"""`python -m learner.main` end to end on the tiny config, and its one-line errors for bad inputs."""

import pytest

from tests.jobs import ROOT, job_env, run_job


@pytest.mark.slow
def test_tiny_job_builds_the_model_on_first_use_and_trains(tmp_path):
    model_dir = tmp_path / "tiny-flux"
    r = run_job("tiny", "metrics.port=0", f"model.path={model_dir}", "iterations=1", "eval.every_n_iterations=0",
                out=tmp_path / "out", timeout=300)
    assert (model_dir / "transformer" / "config.json").is_file()  # built on first use
    out = r.stdout
    assert "started a local Ray on 127.0.0.1" in out
    assert "iter 1/1 v1" in out and "done: 1 iterations" in out
    assert (tmp_path / "out" / "checkpoints" / "iter-000001" / "trainer.json").is_file()


@pytest.mark.slow
def test_missing_model_folder_is_one_line_and_exit_2(tmp_path):
    r = run_job("tiny", "metrics.port=0", f"model.path={tmp_path / 'absent'}", "model.build_tiny=false", out=None,
                expect_rc=2, timeout=300)
    errors = r.errors
    assert len(errors) == 1 and "absent" in errors[0] and "local diffusers folder or a hub id" in errors[0]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_a_submitted_job_says_first_where_its_outputs_go(tmp_path):
    # as `ray job submit --working-dir` starts the entrypoint: in Ray's temporary copy of the submitted folder; the
    # relative output_dir of tiny.yaml goes to ~/flowrl_runs/tiny instead (a missing model then stops the job)
    job_config = '{"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}'
    r = run_job("tiny", f"model.path={tmp_path / 'absent'}", "model.build_tiny=false", out=None, expect_rc=2,
                timeout=300, env=job_env(RAY_JOB_CONFIG_JSON_ENV_VAR=job_config, HOME=str(tmp_path)))
    runs = tmp_path / "flowrl_runs" / "tiny"
    assert r.stdout.splitlines()[1:3] == [
        f"[flowrl] relative paths resolve against {ROOT} (Ray's copy of the submitted folder)",
        f"[flowrl] outputs go to {runs}, checkpoints to {runs / 'checkpoints'}"]
