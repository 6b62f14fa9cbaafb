"""A corpus of bad inputs to `python -m learner.main`: each gives one clear line on stderr (what, where, what is
allowed), exit code 2, no traceback, and leaves nothing half-written on disk.

Most cases run `learner.main.main(argv)` in-process: they fail in the config validation or in the preflight
(learner/driver/preflight.py), before Ray starts. The cases that need the real process (its exit status, a pool check
against a started Ray) run `python -m learner.main` in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import huggingface_hub
import pytest

from learner.main import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "cluster" / "tiny.yaml")


@dataclass
class Job:
    """One case's world: an empty work folder (the output folder is `work/out`), the tiny FLUX model, monkeypatch."""

    work: Path
    model: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.work / "out"

    def file(self, name: str, text: str) -> Path:
        path = self.work / name
        path.write_text(text)
        return path

    def base_args(self) -> list[str]:
        """tiny.yaml on the prebuilt tiny model, writing under work/out; every preflight check passes on these."""
        return ["--cfg", TINY, "--set", f"model.path={self.model}", "--set", f"output_dir={self.out}",
                "--set", "metrics.port=0"]


# Each case prepares its inputs and returns (extra argv, substrings the one error line must contain).
Case = Callable[[Job], tuple[list[str], list[str]]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__.removeprefix("case_").replace("_", "-")] = fn
    return fn


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


# --------------------------------------------------------------------------- the config file


@case
def case_malformed_yaml(j):
    bad = j.file("bad.yaml", "model:\n  family: flux\n  path: [unclosed\nsampler: {}\n")
    return ["--cfg", str(bad)], ["config error:", f"{bad}:4:", "not valid YAML"]


@case
def case_unknown_top_level_key(j):
    return sets("bogus_section.x=1"), ["bogus_section: unknown key", "allowed:", "model, sampler"]


@case
def case_unknown_key_in_section(j):
    return sets("model.colour=red"), ["model.colour: unknown key", "allowed:", "family, path"]


@case
def case_wrong_type_number(j):
    return sets("learner.lr=abc"), ["learner.lr = 'abc'", "valid number"]


@case
def case_wrong_type_list(j):
    return sets("learner.lora.target_modules=to_q"), ["learner.lora.target_modules = 'to_q'", "valid list"]


@case
def case_reward_weights_all_zero(j):
    return (sets("rewards.scorers=[{name: jpeg_compressibility, weight: 0}]"),
            ["rewards.scorers", "every weight is 0", "non-zero weight"])


@case
def case_group_size_not_dividing_batch(j):
    return sets("data.group_size=7"), ["data.images_per_iteration = 64", "multiple of data.group_size = 7"]


@case
def case_unknown_logging_backend(j):
    return sets("logging.backends=[mlflow]"), ["logging.backends.0 = 'mlflow'", "'tensorboard' or 'wandb'"]


@case
def case_wandb_backend_without_the_package(j):
    j.monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    return sets("logging.backends=[wandb]"), ["logging.backends names wandb", "pip install -e '.[wandb]'"]


@case
def case_warm_up_longer_than_the_job(j):
    return (sets("iterations=5", "learner.updates_per_iteration=2", "learner.lr_warmup_updates=10"),
            ["learner.lr_warmup_updates = 10", "iterations x updates_per_iteration = 10 updates"])


# --------------------------------------------------------------------------- the model


@case
def case_missing_model_folder(j):
    return (sets(f"model.path={j.work / 'absent-model'}", "model.build_tiny=false"),
            ["absent-model", "no such folder", "local diffusers folder", "model.allow_download"])


@case
def case_model_path_is_a_file(j):
    f = j.file("model.bin", "not a model")
    return sets(f"model.path={f}", "model.build_tiny=false"), ["model.bin", "is a file", "diffusers folder"]


@case
def case_incomplete_model_folder(j):
    (j.work / "partial").mkdir()
    j.file("partial/model_index.json", "{}")
    return (sets(f"model.path={j.work / 'partial'}", "model.build_tiny=false"),
            ["partial", "incomplete", "subfolder 'transformer' missing"])


def _empty_hub_cache(j: Job) -> None:
    """An empty Hugging Face cache outside the work folder (the hub reads it at import, so patch the module)."""
    j.monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(j.work.parent / "hub-cache"))


@case
def case_hub_id_not_cached_downloads_off(j):
    _empty_hub_cache(j)
    return (sets("model.path=some-org/not-cached-model", "model.build_tiny=false", "model.allow_download=false"),
            ["'some-org/not-cached-model'", "local Hugging Face cache", "downloads are off",
             "model.allow_download=true"])


