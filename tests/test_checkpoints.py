"""Checkpoints that only their run touches (learner/ranks/checkpoint.py): a run's id in each of its checkpoints, pruning
and leftovers of its own only, a fresh run refused where another run's checkpoints are, every file listed with its
size and sha256 and verified before use, `--resume auto` passing over a damaged newest checkpoint, and the learner
count and training config checked before Ray starts (learner/driver/preflight.py `check_resume`).

The fast tests write checkpoints as the driver does (`begin_checkpoint`, the ranks' files, `finish_checkpoint`) with
small stand-in shards, and compare every file by a sha256 computed here; the command-line tests run
`learner.main.main` in-process with Ray's start replaced by an error, so that a check that passes shows as that error
(exit 1) and one that refuses as exit 2 with nothing started. The whole job (a second run refused in a run's folder,
the run resumed under its id with a key changed by --set): tests/test_faults.py, after a kill mid-checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

import cluster.runtime
from cluster.config import JobConfig
from cluster.config_loading import load_config
from learner.main import main
from learner.ranks.checkpoint import (
    CheckpointError,
    begin_checkpoint,
    checkpoint_root,
    finish_checkpoint,
    given_with_set,
    rank_stem,
    resolve_resume,
    verify_files,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "cluster" / "tiny.yaml"
RUN_A, RUN_B = "a" * 32, "b" * 32


class RayWouldStart(Exception):
    """Raised where learner.main would start Ray: every check before it passed."""


def overrides(tmp_path: Path, model: Path, *extra: str) -> list[str]:
    """The --set overrides of these tests' job: tiny.yaml on the prebuilt tiny model, writing under tmp_path/out."""
    return [f"model.path={model}", f"output_dir={tmp_path / 'out'}", "metrics.port=0", *extra]


def config(tmp_path: Path, model: Path, *extra: str, cfg: Path = TINY) -> JobConfig:
    return load_config(cfg, overrides(tmp_path, model, *extra))


def write_checkpoint(cfg: JobConfig, iteration: int, run_id: str) -> Path:
    """A checkpoint as the job writes one: a temporary folder, each rank's shard pair (and rank 0's LoRA) with
    stand-in bytes that differ by run, iteration and rank, then the driver's finish."""
    tmp = begin_checkpoint(cfg, iteration, run_id)
    for rank in range(cfg.learner.num_actors):
        stem = rank_stem(tmp, rank)
        stem.with_suffix(".safetensors").write_bytes(f"{run_id} {iteration} {rank} ".encode() * 200)
        stem.with_suffix(".json").write_text(json.dumps({"run": run_id, "iteration": iteration, "rank": rank}))
    (tmp / "lora").mkdir()
    (tmp / "lora" / "pytorch_lora_weights.safetensors").write_bytes(f"lora {run_id} {iteration}".encode() * 50)
    trainer = {"run_id": run_id, "policy_version": iteration, "prompt_cursor": {}, "pending_groups": []}
    return finish_checkpoint(cfg, tmp, iteration, trainer, cfg.learner.num_actors)


