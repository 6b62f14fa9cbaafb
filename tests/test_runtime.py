"""Ray start-up refuses to leave loopback by accident, pools that cannot fit are refused before anything waits, and a
submitted job keeps its outputs out of Ray's copy of its folder. (tests/test_security.py lists the sockets of a whole
job; tests/test_job_submit.py submits one.)"""

from pathlib import Path

import pytest

from cluster.config_loading import load_config
from cluster.runtime import ClusterTooSmall, check_pools_fit, outputs_of_a_submitted_job, pool_demand, start_ray

ROOT = Path(__file__).resolve().parents[1]

def test_start_ray_refuses_without_the_loopback_switch(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    cfg = load_config(ROOT / "cluster/tiny.yaml")
    with pytest.raises(RuntimeError, match="RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"):
        start_ray(cfg.ray)


def test_pool_demand_counts_every_actor():
    cfg = load_config(ROOT / "cluster/flux.yaml")
    d = pool_demand(cfg)
    assert d["rollout"] == {"CPU": 16, "GPU": 4}
    assert d["rewards"] == {"CPU": 2, "GPU": 1}
    assert d["learner"] == {"CPU": 12, "GPU": 3}


def test_tiny_fits_two_cpus_and_flux_does_not():
    check_pools_fit(load_config(ROOT / "cluster/tiny.yaml"), {"CPU": 2.0})
    with pytest.raises(ClusterTooSmall) as e:
        check_pools_fit(load_config(ROOT / "cluster/flux.yaml"), {"CPU": 64.0, "GPU": 4.0})
    msg = str(e.value)
    assert "8 GPUs" in msg and "rollout 4" in msg and "has 4" in msg
    assert "CPUs" not in msg  # 30 CPUs of 64 fit


def test_a_submitted_job_keeps_relative_outputs_in_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    tiny = load_config(ROOT / "cluster/tiny.yaml")  # output_dir: runs/tiny
    assert outputs_of_a_submitted_job(tiny) is tiny  # not a submitted job: relative to the folder it starts in
    # as `ray job submit --working-dir` starts the entrypoint, in Ray's temporary copy of the submitted folder
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "gcs://_ray_pkg_01.zip"}}')
    runs = tmp_path / "flowrl_runs"
    moved = outputs_of_a_submitted_job(tiny)
    assert (moved.output_dir, moved.checkpoint.storage) == (str(runs / "tiny"), None)
    moved = outputs_of_a_submitted_job(load_config(ROOT / "cluster/tiny.yaml", ["checkpoint.storage=ckpt"]))
    assert (moved.output_dir, moved.checkpoint.storage) == (str(runs / "tiny"), str(runs / "tiny" / "ckpt"))
    given = load_config(ROOT / "cluster/tiny.yaml", [f"output_dir={tmp_path / 'out'}", "checkpoint.storage=ckpt"])
    moved = outputs_of_a_submitted_job(given)  # an absolute output_dir stays; a relative storage goes inside it
    assert (moved.output_dir, moved.checkpoint.storage) == (str(tmp_path / "out"), str(tmp_path / "out" / "ckpt"))
    shared = load_config(ROOT / "cluster/tiny.yaml", [f"checkpoint.storage={tmp_path / 'shared'}"])
    assert outputs_of_a_submitted_job(shared).checkpoint.storage == str(tmp_path / "shared")
