"""Ray start-up refuses to leave loopback by accident, and pools that cannot fit are refused before anything waits.
(tests/test_security.py lists the sockets of a whole job.)"""

from pathlib import Path

import pytest

from cluster.config_loading import load_config
from cluster.runtime import ClusterTooSmall, check_pools_fit, pool_demand, start_ray

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