@case
def case_hub_id_with_hub_offline(j):
    _empty_hub_cache(j)
    j.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    j.monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return (sets("model.path=some-org/not-cached-model", "model.build_tiny=false", "model.allow_download=true"),
            ["'some-org/not-cached-model'", "HF_HUB_OFFLINE=1", "unset HF_HUB_OFFLINE", "local diffusers folder"])


@case
def case_lora_target_matches_nothing(j):
    return (sets("learner.lora.target_modules=[to_q, to_qq]"),
            ["learner.lora.target_modules", "'to_qq' matches no module", "FluxTransformer2DModel", "to_q, to_v"])


@case
def case_lora_target_not_a_layer(j):
    return (sets("learner.lora.target_modules=[norm_out]"),
            ["'norm_out' matches norm_out (AdaLayerNormContinuous)", "cannot wrap", "Linear/Conv/Embedding"])


# --------------------------------------------------------------------------- prompt files


@case
def case_empty_prompt_file(j):
    f = j.file("empty.txt", "\n   \n\n")
    return sets("data.source=text", f"data.path={f}"), [f"{f}: no prompts found", "one prompt per non-blank line"]


@case
def case_missing_prompt_file(j):
    return (sets("data.source=text", f"data.path={j.work / 'nowhere.txt'}"),
            [f"{j.work / 'nowhere.txt'}: prompt file not found"])


@case
def case_bad_json_line_in_geneval_file(j):
    f = j.file("geneval.jsonl", '{"prompt": "a photo of a dog", "tag": "single_object"}\n{"prompt": "a cat",}\n')
    return (sets("data.source=geneval_jsonl", f"data.path={f}"),
            [f"{f}:2: not valid JSON", "column", "one JSON object with a 'prompt'"])


@case
def case_geneval_record_without_prompt(j):
    f = j.file("geneval.jsonl", '{"tag": "single_object"}\n')
    return (sets("data.source=geneval_jsonl", f"data.path={f}"),
            [f"{f}:1: 'prompt' must be a non-empty string", "None"])


@case
def case_missing_eval_prompt_file(j):
    return (sets("eval.source=text", f"eval.path={j.work / 'eval.txt'}"),
            [f"{j.work / 'eval.txt'}: prompt file not found"])


@case
def case_ocr_prompt_without_quoted_target(j):
    f = j.file("ocr.txt", 'a sign that says "OPEN"\n\na shop window at night\n')
    return (sets("rewards.scorers=[{name: ocr}]", "data.source=text", f"data.path={f}"),
            [f"{f}:3:", "'a shop window at night'", "no text in double quotes", 'e.g. \'a sign that says "Open Late"\''])


@case
def case_ocr_eval_prompt_without_quoted_target(j):
    f = j.file("ocr.txt", 'a sign that says "OPEN"\n')
    return (sets("rewards.scorers=[{name: ocr}]", "data.source=text", f"data.path={f}"),
            ["eval.source 'builtin', prompt 1", "no text in double quotes"])


# --------------------------------------------------------------------------- rewards


@case
def case_unknown_reward_name(j):
    return (sets("rewards.scorers=[{name: bogus}]"),
            ["rewards.scorers.0.name = 'bogus'", "unknown reward", "registered:", "jpeg_compressibility, ocr"])


@case
def case_unknown_reward_option(j):
    return (sets("rewards.scorers=[{name: jpeg_compressibility, options: {qualty: 90}}]"),
            ["rewards.scorers.0.options", "no option 'qualty'", "allowed: quality, divisor"])


# --------------------------------------------------------------------------- cluster, output folder, resume


@case
def case_pools_need_more_cpus_than_local_ray(j):
    return (sets("rollout.num_actors=64"),
            ["ClusterTooSmall", "the pools need 32.75 CPUs (rollout 32, rewards 0.25, learner 0.5)",
             "the Ray cluster has 2", "lower the pools' num_actors", "ray.num_cpus"])


@case
def case_pools_need_more_gpus_than_local_ray(j):
    return (sets("rollout.num_gpus_per_actor=1", "ray.num_gpus=0"),
            ["the pools need 2 GPUs (rollout 2, rewards 0, learner 0)", "has 0", "ray.num_gpus"])


@case
def case_output_dir_under_a_file(j):
    j.file("afile", "")
    return sets(f"output_dir={j.work / 'afile' / 'out'}"), ["output_dir", "afile is a file, not a folder",
                                                            "can be created"]


@case
def case_output_dir_is_a_file(j):
    j.file("out", "")
    return [], [f"output_dir = '{j.out}'", "is a file, not a folder"]


@case
def case_output_dir_not_writable(j):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    (j.work / "locked").mkdir(mode=0o500)
    return sets(f"output_dir={j.work / 'locked' / 'out'}"), ["output_dir", "cannot create or write", "Permission"]


