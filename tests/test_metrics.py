"""Metrics: one list of names shared by the code, the Grafana dashboard and the README, and a real Prometheus server
scraping a tiny job through Ray's service discovery, every dashboard query answered; that job's sockets all on
loopback."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from cluster.metrics import BY_NAME, EXPORTED_PREFIX, METRICS, REWARD_EVENTS, Recorder
from tests.jobs import ROOT, job_env, listening, start_job

DASHBOARD = ROOT / "cluster" / "grafana" / "dashboard.json"
SCRAPE_CONFIG = ROOT / "cluster" / "prometheus.yml"
NAME = re.compile(re.escape(EXPORTED_PREFIX) + r"([a-z0-9_]+)")
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def base_name(exported: str) -> str:
    """A histogram's series name (…_bucket, …_count, …_sum) back to its metric name."""
    for suffix in ("_bucket", "_count", "_sum"):
        if exported.endswith(suffix) and exported[: -len(suffix)] in BY_NAME:
            return exported[: -len(suffix)]
    return exported


def test_dashboard_uses_exactly_the_metric_list():
    used = {base_name(m) for expr in dashboard_exprs() for m in NAME.findall(expr)}
    assert used == set(BY_NAME), (f"in the dashboard but not in METRICS: {sorted(used - set(BY_NAME))}; "
                                  f"in METRICS but not in the dashboard: {sorted(set(BY_NAME) - used)}")


def test_histograms_are_queried_by_bucket():
    exprs = " ".join(dashboard_exprs())
    for spec in METRICS:
        if spec.kind == "histogram":
            assert f"{EXPORTED_PREFIX}{spec.name}_bucket" in exprs


def test_readme_lists_exactly_the_metric_list():
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `" + re.escape(EXPORTED_PREFIX) + r"([a-z0-9_]+)` \| (\w+) \|", readme, re.M)
    assert sorted(name for name, _ in rows) == sorted(BY_NAME)
    assert all(BY_NAME[name].kind == kind for name, kind in rows)


def test_metric_names_are_valid_and_unique():
    names = [spec.name for spec in METRICS]
    assert len(names) == len(set(names))
    for spec in METRICS:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", spec.name)
        assert spec.kind in ("gauge", "counter", "histogram")
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name


@pytest.mark.slow
def test_recorder_refuses_unknown_names_and_wrong_kinds(ray_local):
    recorder = Recorder()
    assert recorder.enabled
    with pytest.raises(KeyError, match="unknown metric"):
        recorder.set("no_such_metric", 1.0)
    with pytest.raises(TypeError, match="is a counter"):
        recorder.set("groups_trained_total", 1.0)
    with pytest.raises(TypeError, match="is a gauge"):
        recorder.inc("loss")


def test_recorder_without_ray_records_nothing():
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray of this test session is running")
    recorder = Recorder()
    assert not recorder.enabled
    recorder.set("no_such_metric", 1.0)  # disabled: not even looked up


# ---------------------------------------------------------------------------------------------------------------------
# A real Prometheus server against a tiny job


def prometheus_binary() -> str | None:
    local = ROOT / ".cache" / "prometheus" / "prometheus"
    if local.is_file():
        return str(local)
    from shutil import which

    return which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port: int, expr: str, at: float) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for_line(proc: subprocess.Popen, pattern: str, log: list[str], timeout: float) -> re.Match:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        log.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matching {pattern!r}; output:\n" + "".join(log[-40:]))


@pytest.mark.slow
def test_prometheus_answers_every_dashboard_query_during_a_tiny_run_that_listens_on_loopback_only(tmp_path):
    """A tiny job with two learner ranks (torch.distributed store + gloo), the Ray dashboard and metrics agent,
    scraped by a real Prometheus: every dashboard query gets a series, and every socket the job's processes listen on
    (listed while it trains, the job started without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER) is on 127.0.0.1."""
    binary = prometheus_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("no Prometheus server: setup.sh unpacks Debian's into .cache/prometheus")
        pytest.skip("no Prometheus server (tests/fixtures/fetch_prometheus.sh unpacks Debian's)")
    ranges = [int(n) * {"s": 1, "m": 60}[u] for expr in dashboard_exprs() for n, u in re.findall(r"\[(\d+)([sm])\]",
                                                                                                   expr)]
    widest = max(ranges)
    metrics_port, prom_port = free_port(), free_port()
    # Ray's agent exports every second (default 10 s); learner.main itself keeps a local Ray on loopback
    env = job_env(RAY_metrics_report_interval_ms="1000", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=None)
    log: list[str] = []
    prom = None
    with start_job("tiny", "iterations=1000", f"metrics.port={metrics_port}", "ray.include_dashboard=true",
                   "eval.every_n_iterations=5", "eval.num_prompts=4", "checkpoint.every_n_iterations=0",
                   "learner.num_actors=2", "learner.num_cpus_per_actor=0.25", out=tmp_path / "run", env=env) as job:
        try:
            found = wait_for_line(job, r"metrics: http://127\.0\.0\.1:(\d+)/metrics \(all nodes: (\S+)\)", log, 240)
            assert int(found.group(1)) == metrics_port
            config = yaml.safe_load(SCRAPE_CONFIG.read_text())  # the example config, pointed at this job
            config["global"]["scrape_interval"] = "1s"
            config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [found.group(2)]
            config["scrape_configs"][0]["file_sd_configs"][0]["refresh_interval"] = "1s"
            (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
            prom = subprocess.Popen(
                [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
            started = time.time()
            # past at least one evaluation; then every query answered once two scrapes fall in its range (a rate
            # needs two), at the latest a minute after the widest range of the dashboard has passed
            wait_for_line(job, r"iter (\d+)/1000 .*\| eval ", log, 300)
            sockets = listening(job.pid)
            while True:
                wait_for_line(job, r"iter \d+/1000", log, 120)
                at = time.time()
                empty = [expr for expr in dashboard_exprs() if not query(prom_port, expr, at)]
                if not empty or at - started > widest + 60:  # a minute more for a loaded machine
                    break
            assert not empty, "dashboard queries without a series:\n" + "\n".join(empty)

            # rare events exist from the start, at 0 in a healthy run
            events = {r["metric"]["event"]: float(r["value"][1])
                      for r in query(prom_port, f"{EXPORTED_PREFIX}reward_events_total", at)}
            assert events == {event: 0.0 for event in REWARD_EVENTS}
            skipped = query(prom_port, f"{EXPORTED_PREFIX}updates_skipped_total", at)
            assert [float(r["value"][1]) for r in skipped] == [0.0]
            # the values are the run's: images sampled = 64 per iteration
            iteration = float(query(prom_port, f"max({EXPORTED_PREFIX}iteration)", at)[0]["value"][1])
            images = float(query(prom_port, f"sum({EXPORTED_PREFIX}rollout_images_total)", at)[0]["value"][1])
            # the rollout actors export their counters a report interval after the driver's: one iteration behind
            assert iteration >= 2 and images >= 64 * (iteration - 1)
            targets = {r["metric"]["instance"] for r in query(prom_port, "up", at)}
            assert f"127.0.0.1:{metrics_port}" in targets

            names = {name for _, _, name in sockets}
            assert {"gcs_server", "raylet"} <= names and any("LearnerActor" in n for n in names), sorted(names)
            assert [s for s in sockets if s[0] not in LOOPBACK] == []
        finally:
            if prom is not None:
                prom.terminate()
                prom.wait(timeout=30)
