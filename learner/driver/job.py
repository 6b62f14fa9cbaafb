"""The job's loop, top to bottom: prompt groups → rollouts → rewards → advantages → learner → weights back.

Synchronous mode samples each iteration with the weights its previous iteration produced (strictly on-policy). In
asynchronous mode the rollouts keep sampling ahead while the learner trains, as far as `learner.max_staleness`
allows: a group's staleness is the policy version when the iteration that trains it starts minus the version that
sampled it, a group staler than the bound is sampled again (and counted), and max_staleness 0 is synchronous mode.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import RayActorError
from tqdm import tqdm

from cluster.config import JobConfig
from cluster.errors import first_line
from cluster.runtime import joins_cluster
from learner.driver.commands import Commands
from learner.driver.evaluation import evaluate
from learner.driver.events import Events
from learner.driver.placement import check_where_placed, reserve_pools
from learner.driver.preflight import absolute_paths
from learner.driver.report import Metrics, eval_line, progress_line, summarise
from learner.driver.tracking import Trackers
from learner.objectives.registry import objective_for
from learner.ranks.actor import LearnerActor
from learner.ranks.checkpoint import (
    begin_checkpoint,
    checkpoint_root,
    finish_checkpoint,
    list_checkpoints,
    new_run_id,
    read_trainer,
    resolve_resume,
)
from learner.ranks.process_group import RankGroup
from rewards.service import GroupRewards, ImagesLost, RewardError, RewardHandle, RewardService
from rollout.models.loading import locate_configured
from rollout.pool import RolloutPool
from rollout.prompts.groups import GroupSampler, PromptGroup
from rollout.prompts.sources import training_prompts
from rollout.sampled import SampledGroup
from rollout.weights import weight_store, weight_store_name

NODE_WATCH_S = 5.0  # while waiting for rollouts, look for lost nodes this often


class Job:
    """The actors of one training job and the loop that drives them."""

    def __init__(self, cfg: JobConfig, say: Callable[[str], None] = print,
                 actor_classes: dict[str, type] | None = None) -> None:
        """`actor_classes`: stand-ins for some pools' actor classes (see learner.placement.reserve_pools)."""
        self.cfg = cfg = absolute_paths(cfg)
        self.say = say
        self.metrics = Metrics(cfg.metrics.enabled)
        self.sampler = GroupSampler(training_prompts(cfg.data, seed=cfg.seed), group_size=cfg.data.group_size,
                                    seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.groups_per_iteration = cfg.data.images_per_iteration // cfg.data.group_size
        say(f"{self.sampler.num_items} training prompts from '{cfg.data.source}', "
            f"{self.groups_per_iteration} groups x {cfg.data.group_size} per iteration")

        started = time.perf_counter()
        lc = cfg.learner
        self.events = Events(say)
        self.commands = Commands(cfg.run_name, cfg.ray.namespace, say)  # a second job of this name stops here
        try:  # a start that fails leaves no control actor behind to refuse the next job of this name
            with tqdm(total=4, desc="starting", unit="step", leave=False, disable=None) as bar:
                bar.set_postfix_str("placement")
                pools = reserve_pools(cfg, actor_classes)  # every pool placed before any model loads
                try:
                    if joins_cluster(cfg.ray):  # the files the actors read, checked on their nodes
                        for line in check_where_placed(cfg, pools):
                            say(line)
                    else:
                        locate_configured(cfg.model)
                except BaseException:
                    for pool in pools.values():
                        pool.shutdown()
                    raise
                bar.update(1)
                # Every pool's actors are created before any is waited for: they import and load side by side.
                bar.set_postfix_str("rollout actors")
                store_key = f"{cfg.run_name}-{uuid.uuid4().hex[:8]}"  # two jobs on one cluster never share a store
                self.store = weight_store(store_key)
                self.pool = RolloutPool(cfg, objective_for(cfg).rollout_settings(), weight_store_name(store_key),
                                        actors=pools["rollout"], report=self.events.report)
                bar.update(1)
                bar.set_postfix_str("reward actors")
                self.rewards = RewardService(cfg.rewards, metrics=cfg.metrics.enabled, report=self.events.report,
                                             pools={s.name: pools[f"rewards/{s.name}"] for s in cfg.rewards.scorers})
                bar.update(1)
                bar.set_postfix_str("learner")
                self.learner = RankGroup(LearnerActor, lc, actors=pools["learner"])
                negative = self.pool.negative_embeds()
                info = self.learner_get(self.learner.run("setup", cfg, negative, self.store))[0]
                self.learner_nodes = [node[:8] for node in self.learner_get(self.learner.run("node"))]
                bar.update(1)
        except BaseException:
            self.commands.close()
            raise
        scorer_actors = sum(cfg.rewards.pool_of(s).num_actors for s in cfg.rewards.scorers)
        say(f"actors up in {time.perf_counter() - started:.1f} s: {self.pool.num_workers} rollout, "
            f"{scorer_actors} reward, {lc.num_actors} learner "
            f"(ZeRO-{lc.zero_stage}, {lc.precision}, {info['trainable_parameters']:,} trainable parameters)")
        self.iteration = 0
        self.run_id = new_run_id()  # a fresh run's; a resumed run goes on with its checkpoint's
        self.last_advantages: dict[str, float] = {}
        self.skipped_in_a_row = 0  # updates skipped for a non-finite loss or gradient, since the last applied one
        self.requeued_before = 0  # the rollout pool's re-queued groups before this iteration
        self.stale = 0  # groups sampled again for staleness, this iteration
        self.resumed_groups: list[PromptGroup] = []  # submitted, not trained when the checkpoint resumed from was taken
        self.arrived: deque[tuple[SampledGroup, RewardHandle]] = deque()  # sampled, being scored, not trained yet

    # -----------------------------------------------------------------------------------------------------------------

    def resume(self, resume: str) -> None:
        """Continue from a checkpoint ('auto': the newest complete one, if any); then publish the weights in force."""
        folder = resolve_resume(self.cfg, resume, self.say)
        if folder is not None:
            trainer = read_trainer(folder)  # resolve_resume checked it against this job
            self.run_id = trainer["run_id"]
            self.learner_get(self.learner.run("load_shard", str(folder)))  # each rank reads its own shard
            self.sampler.load_state_dict(trainer["prompt_cursor"])
            self.resumed_groups = [PromptGroup(g["group_id"], g["prompt"], g["metadata"], tuple(g["seeds"]))
                                   for g in trainer.get("pending_groups", [])]
            self.iteration = trainer["iteration"]
            self.last_advantages = trainer.get("advantages", {})
            self.trim_history()
            self.say(f"resumed from {folder} at iteration {self.iteration}")
        self.learner_get(self.learner.run("publish"))

    def trim_history(self) -> None:
        """Drop the history and evaluation lines of iterations after the checkpoint resumed from (they are trained
        again), and a line cut short by a killed process."""
        for path in (Path(self.cfg.output_dir) / "history.jsonl", Path(self.cfg.output_dir) / "eval" / "results.jsonl"):
            if not path.is_file():
                continue
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if _iteration_of(ln) <= self.iteration]
            if len(kept) < len(lines):
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text("".join(ln + "\n" for ln in kept))
                tmp.replace(path)

    def run(self) -> list[dict[str, Any]]:
        """Train until `iterations`; return one summary dict per iteration."""
        cfg = self.cfg
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        self.trackers = Trackers(cfg, self.iteration)
        try:
            return self._run()
        except Exception:
            self.emergency_checkpoint()
            raise
        finally:
            self.trackers.close()

    def emergency_checkpoint(self) -> None:
        """After a fatal error outside the learner: a checkpoint of the iterations trained so far, if the learner ranks
        still answer, hold exactly those iterations and the last checkpoint is older; said in one line."""
        last = list_checkpoints(checkpoint_root(self.cfg), self.run_id)
        if self.iteration == 0 or (last and last[-1].name == f"iter-{self.iteration:06d}"):
            return
        try:
            counters = ray.get([actor.counters.remote() for actor in self.learner.actors], timeout=120)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return  # a learner rank is gone: its state is the last checkpoint's
        if any(c["iterations"] != self.iteration for c in counters):
            self.say(f"no emergency checkpoint: the learner was in the middle of iteration {self.iteration + 1}")
            return
        try:
            folder = self.checkpoint()
        except Exception as err:  # noqa: BLE001 - the error that ended the run is the one to report
            self.say(f"the emergency checkpoint failed too: {first_line(err)}")
            return
        self.say(f"emergency checkpoint of iteration {self.iteration} written to {folder}: run the same command "
                 f"with --resume auto to go on from it")

    def _run(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        history = []
        if self.iteration == 0 and cfg.eval.every_n_iterations and cfg.eval.at_start:
            started = time.perf_counter()
            self.say(f"iter 0/{cfg.iterations} (starting weights) | {eval_line(self.evaluate())} | "
                     f"eval {time.perf_counter() - started:.1f}s")
        self.pool.submit(self.resumed_groups)  # those a checkpoint had in flight, first
        self.keep_in_flight()
        while self.iteration < cfg.iterations:
            it_started = time.perf_counter()
            version_before = self.policy_version()
            scored, times = self.collect(version_before)
            stats = self.train(scored, version_before, times)
            batch, rewards = [s.summary for s, _ in scored], [r for _, r in scored]
            del scored  # the driver's references to the records: freed once the learner has trained them
            times["weight_sync"] = stats["publish_s"]
            self.iteration += 1
            self.keep_in_flight()  # as soon as the new weights are out
            self.check_skipped_updates(stats["updates"])
            self.last_advantages = {k: stats[k] for k in ("advantage_mean", "advantage_std", "zero_std_group_frac")
                                    if k in stats}

            summary = summarise(self.iteration, batch, rewards, stats, version_before, self.groups_per_iteration,
                                self.pool.requeued - self.requeued_before, self.stale)
            self.requeued_before, self.stale = self.pool.requeued, 0
            self.events.watch_nodes()
            if cfg.eval.every_n_iterations and (self.iteration % cfg.eval.every_n_iterations == 0
                                                or self.iteration == cfg.iterations):
                started = time.perf_counter()
                summary["eval"] = self.evaluate()
                times["eval"] = time.perf_counter() - started
            every = cfg.checkpoint.every_n_iterations
            if self.iteration == cfg.iterations or (every and self.iteration % every == 0):
                started = time.perf_counter()
                self.checkpoint()
                times["checkpoint"] = time.perf_counter() - started
            summary["events"] = self.events.take()  # the evaluation's included
            times["iteration"] = time.perf_counter() - it_started
            self.say(progress_line(self.iteration, cfg.iterations, summary, times))
            self.trackers.log_iteration(self.iteration, summary, times, rewards)
            self.metrics.record(summary, times, in_flight=self.pool.pending + len(self.arrived),
                                requeued_total=self.pool.requeued,
                                reward_counters=self.rewards.counters,
                                alive={"rollout": self.pool.num_workers, "rewards": self.rewards.num_alive(),
                                       "learner": len(self.learner)})
            self.commands.publish(self.snapshot(summary["policy_version"]))
            history.append({**summary, "times": dict(times)})
            with open(Path(cfg.output_dir) / "history.jsonl", "a") as f:  # one line per iteration, for plots
                f.write(json.dumps(history[-1]) + "\n")
        return history

    def check_skipped_updates(self, updates: list[dict[str, float]]) -> None:
        """Count updates the learner skipped (every rank alike) for a non-finite loss or gradient; stop the job when
        `learner.max_skipped_updates` come in a row."""
        limit = self.cfg.learner.max_skipped_updates
        for update in updates:
            self.skipped_in_a_row = 0 if update["step_applied"] else self.skipped_in_a_row + 1
            if self.skipped_in_a_row >= limit:
                raise TrainingStopped(
                    f"{self.skipped_in_a_row} updates in a row were skipped for a non-finite loss or gradient "
                    f"(learner.max_skipped_updates = {limit}), the last at iteration {self.iteration}; the weights "
                    f"are still those of policy version {int(update['policy_version'])}. Resume from the last "
                    f"checkpoint (--resume auto) with a lower learner.lr or learner.max_grad_norm")
            if not update["step_applied"]:
                self.say(f"iteration {self.iteration}: update skipped for a non-finite loss or gradient "
                         f"({self.skipped_in_a_row} in a row, the job stops at {limit})")

    def shutdown(self) -> None:
        for close in (self.pool.shutdown, self.rewards.shutdown, self.learner.kill, lambda: ray.kill(self.store),
                      self.commands.close):
            try:
                close()
            except Exception:  # noqa: BLE001 - best effort at the end of a job
                pass

    # -----------------------------------------------------------------------------------------------------------------

    @property
    def ahead(self) -> int:
        """Iterations of groups in flight beyond the current one: none in sync mode; in async mode as many as keep every
        group within the staleness bound, each iteration moving the policy updates_per_iteration versions."""
        lc = self.cfg.learner
        return lc.max_staleness // lc.updates_per_iteration if lc.mode == "async" else 0

    def keep_in_flight(self) -> None:
        """Submit new groups until the next iteration's and, async, the `ahead` following ones' are queued, being
        sampled, or sampled and not trained yet. Called when a policy version is out, so each group is sampled with
        it or a later one and is within the staleness bound when trained; the rollouts never wait for the driver."""
        iterations = min(1 + self.ahead, self.cfg.iterations - self.iteration)
        missing = iterations * self.groups_per_iteration - self.pool.pending - len(self.arrived)
        if missing > 0:
            self.pool.submit(self.sampler.take(missing))

    def train(self, scored: list[tuple[SampledGroup, GroupRewards]], version: int,
              times: dict[str, float]) -> dict[str, Any]:
        """Train the iteration's scored groups (the learner ranks fetch their records by reference); a group whose
        record was lost before a rank fetched it is sampled again (in place, in `scored`) and the iteration trained
        once it is back. Seconds: training in times["train"], sampling and scoring again added to "rollout" and
        "reward"."""
        times["train"] = 0.0
        while True:
            started = time.perf_counter()
            training = self.learner.run("train_iteration", [s for s, _ in scored], [r.total for _, r in scored])
            self.score_arrivals(until=training[:1])  # async: rollouts and rewards go on while the learner trains
            stats = self.learner_get(training)[0]
            self.serve_commands()
            times["train"] += time.perf_counter() - started
            if "lost_groups" not in stats:
                return stats
            lost = set(stats["lost_groups"])
            for sampled, _ in scored:
                if sampled.group_id in lost:
                    self.resample(sampled, "its record was lost before the learner fetched it")
            more, more_times = self.collect(version, wanted=len(lost))
            scored[:] = sorted([item for item in scored if item[0].group_id not in lost] + more,
                               key=lambda item: item[0].group_id)
            for key, seconds in more_times.items():
                times[key] += seconds

    def resample(self, sampled: SampledGroup, why: str) -> None:
        """Sample a group again whose record or images are gone (the node that held them left)."""
        s = sampled.summary
        self.events.report("records_lost", f"group {s.group_id} ({s.prompt!r}) is sampled again: {why}")
        self.pool.submit([s.prompt_group()])

    def collect(self, version: int, wanted: int | None = None
                ) -> tuple[list[tuple[SampledGroup, GroupRewards]], dict[str, float]]:
        """`wanted` groups (default: one iteration's) in group order, each with its rewards; a group whose reward
        failed is dropped, one whose images were lost is sampled again."""
        wanted = self.groups_per_iteration if wanted is None else wanted
        scored, times = [], {"rollout": 0.0, "reward": 0.0}
        while wanted:
            started = time.perf_counter()
            arrivals = self.arrivals(version, wanted)
            rollout_done = time.perf_counter()
            times["rollout"] += rollout_done - started
            wanted = 0
            for group_id in sorted(arrivals):
                sampled, handle = arrivals[group_id]
                try:
                    scored.append((sampled, self.rewards.collect(handle)))
                except ImagesLost as e:
                    self.resample(sampled, str(e))
                    wanted += 1
                except RewardError as e:
                    self.say(f"group {group_id} ({sampled.summary.prompt!r}) dropped: {e}")
            times["reward"] += time.perf_counter() - rollout_done
        if not scored:
            raise RuntimeError(f"every group of iteration {self.iteration + 1} failed its reward")
        return sorted(scored, key=lambda item: item[0].group_id), times

    def arrivals(self, version: int, wanted: int) -> dict[int, tuple[SampledGroup, RewardHandle]]:
        """The next `wanted` groups that arrive, each being scored since it arrived; groups sampled more than
        learner.max_staleness versions before `version` are sampled again."""
        chosen: dict[int, tuple[SampledGroup, RewardHandle]] = {}
        with tqdm(total=wanted, desc=f"rollout {self.iteration + 1}", unit="group", leave=False,
                  disable=None) as bar:
            while len(chosen) < wanted:
                if not self.arrived:
                    if not self.score_arrivals(timeout=NODE_WATCH_S):
                        if not self.pool.pending:
                            raise RuntimeError("the rollout pool has nothing pending but the iteration is not complete")
                        self.events.watch_nodes()  # a slow group, or a lost node: say which
                    self.serve_commands()
                    continue
                sampled, handle = self.arrived.popleft()
                if version - sampled.summary.policy_version > self.cfg.learner.max_staleness:
                    self.stale += 1
                    self.rewards.drop(handle)
                    self.pool.submit([sampled.summary.prompt_group()])
                    continue
                chosen[sampled.group_id] = (sampled, handle)
                bar.update(1)
        return chosen

    def score_arrivals(self, timeout: float | None = None, until: Sequence[ray.ObjectRef] = ()) -> int:
        """Hand each group the rollouts finish to the reward service as it arrives, until `timeout` s pass or one of
        `until` is ready (or, with neither, until one group arrives); the number that arrived."""
        end = None if timeout is None else time.monotonic() + timeout
        arrived = 0
        while not (until and ray.wait(list(until), timeout=0)[0]):
            left = None if end is None else max(0.0, end - time.monotonic())
            sampled = self.pool.next_result(timeout=left, until=until)
            if sampled is None:
                if until and not self.pool.pending:
                    ray.wait(list(until))  # nothing left to sample: wait for the update
                if not until or left == 0.0:
                    break
                continue
            s = sampled.summary
            handle = self.rewards.submit(sampled.images, [s.prompt] * s.group_size, [s.metadata] * s.group_size,
                                         group_id=s.group_id)  # the actors fetch the images by reference
            self.arrived.append((sampled, handle))
            arrived += 1
            if not until:
                break
        return arrived

    def serve_commands(self) -> None:
        """Carry out the requests of `python -m cluster.scale`; after a change, the gauge and the snapshot follow."""
        if self.commands.serve(self.pool):
            self.metrics.recorder.set("actors_alive", self.pool.num_workers, pool="rollout")
            self.commands.publish(self.snapshot(self.policy_version()))

    def snapshot(self, version: int) -> dict[str, Any]:
        """Each pool's actors, their nodes and the policy version they hold, for `python -m cluster.scale --show`."""
        learner = [{"name": f"rank-{rank}", "node": node, "policy_version": version}
                   for rank, node in enumerate(self.learner_nodes)]
        return {"iteration": self.iteration, "policy_version": version,
                "pools": {"rollout": self.pool.describe(), "learner": learner, **self.rewards.describe()}}

    def learner_get(self, refs: list[ray.ObjectRef]) -> list[Any]:
        """The results of learner calls; a learner rank that died (its node lost, say) stops the job with a message
        that says how to go on: a learner never restarts, its state lives in the last checkpoint."""
        try:
            return ray.get(refs)
        except RayActorError as err:
            last = list_checkpoints(checkpoint_root(self.cfg), self.run_id)
            since = f"the last checkpoint is {last[-1]}" if last else "there is no checkpoint yet"
            raise TrainingStopped(f"a learner rank is gone ({first_line(err, 160)}); "
                                  f"{since}: run the same command with --resume auto (on a cluster with room for "
                                  f"the learner pool) to continue from it") from None

    def policy_version(self) -> int:
        return int(self.learner_get([self.learner.actors[0].counters.remote()])[0]["optimizer_steps"])

    def evaluate(self) -> dict[str, Any]:
        """The evaluation of this iteration with the EMA weights (learner/driver/evaluation.py). One that fails (a
        rollout actor lost, a failed score) is reported and the run goes on to its checkpoint: {"error": why}."""
        # ([ref], meta) of the EMA weights, put in the object store by rank 0: the weights never come through here
        weights = self.learner_get([self.learner.actors[0].packed_ema.remote()])[0]
        try:
            result = evaluate(self.cfg, self.pool, self.rewards, weights, self.iteration)
        except (ray.exceptions.RayError, RewardError) as err:
            why = first_line(err, 200)
            self.events.report("evaluation_failed", f"the evaluation of iteration {self.iteration} failed ({why}); "
                                                    f"the run goes on")
            self.metrics.recorder.inc("evaluations_failed_total")
            return {"error": why}
        self.trackers.log_eval(self.iteration, result)
        return result

    def checkpoint(self) -> Path:
        """Each learner rank writes its own shard (rank 0 also the exported EMA LoRA) into the checkpoint's temporary
        folder; then trainer.json completes it: counters, the prompt cursor, and the groups submitted but not trained
        yet (a resumed run samples them first). No model state passes through the driver."""
        tmp = begin_checkpoint(self.cfg, self.iteration, self.run_id)
        try:
            self.learner_get(self.learner.run("save_shard", str(tmp)))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        arrived = [sampled.summary.prompt_group() for sampled, _ in self.arrived]
        pending = [dataclasses.asdict(group) for group in arrived + self.pool.pending_groups()]
        trainer = {"run_id": self.run_id, "policy_version": self.policy_version(), "prompt_cursor": self.sampler.state_dict(),
                   "pending_groups": pending, "advantages": self.last_advantages}
        return finish_checkpoint(self.cfg, tmp, self.iteration, trainer, len(self.learner))


def _iteration_of(history_line: str) -> float:
    try:
        return json.loads(history_line)["iteration"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class TrainingStopped(RuntimeError):
    """The job cannot go on (e.g. updates keep coming out non-finite); the message says what to do."""
