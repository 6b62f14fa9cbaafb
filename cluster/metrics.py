"""The job's Prometheus metrics: one list of names (`METRICS`), recorded through Ray's metrics API.

The driver and every actor record with a `Recorder`; Ray's metrics agent on each node exports what the processes on
that node recorded, in Prometheus format, and writes Prometheus' service-discovery file listing every node's endpoint,
so actors on other nodes are scraped too. Ray prepends `ray_` to each name: `iteration` is exported as
`ray_flowrl_iteration`. The dashboard (cluster/grafana/dashboard.json) and the README's table use exactly these names;
tests/test_metrics.py checks that the three agree.

Counters are created at 0 for every label set when their process starts (`Recorder.zero`), so a dashboard query for a
rare event (a timeout, a skipped update) returns a series from the first scrape on, not only after it first happens.
Ray forgets a gauge value that is not set again within two export intervals, so each process re-sets its gauges' last
values in the background until it ends: an evaluation score stays visible between evaluations, and a dead actor's
gauges vanish.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

PREFIX = "flowrl_"
EXPORTED_PREFIX = "ray_" + PREFIX  # Ray's metrics agent prepends "ray_" to every application metric

STAGES = ("rollout", "reward", "train", "weight_sync", "eval", "checkpoint", "iteration")
POOLS = ("rollout", "rewards", "learner")
REWARD_EVENTS = ("retry", "actor_failure", "timeout", "nonfinite", "group_failed")
SECONDS_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # without the prefix
    kind: str  # "gauge" | "counter" | "histogram"
    help: str
    labels: tuple[str, ...] = ()
    source: str = "driver"  # the process type that records it: driver, rollout, reward, learner


METRICS: tuple[MetricSpec, ...] = (
    # driver: progress and training health (one value per iteration)
    MetricSpec("iteration", "gauge", "iterations completed"),
    MetricSpec("policy_version", "gauge", "optimizer updates applied: the version of the policy weights"),
    MetricSpec("stage_seconds", "gauge", "seconds the last iteration spent in each stage", ("stage",)),
    MetricSpec("staleness", "gauge", "largest policy-version lag of the last trained batch"),
    MetricSpec("groups_in_flight", "gauge", "prompt groups submitted to the rollout pool and not yet returned"),
    MetricSpec("groups_trained_total", "counter", "prompt groups trained on"),
    MetricSpec("groups_dropped_total", "counter", "prompt groups excluded because their reward failed"),
    MetricSpec("groups_requeued_total", "counter", "prompt groups sampled again because their rollout actor died"),
    MetricSpec("groups_stale_total", "counter", "prompt groups sampled again because they were staler than "
               "learner.max_staleness"),
    MetricSpec("actors_alive", "gauge", "actors per pool that the job holds and has not seen die", ("pool",)),
    MetricSpec("reward_mean", "gauge", "mean reward of the last batch, per scorer and weighted total", ("scorer",)),
    MetricSpec("reward_std", "gauge", "standard deviation of the last batch's rewards", ("scorer",)),
    MetricSpec("eval_reward_mean", "gauge", "mean score of the last evaluation, per scorer", ("scorer",)),
    MetricSpec("evaluations_failed_total", "counter", "evaluations that failed (the run and its checkpoint went on)"),
    MetricSpec("reward_events_total", "counter", "reward-service events: retries, actor failures, timeouts, "
               "non-finite scores, failed groups", ("event",)),
    MetricSpec("loss", "gauge", "training loss, mean over the last iteration's updates"),
    MetricSpec("kl", "gauge", "KL penalty term to the reference policy"),
    MetricSpec("clip_frac", "gauge", "fraction of samples whose importance ratio was clipped"),
    MetricSpec("ratio_mean", "gauge", "mean importance ratio"),
    MetricSpec("ratio_std", "gauge", "standard deviation of the importance ratio"),
    MetricSpec("approx_kl", "gauge", "approximate KL between the sampling and the updated policy"),
    MetricSpec("grad_norm", "gauge", "gradient norm before clipping"),
    MetricSpec("zero_std_group_frac", "gauge", "fraction of groups whose rewards were all equal (no signal)"),
    # rollout actors
    MetricSpec("rollout_images_total", "counter", "images sampled, per rollout actor", ("actor",), "rollout"),
    MetricSpec("rollout_images_per_second", "gauge", "images per second of the actor's last group", ("actor",),
               "rollout"),
    MetricSpec("weight_load_seconds", "gauge", "seconds the actor took to load the newest weights", ("actor",),
               "rollout"),
    # reward actors
    MetricSpec("reward_seconds", "histogram", "seconds one scoring call took, per scorer", ("scorer",), "reward"),
    MetricSpec("reward_images_total", "counter", "images scored, per scorer", ("scorer",), "reward"),
    # learner actors
    MetricSpec("learner_step_seconds", "histogram", "seconds of one optimizer update, per learner rank", ("rank",),
               "learner"),
    MetricSpec("updates_skipped_total", "counter", "updates skipped for a non-finite loss or gradient", (),
               "learner"),
    MetricSpec("weight_sync_seconds", "gauge", "seconds to gather and publish the newest weights", (), "learner"),
    MetricSpec("weight_sync_bytes_total", "counter", "bytes of weights published to the rollout actors", (),
               "learner"),
)
BY_NAME = {spec.name: spec for spec in METRICS}
_METHOD_KIND = {"set": "gauge", "inc": "counter", "observe": "histogram"}


class Recorder:
    """Records the job's metrics from this process; does nothing when disabled or when Ray is not running."""

    def __init__(self, enabled: bool = True) -> None:
        import ray

        self.enabled = enabled and ray.is_initialized()
        self._metrics: dict[str, Any] = {}
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}  # last value of each gauge series
        self._lock = threading.Lock()
        self._keeper: threading.Thread | None = None

    def set(self, name: str, value: float, **labels: Any) -> None:
        if self.enabled:
            tags = _tags(labels)
            self._metric(name, "set").set(float(value), tags=tags)
            with self._lock:
                self._gauges[(name, tuple(sorted(tags.items())))] = float(value)
                if self._keeper is None:
                    self._keeper = threading.Thread(target=self._keep_gauges, name="metrics-gauges", daemon=True)
                    self._keeper.start()

    def inc(self, name: str, value: float = 1.0, **labels: Any) -> None:
        if self.enabled and value > 0:
            self._metric(name, "inc").inc(float(value), tags=_tags(labels))

    def observe(self, name: str, value: float, **labels: Any) -> None:
        if self.enabled:
            self._metric(name, "observe").observe(float(value), tags=_tags(labels))

    def zero(self, name: str, **labels: Any) -> None:
        """Create a counter's series at 0 (Ray's public `inc` refuses 0, its `_record` does not)."""
        if self.enabled:
            self._metric(name, "inc")._record(0.0, tags=_tags(labels))

    def _keep_gauges(self) -> None:
        """Re-set every gauge's last value once per Ray export interval, for as long as the process lives."""
        import time

        import ray

        interval_s = max(ray._config.metrics_report_interval_ms(), 1000) / 1000.0
        while True:
            time.sleep(interval_s)
            with self._lock:
                values = list(self._gauges.items())
            for (name, tags), value in values:
                self._metrics[name].set(value, tags=dict(tags))

    def _metric(self, name: str, method: str) -> Any:
        spec = BY_NAME.get(name)
        if spec is None:
            raise KeyError(f"unknown metric {name!r}: add it to cluster.metrics.METRICS")
        if spec.kind != _METHOD_KIND[method]:
            raise TypeError(f"metric {name!r} is a {spec.kind}; {method}() is for a {_METHOD_KIND[method]}")
        metric = self._metrics.get(name)
        if metric is None:
            from ray.util import metrics

            full = PREFIX + name
            if spec.kind == "gauge":
                metric = metrics.Gauge(full, spec.help, tag_keys=spec.labels)
            elif spec.kind == "counter":
                metric = metrics.Counter(full, spec.help, tag_keys=spec.labels)
            else:
                metric = metrics.Histogram(full, spec.help, boundaries=list(SECONDS_BUCKETS), tag_keys=spec.labels)
            self._metrics[name] = metric
        return metric


def _tags(labels: dict[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in labels.items()}
