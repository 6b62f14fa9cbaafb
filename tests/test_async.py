"""Asynchronous mode: rollouts sample ahead while the learner trains, and no group is trained staler than
learner.max_staleness; a group that would be is sampled again and counted; a resumed run trains every group once.

The tiny job in this process, on the session's local Ray: 4 groups of 4 per iteration.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config_loading import load_config
from learner.driver.job import Job

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.images_per_iteration=16", "data.group_size=4", "rollout.samples_per_forward=4",
         "learner.micro_batch_size=4", "eval.every_n_iterations=0", "metrics.port=0", "learner.mode=async"]


def run(tmp_path: Path, model: Path, *overrides: str, resume: str = "none") -> list[dict]:
    cfg = load_config(ROOT / "cluster/tiny.yaml", SMALL + [f"output_dir={tmp_path}", f"model.path={model}",
                                                           "model.build_tiny=false", *overrides])
    job = Job(cfg, say=lambda message: None)
    try:
        job.resume(resume)
        return job.run()
    finally:
        job.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("bound,updates", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_no_trained_group_is_staler_than_the_bound(ray_local, tiny_model_dirs, tmp_path, bound, updates):
    rows = run(tmp_path, tiny_model_dirs["flux"], "iterations=4", f"learner.max_staleness={bound}",
               f"learner.updates_per_iteration={updates}", "checkpoint.every_n_iterations=0")
    assert [h["policy_version"] for h in rows] == [updates * i for i in (1, 2, 3, 4)]
    assert all(h["staleness"] <= bound for h in rows), [h["staleness"] for h in rows]
    trained = [g for h in rows for g in h["group_ids"]]
    assert len(trained) == len(set(trained)) == 16
    if bound >= updates:  # room to sample ahead: some groups were sampled at least one iteration's updates back
        assert updates <= max(h["staleness"] for h in rows) <= bound
    else:  # no room: synchronous
        assert all(h["staleness"] == 0 for h in rows)


@pytest.mark.slow
def test_a_group_staler_than_the_bound_is_sampled_again(ray_local, tiny_model_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(Job, "ahead", property(lambda self: 2))  # two iterations ahead: staleness 2 > bound 1
    rows = run(tmp_path, tiny_model_dirs["flux"], "iterations=4", "learner.max_staleness=1",
               "learner.updates_per_iteration=1", "checkpoint.every_n_iterations=0")
    assert all(h["staleness"] <= 1 for h in rows)
    assert sum(h["groups_stale"] for h in rows) >= 1
    trained = [g for h in rows for g in h["group_ids"]]
    assert len(trained) == len(set(trained)) == 16


@pytest.mark.slow
def test_an_async_run_resumed_from_a_checkpoint_trains_every_group_once(ray_local, tiny_model_dirs, tmp_path,
                                                                        monkeypatch):
    class Stopped(Exception):
        pass

    collect = Job.collect

    def stop_at_iteration_3(self, version):
        if self.iteration == 2:  # iteration 2 is checkpointed; the groups of 3 and 4 are being sampled right now
            raise Stopped
        return collect(self, version)

    model = tiny_model_dirs["flux"]
    common = ["iterations=4", "learner.max_staleness=2", "learner.updates_per_iteration=1",
              "checkpoint.every_n_iterations=1", "checkpoint.keep_last=5"]
    monkeypatch.setattr(Job, "collect", stop_at_iteration_3)
    with pytest.raises(Stopped):
        run(tmp_path, model, *common)
    monkeypatch.undo()
    trainer = json.loads((tmp_path / "checkpoints" / "iter-000002" / "trainer.json").read_text())
    assert len(trainer["pending_groups"]) == 8  # two iterations ahead were in flight

    rows = run(tmp_path, model, *common, resume="auto")
    assert [h["iteration"] for h in rows] == [3, 4]
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in history] == [1, 2, 3, 4]
    trained = [g for h in history for g in h["group_ids"]]
    assert len(trained) == len(set(trained)) == 16
    assert sorted(g for h in rows for g in h["group_ids"]) == sorted(g["group_id"] for g in trainer["pending_groups"])