def digests(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its sha256."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def trainer_of(folder: Path) -> dict:
    return json.loads((folder / "trainer.json").read_text())


def run_main(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """learner.main in-process with Ray's start replaced by RayWouldStart: (exit code, the stderr lines)."""

    def no_ray(*args, **kwargs):
        raise RayWouldStart("every check before Ray passed")

    monkeypatch.setattr(cluster.runtime, "start_ray", no_ray)
    capsys.readouterr()
    code = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return code, err


def cli(tmp_path: Path, model: Path, *extra: str, cfg: Path = TINY) -> list[str]:
    return ["--cfg", str(cfg), *[arg for o in overrides(tmp_path, model, *extra) for arg in ("--set", o)]]


# --------------------------------------------------------------------------- what a checkpoint holds


def test_trainer_json_lists_every_file_with_its_size_and_sha256_and_the_run(tmp_path, tiny_model_dirs):
    cfg = config(tmp_path, tiny_model_dirs["flux"])
    folder = write_checkpoint(cfg, 2, RUN_A)
    trainer = trainer_of(folder)
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    del files["trainer.json"]
    assert trainer["files"] == {name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                                for name, p in files.items()}
    assert set(trainer["files"]) == {"learner-rank0.safetensors", "learner-rank0.json",
                                     "lora/pytorch_lora_weights.safetensors"}
    assert trainer["run_id"] == RUN_A and trainer["iteration"] == 2 and trainer["world_size"] == 1
    assert trainer["training_config"]["learner.lr"] == 0.015 and "iterations" not in trainer["training_config"]
    assert [p.name for p in folder.parent.iterdir()] == ["iter-000002"]  # no temporary folder left


# --------------------------------------------------------------------------- two runs, one folder


def test_a_fresh_run_where_another_run_checkpointed_is_refused_before_ray_and_changes_nothing(
        tmp_path, tiny_model_dirs, monkeypatch, capsys):
    """A finished 6-iteration run; then a 4-iteration run into the same output_dir, fresh: refused in one line naming
    --resume auto and a new output_dir, before Ray, every file of the first run byte-identical."""
    model = tiny_model_dirs["flux"]
    cfg = config(tmp_path, model, "iterations=6")
    for iteration in (2, 4, 6):
        write_checkpoint(cfg, iteration, RUN_A)
    out = tmp_path / "out"
    before = digests(out)
    assert sorted(p.split("/")[1] for p in before if p.endswith("trainer.json")) == ["iter-000004", "iter-000006"]

    code, err = run_main(cli(tmp_path, model, "iterations=4"), monkeypatch, capsys)

    assert code == 2 and len(err) == 1, err
    for part in ("CheckpointError", "already holds the checkpoints of another run", "iter-000006", RUN_A,
                 "--resume auto", "a new output_dir or checkpoint.storage"):
        assert part in err[0], (part, err[0])
    assert digests(out) == before


def test_pruning_and_leftovers_are_each_runs_own(tmp_path, tiny_model_dirs):
    """Two runs writing into one checkpoint.storage at once: each prunes only its own checkpoints and removes only its
    own leftovers; a checkpoint of an iteration that the other run wrote is refused, leaving it as it was."""
    model = tiny_model_dirs["flux"]
    shared = f"checkpoint.storage={tmp_path / 'shared'}"
    a = config(tmp_path, model, shared, "checkpoint.keep_last=2")
    b = config(tmp_path, model, shared, "checkpoint.keep_last=1")
    root = checkpoint_root(a)
    write_checkpoint(a, 2, RUN_A)
    write_checkpoint(a, 4, RUN_A)
    a_in_progress = begin_checkpoint(a, 6, RUN_A)
    (rank_stem(a_in_progress, 0).with_suffix(".safetensors")).write_bytes(b"half of a shard")
    b_leftover = begin_checkpoint(b, 1, RUN_B)  # as a writer of run B killed mid-checkpoint leaves it
    a_before = {name: digests(root / name) for name in ("iter-000002", "iter-000004", a_in_progress.name)}

    for iteration in (1, 3, 5):
        write_checkpoint(b, iteration, RUN_B)

    assert names(root) == sorted([a_in_progress.name, "iter-000002", "iter-000004", "iter-000005"])
    assert not b_leftover.exists()
    assert {name: digests(root / name) for name in a_before} == a_before
    with pytest.raises(CheckpointError, match=f"iter-000004: a checkpoint of run {RUN_A} is there, which run {RUN_B} "
                                              f"will not replace; two runs write to checkpoint.storage"):
        write_checkpoint(b, 4, RUN_B)
    assert digests(root / "iter-000004") == a_before["iter-000004"]
    assert trainer_of(root / "iter-000005")["run_id"] == RUN_B


def test_resume_auto_continues_the_run_of_the_newest_checkpoint_with_its_id(tmp_path, tiny_model_dirs):
    model = tiny_model_dirs["flux"]
    shared = f"checkpoint.storage={tmp_path / 'shared'}"
    a, b = config(tmp_path, model, shared), config(tmp_path, model, shared)
    write_checkpoint(a, 2, RUN_A)
    write_checkpoint(b, 3, RUN_B)
    write_checkpoint(a, 4, RUN_A)
    folder = resolve_resume(a, "auto")
    assert folder == checkpoint_root(a) / "iter-000004" and trainer_of(folder)["run_id"] == RUN_A
    assert resolve_resume(config(tmp_path / "elsewhere", model), "auto") is None  # no checkpoint: a fresh run


def test_a_named_folder_is_not_continued_beside_another_runs_or_its_own_later_checkpoints(tmp_path, tiny_model_dirs):
    model = tiny_model_dirs["flux"]
    first = config(tmp_path / "first", model)
    write_checkpoint(first, 2, RUN_A)
    write_checkpoint(first, 4, RUN_A)
    with pytest.raises(CheckpointError, match="holds iter-000004, later than iter-000002, of the same run"):
        resolve_resume(first, str(checkpoint_root(first) / "iter-000002"))
    other = config(tmp_path / "other", model)
    write_checkpoint(other, 1, RUN_B)
    with pytest.raises(CheckpointError, match=f"holds iter-000001 of another run \\({RUN_B}\\)"):
        resolve_resume(other, str(checkpoint_root(first) / "iter-000002"))
    elsewhere = config(tmp_path / "elsewhere", model)  # an empty folder: the run goes on from iter-000002 there
    assert resolve_resume(elsewhere, str(checkpoint_root(first) / "iter-000002")) == checkpoint_root(first) / "iter-000002"


# --------------------------------------------------------------------------- damaged checkpoints


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated shard": (lambda f: truncate(f / "learner-rank0.safetensors"), "truncated or changed"),
    "a byte changed": (lambda f: flip_a_byte(f / "learner-rank0.json"), "its sha256 is not the one trainer.json"),
    "lora file missing": (lambda f: (f / "lora" / "pytorch_lora_weights.safetensors").unlink(), "missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_auto_passes_over_a_damaged_newest_checkpoint_saying_so(tmp_path, tiny_model_dirs, damage):
    cfg = config(tmp_path, tiny_model_dirs["flux"], "checkpoint.keep_last=2")
    root = checkpoint_root(cfg)
    write_checkpoint(cfg, 2, RUN_A)
    write_checkpoint(cfg, 4, RUN_A)
    spoil, why = DAMAGE[damage]
    spoil(root / "iter-000004")
    said: list[str] = []

    assert resolve_resume(cfg, "auto", said.append) == root / "iter-000002"

    assert len(said) == 1 and "newest checkpoint damaged" in said[0] and why in said[0], said
    assert str(root / "iter-000004") in said[0] and said[0].endswith(f"resuming from {root / 'iter-000002'} instead")
    with pytest.raises(CheckpointError, match=f"the checkpoint is damaged: .*{why}"):
        resolve_resume(cfg, str(root / "iter-000004"))
    # the run goes on from iteration 2: its damaged iteration 4 is replaced, never kept beside its new checkpoints
    write_checkpoint(cfg, 3, RUN_A)
    assert names(root) == ["iter-000002", "iter-000003"]


def test_every_checkpoint_of_the_run_damaged_is_refused(tmp_path, tiny_model_dirs):
    cfg = config(tmp_path, tiny_model_dirs["flux"])
    folder = write_checkpoint(cfg, 2, RUN_A)
    truncate(folder / "learner-rank0.safetensors")
    with pytest.raises(CheckpointError, match=f"no intact checkpoint of run {RUN_A}; the newest: .*truncated"):
        resolve_resume(cfg, "auto")


def test_a_file_changed_after_it_was_verified_is_found_again(tmp_path, tiny_model_dirs):
    """Verification is remembered per process only while every file keeps its size and modification time."""
    cfg = config(tmp_path, tiny_model_dirs["flux"])
    folder = write_checkpoint(cfg, 2, RUN_A)
    verify_files(folder, trainer_of(folder))
    time.sleep(0.01)
    flip_a_byte(folder / "learner-rank0.safetensors")
    with pytest.raises(CheckpointError, match="its sha256 is not the one trainer.json lists"):
        verify_files(folder, trainer_of(folder))


# --------------------------------------------------------------------------- the training config


def changed_yaml(tmp_path: Path, old: str, new: str) -> Path:
    """tiny.yaml with one line changed, as a user edits a config between a run and its resume."""
    text = TINY.read_text()
    assert old in text
    path = tmp_path / "tiny-changed.yaml"
    path.write_text(text.replace(old, new))
    return path


def test_a_changed_training_key_is_refused_naming_it_unless_given_with_set(tmp_path, tiny_model_dirs, monkeypatch,
                                                                            capsys):
    model = tiny_model_dirs["flux"]
    write_checkpoint(config(tmp_path, model), 2, RUN_A)
    edited = changed_yaml(tmp_path, "  lr: 1.5e-2", "  lr: 2.0e-2")

    code, err = run_main(cli(tmp_path, model, cfg=edited) + ["--resume", "auto"], monkeypatch, capsys)
    assert code == 2 and len(err) == 1, err
    assert "this job's config differs from the one its run trained with: learner.lr 0.015 -> 0.02;" in err[0], err
    assert "--set learner.lr=..." in err[0]

    code, err = run_main(cli(tmp_path, model, "learner.lr=0.02") + ["--resume", "auto"], monkeypatch, capsys)
    assert code == 1 and err == ["error: RayWouldStart: every check before Ray passed"], err
    code, err = run_main(cli(tmp_path, model, "learner.lr=0.02", cfg=edited) + ["--resume", "auto"], monkeypatch,
                         capsys)
    assert code == 1 and err == ["error: RayWouldStart: every check before Ray passed"], err


@pytest.mark.parametrize("change, key", [(("seed: 0", "seed: 1"), "seed"),
                                         (("kind: cps", "kind: sde"), "sampler.kind"),
                                         (("weight: 1.0}", "weight: 2.0}"), "rewards.scorers.0.weight")])
def test_resuming_under_another_seed_sampler_or_reward_weight_is_refused(tmp_path, tiny_model_dirs, change, key):
    model = tiny_model_dirs["flux"]
    write_checkpoint(config(tmp_path, model), 2, RUN_A)
    with pytest.raises(CheckpointError, match=f"trained with: {key} "):
        resolve_resume(config(tmp_path, model, cfg=changed_yaml(tmp_path, *change)), "auto")
    with given_with_set([f"{key.split('.0.')[0]}=..."]):  # rewards.scorers is set whole
        assert resolve_resume(config(tmp_path, model, cfg=changed_yaml(tmp_path, *change)), "auto") is not None


def test_keys_outside_the_training_config_may_change(tmp_path, tiny_model_dirs):
    model = tiny_model_dirs["flux"]
    write_checkpoint(config(tmp_path, model), 2, RUN_A)
    moved = config(tmp_path, model, "iterations=80", "eval.every_n_iterations=0", "rollout.num_actors=1",
                   "rewards.timeout_s=30", "learner.num_cpus_per_actor=1", "checkpoint.every_n_iterations=5",
                   "logging.backends=[tensorboard]", "model.compile=true", "run_name=other")
    assert resolve_resume(moved, "auto") == checkpoint_root(moved) / "iter-000002"


def test_the_prompt_file_counts_by_its_content(tmp_path, tiny_model_dirs):
    model = tiny_model_dirs["flux"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    write_checkpoint(config(tmp_path, model, "data.source=text", f"data.path={prompts}"), 2, RUN_A)
    copy = tmp_path / "moved.txt"
    copy.write_text(prompts.read_text())
    assert resolve_resume(config(tmp_path, model, "data.source=text", f"data.path={copy}"), "auto") is not None
    prompts.write_text("a red cube\na green ball\n")
    with pytest.raises(CheckpointError, match="trained with: data.path \"sha256:"):
        resolve_resume(config(tmp_path, model, "data.source=text", f"data.path={prompts}"), "auto")


def test_resume_auto_with_another_learner_count_is_refused_before_ray(tmp_path, tiny_model_dirs, monkeypatch, capsys):
    model = tiny_model_dirs["flux"]
    write_checkpoint(config(tmp_path, model), 2, RUN_A)
    # ray.num_cpus=4: the two learner ranks fit the local Ray, whose start is the next step when this passes
    code, err = run_main(cli(tmp_path, model, "learner.num_actors=2", "ray.num_cpus=4") + ["--resume", "auto"],
                         monkeypatch, capsys)
    assert code == 2 and len(err) == 1, err
    assert "iter-000002: written by 1 learner ranks, this job has learner.num_actors = 2; they must match" in err[0]

