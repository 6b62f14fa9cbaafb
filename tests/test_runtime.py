"""Ray start-up stays on loopback, and pools that cannot fit are refused before anything waits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.runtime import ClusterTooSmall, check_pools_fit, pool_demand, start_ray

ROOT = Path(__file__).resolve().parents[1]

LISTENERS = r"""
import json, sys
import learner.main  # must come first: it sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER before ray is imported
import psutil, ray
from cluster.config import load_config
from cluster.runtime import start_ray

cfg = load_config("cluster/tiny.yaml")
start_ray(cfg.ray)
ray.get(ray.remote(num_cpus=0.5)(lambda: 1).remote())  # a worker process too
me = psutil.Process()
pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
socks = [(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()) for c in psutil.net_connections("inet")
         if c.status == psutil.CONN_LISTEN and c.pid in pids]
ray.shutdown()
print(json.dumps(socks))
"""


@pytest.mark.slow
def test_local_ray_listens_only_on_loopback():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    r = subprocess.run([sys.executable, "-c", LISTENERS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    socks = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(socks) >= 3, socks  # gcs_server, raylet, workers were found
    loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    assert [s for s in socks if s[0] not in loopback] == []


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