@case
def case_resume_from_folder_that_is_not_a_checkpoint(j):
    (j.work / "notckpt").mkdir()
    return (["--resume", str(j.work / "notckpt")],
            ["CheckpointError", "notckpt", "not a checkpoint folder (no trainer.json)", "iter-000004, 'auto' or 'none'"])


@case
def case_resume_from_missing_folder(j):
    return (["--resume", str(j.work / "gone")], ["gone", "no such folder", "'auto' or 'none'"])


@case
def case_resume_with_other_learner_count(j):
    (j.work / "iter-000004").mkdir()
    j.file("iter-000004/trainer.json", json.dumps({"iteration": 4, "world_size": 2}))
    return (["--resume", str(j.work / "iter-000004")],
            ["written by 2 learner ranks", "learner.num_actors = 1", "must match"])


@case
def case_metrics_port_in_use(j):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))  # held until the test's end (the case's world keeps it)
    taken.listen()
    j.monkeypatch.setattr(j, "held_socket", taken, raising=False)
    port = taken.getsockname()[1]
    return sets(f"metrics.port={port}"), [f"metrics.port = {port}", f"127.0.0.1:{port} is not free",
                                           "0 for any free port"]


# --------------------------------------------------------------------------- the tests


def snapshot(folder: Path) -> dict[str, int]:
    """Every path under `folder` with its size (folders -1): what a case may not change."""
    return {str(p.relative_to(folder)): (-1 if p.is_dir() else p.stat().st_size) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def warm_imports():
    """Import what the preflight imports once, so that no case pays first-import costs."""
    import peft  # noqa: F401

    import learner.ranks.checkpoint  # noqa: F401
    import rollout.models.flux  # noqa: F401


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_written(name, tmp_path, tiny_model_dirs, monkeypatch, capsys,
                                                          warm_imports):
    work = tmp_path / "work"
    work.mkdir()
    job = Job(work, tiny_model_dirs["flux"], monkeypatch)
    extra, expected = CASES[name](job)
    before, model_before = snapshot(work), snapshot(job.model)

    code = main(job.base_args() + extra)

    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(("error: ", "config error: ")) and "Traceback" not in err, err
    for part in expected:
        assert part in line, f"{part!r} not in {line!r}"
    assert code == 2, line
    assert snapshot(work) == before  # nothing half-written: no output folder, temp file or model folder appeared
    assert snapshot(job.model) == model_before


def test_the_cases_cover_the_list():
    assert len(CASES) >= 20


def test_good_inputs_pass_the_preflight(tmp_path, tiny_model_dirs):
    """The corpus' base config passes every check, and the output folder probe leaves nothing behind."""
    from cluster.config_loading import load_config
    from learner.driver.preflight import preflight

    out = tmp_path / "a" / "b"
    cfg = load_config(TINY, [f"model.path={tiny_model_dirs['flux']}", f"output_dir={out}"])
    preflight(cfg, "none")
    preflight(cfg, "auto")
    assert list(tmp_path.iterdir()) == []


def run_main(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})}
    return subprocess.run([sys.executable, "-m", "learner.main", "--cfg", TINY, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith(("error:", "config error:"))]


def test_process_prints_one_line_and_exits_2(tmp_path):
    """The real process with the hub's own offline switch in its environment (read at import, as users set it):
    exit status 2, stderr holds the one error line and nothing else, Ray never starts, nothing is written."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub-cache")}
    r = run_main(*sets("model.path=some-org/not-cached-model", f"output_dir={tmp_path / 'out'}", "metrics.port=0",
                       "model.build_tiny=false", "model.allow_download=true"), env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert lines == error_lines(r.stderr) and len(lines) == 1, r.stderr[-3000:]
    assert "'some-org/not-cached-model'" in lines[0] and "HF_HUB_OFFLINE=1 turns downloads off" in lines[0]
    assert "started a local Ray" not in r.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_pools_larger_than_the_started_ray_exit_2_before_any_actor(tmp_path, tiny_model_dirs):
    """With ray.num_cpus unset the preflight cannot know the size: the check after Ray starts refuses the pools."""
    r = run_main(*sets(f"model.path={tiny_model_dirs['flux']}", f"output_dir={tmp_path / 'out'}", "ray.num_cpus=null",
                       "rollout.num_actors=1000", "metrics.enabled=false", "metrics.port=0"))
    assert r.returncode == 2, r.stderr[-3000:]
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "ClusterTooSmall: the pools need 500.75 CPUs (rollout 500" in errors[0]
    assert "but the Ray cluster has" in errors[0] and "lower the pools' num_actors" in errors[0]
    assert "ray.num_cpus" not in errors[0]  # the check after start-up, not the preflight
    assert "started a local Ray" in r.stdout and "actors up" not in r.stdout and "training prompts" not in r.stdout
    assert not (tmp_path / "out").exists()
