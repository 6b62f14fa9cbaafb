"""The numbers of each iteration: its summary (one history.jsonl line), its progress line, and the Prometheus metrics
(cluster/metrics.py) that the driver records."""

from __future__ import annotations

from typing import Any

import numpy as np

from cluster.metrics import REWARD_EVENTS, STAGES, Recorder
from rewards.service import GroupRewards, ServiceCounters
from rollout.sampling.trajectory import RecordSummary


def summarise(iteration: int, batch: list[RecordSummary], rewards: list[GroupRewards], stats: dict[str, Any],
              version_before: int, groups_per_iteration: int, requeued: int, stale: int) -> dict[str, Any]:
    """The numbers of one iteration: rewards per scorer, learner statistics (mean over updates), staleness, and the
    groups it queued again (`requeued`, a worker lost) or sampled again (`stale`)."""
    total = np.concatenate([r.total for r in rewards])
    scores = {name: np.concatenate([r.scores[name] for r in rewards]) for name in rewards[0].scores}
    updates = stats["updates"]
    learner = {k: float(np.mean([u[k] for u in updates])) for k in
               ("loss", "policy_loss", "kl", "clip_frac", "ratio_mean", "ratio_std", "approx_kl", "grad_norm", "lr")
               if k in updates[0]}  # no ratio for nft and awm
    if "ratio_max_dev" in updates[0]:  # the first update's |ρ − 1| max: on-policy in sync mode, so 0 up to rounding
        learner["ratio_max_dev_first"] = updates[0]["ratio_max_dev"]
    return {
        "iteration": iteration,
        "policy_version": stats["policy_version"],
        "groups": len(batch),
        "group_ids": [t.group_id for t in batch],
        "samples": stats["samples"],
        "groups_dropped": groups_per_iteration - len(batch),
        "reward_mean": float(total.mean()),
        "reward_std": float(total.std()),
        "rewards": {name: float(s.mean()) for name, s in scores.items()},
        "rewards_std": {name: float(s.std()) for name, s in scores.items()},
        "zero_std_group_frac": stats.get("zero_std_group_frac", 0.0),
        "staleness": max(version_before - t.policy_version for t in batch),
        "sampled_policy_versions": sorted({t.policy_version for t in batch}),
        "groups_requeued": requeued,
        "groups_stale": stale,
        **learner,
    }


class Metrics:
    """The driver's Prometheus metrics; counters start at 0, running totals are added as they grow."""

    def __init__(self, enabled: bool) -> None:
        self.recorder = Recorder(enabled)
        self.reported: dict[str, int] = {}  # running totals already added to the counters (`total`)
        for name in ("groups_trained_total", "groups_dropped_total", "groups_requeued_total", "groups_stale_total",
                     "evaluations_failed_total"):
            self.recorder.zero(name)
        for event in REWARD_EVENTS:
            self.recorder.zero("reward_events_total", event=event)
        for stage in STAGES:
            self.recorder.set("stage_seconds", 0.0, stage=stage)

    def record(self, summary: dict[str, Any], times: dict[str, float], *, in_flight: int, alive: dict[str, int],
               requeued_total: int, reward_counters: ServiceCounters) -> None:
        """One iteration's numbers; `alive`: actors per pool."""
        m = self.recorder
        m.set("iteration", summary["iteration"])
        for name in ("policy_version", "staleness", "loss", "kl", "clip_frac", "ratio_mean", "ratio_std", "approx_kl",
                     "grad_norm", "zero_std_group_frac"):
            if name in summary:  # no ratio for nft and awm
                m.set(name, summary[name])
        for stage, seconds in times.items():
            m.set("stage_seconds", seconds, stage=stage)
        m.set("reward_mean", summary["reward_mean"], scorer="total")
        m.set("reward_std", summary["reward_std"], scorer="total")
        for scorer in summary["rewards"]:
            m.set("reward_mean", summary["rewards"][scorer], scorer=scorer)
            m.set("reward_std", summary["rewards_std"][scorer], scorer=scorer)
        for scorer, value in summary.get("eval", {}).items():
            if isinstance(value, float):
                m.set("eval_reward_mean", value, scorer=scorer)
        m.set("groups_in_flight", in_flight)
        for pool, count in alive.items():
            m.set("actors_alive", count, pool=pool)
        m.inc("groups_trained_total", summary["groups"])
        m.inc("groups_dropped_total", summary["groups_dropped"])
        m.inc("groups_stale_total", summary["groups_stale"])
        self.total("groups_requeued_total", requeued_total)
        c = reward_counters
        for event, total in zip(REWARD_EVENTS, (c.retries, c.actor_failures, c.timeouts, c.nonfinite, c.groups_failed)):
            self.total("reward_events_total", total, event=event)

    def total(self, name: str, total: int, **labels: str) -> None:
        """Add to a counter what a running total gained since the last call."""
        key = name + repr(sorted(labels.items()))
        self.recorder.inc(name, total - self.reported.get(key, 0), **labels)
        self.reported[key] = total


def progress_line(iteration: int, total: int, s: dict[str, Any], times: dict[str, float]) -> str:
    """One line per iteration: rewards, learner statistics, stage seconds."""
    stages = " ".join(f"{k} {v:.1f}s" for k, v in times.items())
    scorers = ", ".join(f"{k} {v:.5g}" for k, v in s["rewards"].items())
    ratio = (f"clip {s['clip_frac']:.2f} ratio {s['ratio_mean']:.6f} ± {s['ratio_std']:.2g} "
             if "ratio_mean" in s else "")
    line = (f"iter {iteration}/{total} v{s['policy_version']} | reward {s['reward_mean']:.5g} ± {s['reward_std']:.3g} "
            f"({scorers}) | loss {s['loss']:.3g} kl {s['kl']:.3g} {ratio}gnorm {s['grad_norm']:.3g} "
            f"zero-std {s['zero_std_group_frac']:.2f} stale {s['staleness']} | {stages}")
    if "eval" in s:
        line += " | " + eval_line(s["eval"])
    return line


def eval_line(result: dict[str, Any]) -> str:
    """An evaluation's scorer means and where its grid pages are (or why it failed)."""
    if "error" in result:
        return f"eval failed: {result['error']}"
    means = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
    pages = result["grids"]
    return f"eval {means} -> {pages[0]}" + (f" (+{len(pages) - 1} pages)" if len(pages) > 1 else "")
