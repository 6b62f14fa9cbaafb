"""A corpus of bad inputs to `python -m learner.main`: each gives one clear line on stderr (what, where, what is
allowed), exit code 2, no traceback, and leaves nothing half-written on disk.

Most cases run `learner.main.main(argv)` in-process: they fail in the config validation or in the preflight
(learner/driver/preflight.py), before Ray starts. The cases that need the real process (its exit status, a pool check
against a started Ray) run `python -m learner.main` in a subprocess.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import huggingface_hub.constants
import pytest

from learner.driver.inputs import InputError
from learner.main import main
from tests.jobs import job_env, run_job

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
            ["model.path", "absent-model", "no such folder", "local diffusers folder or a hub id"])


@case
def case_model_allow_download_was_removed(j):
    return sets("model.allow_download=true"), ["model.allow_download: removed", "downloaded on first use",
                                               "HF_HUB_OFFLINE=1", "delete the line"]


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
def case_hub_id_not_cached_with_hub_offline(j):
    _empty_hub_cache(j)  # the test session runs with HF_HUB_OFFLINE=1 (conftest.py)
    return (sets("model.path=some-org/not-cached-model", "model.build_tiny=false"),
            ["model.path 'some-org/not-cached-model'", "not in the local Hugging Face cache", "HF_HUB_OFFLINE=1 is set",
             "size unknown (offline)", "unset HF_HUB_OFFLINE"])


@case
def case_hub_id_not_cached_and_the_hub_unreachable(j):
    _empty_hub_cache(j)
    j.monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    j.monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    return (sets("model.path=some-org/not-cached-model", "model.build_tiny=false"),
            ["model.path 'some-org/not-cached-model'", "not in the local Hugging Face cache",
             "the hub does not give it (ConnectError", "check the id, your access to it"])


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
def case_missing_scorer_weights(j):
    options = f"{{path: '{j.work / 'no-clip'}', processor_path: null}}"
    return (sets(f"rewards.scorers=[{{name: pickscore, options: {options}}}]"),
            [f"rewards.scorers.0.options.path '{j.work / 'no-clip'}'", "no such file or folder",
             "a local path or a hub id"])


@case
def case_scorer_allow_download_was_removed(j):
    return (sets("rewards.scorers=[{name: pickscore, options: {allow_download: true}}]"),
            ["rewards.scorers.0.options.allow_download: removed", "HF_HUB_OFFLINE=1"])


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
    capsys.readouterr()  # what came before (the tiny model built on first use) is not the case's output

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


def test_every_missing_input_is_listed_in_one_run(tmp_path, monkeypatch, capsys):
    """A dry run of flux.yaml with inputs of three kinds missing: a prompt file, the model's hub id (not in the cache,
    the hub offline) and a scorer's local weights. Every one is named, one line each, in one run; exit 2 before Ray
    starts, nothing written."""
    monkeypatch.chdir(ROOT)  # the config's own relative paths (eval.path data/pickscore/test.txt) are there
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    absent = tmp_path / "absent"
    code = main(["--cfg", "cluster/flux.yaml", "--dry-run", *sets(
        f"output_dir={tmp_path / 'out'}", f"data.path={absent}.txt",
        f"rewards.scorers=[{{name: pickscore, options: {{path: '{absent}-clip', processor_path: '{absent}-proc'}}}}]")])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.splitlines() == [
        "error: InputError: 4 inputs are missing:",
        f"  data.path: {absent}.txt: prompt file not found",
        "  model.path 'black-forest-labs/FLUX.1-dev': not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 is "
        "set (size unknown (offline)); unset HF_HUB_OFFLINE to download it, or point model.path at a local copy",
        f"  rewards.scorers.0.options.path '{absent}-clip': no such file or folder (and not a hub id like "
        f"'org/name'); give a local path or a hub id",
        f"  rewards.scorers.0.options.processor_path '{absent}-proc': no such file or folder (and not a hub id "
        f"like 'org/name'); give a local path or a hub id",
    ]
    assert "started a local Ray" not in out and list(tmp_path.iterdir()) == []


def test_hub_ids_not_cached_are_listed_with_their_download_size(tmp_path, monkeypatch):
    """Online, flux.yaml's three hub ids not in the cache: a dry run lists each as missing with what a run downloads
    (the files the job reads, as the hub lists them: here a stand-in for the hub's answer), a run says it downloads
    them first."""
    from types import SimpleNamespace

    from cluster.config_loading import load_config
    from learner.driver.inputs import check_inputs

    files = {  # repo -> {file: bytes}
        "black-forest-labs/FLUX.1-dev": {
            "model_index.json": 500, "flux1-dev.safetensors": 23_800_000_000, "scheduler/scheduler_config.json": 300,
            "transformer/diffusion_pytorch_model.safetensors": 23_800_000_000,
            "vae/diffusion_pytorch_model.safetensors": 170_000_000, "text_encoder/model.safetensors": 250_000_000,
            "text_encoder_2/model.safetensors": 9_500_000_000, "tokenizer/vocab.json": 1_000_000,
            "tokenizer_2/spiece.model": 800_000},
        "yuvalkirstain/PickScore_v1": {"config.json": 5_000, "model.safetensors": 3_900_000_000,
                                       "pytorch_model.bin": 3_900_000_000},
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": {"tokenizer.json": 2_200_000, "vocab.json": 800_000,
                                                  "open_clip_pytorch_model.bin": 3_900_000_000}}

    def model_info(self, repo_id, files_metadata=False):
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f, size=n) for f, n in files[repo_id].items()])

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    cfg = load_config("cluster/flux.yaml", [f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(InputError) as missing:
        check_inputs(cfg, dry_run=True)
    assert str(missing.value).splitlines() == [
        "3 inputs are missing:",
        "  model.path 'black-forest-labs/FLUX.1-dev': not in the local Hugging Face cache; a run downloads it "
        "(33.7 GB), the dry run downloads nothing",
        "  rewards.scorers.0.options.path 'yuvalkirstain/PickScore_v1': not in the local Hugging Face cache; a run "
        "downloads it (3.9 GB), the dry run downloads nothing",
        "  rewards.scorers.0.options.processor_path 'laion/CLIP-ViT-H-14-laion2B-s32B-b79K': not in the local "
        "Hugging Face cache; a run downloads it (3.0 MB), the dry run downloads nothing"]
    assert check_inputs(cfg) == [
        "model.path 'black-forest-labs/FLUX.1-dev': not in the local Hugging Face cache; downloading it first "
        "(33.7 GB)",
        "rewards.scorers.0.options.path 'yuvalkirstain/PickScore_v1': not in the local Hugging Face cache; "
        "downloading it first (3.9 GB)",
        "rewards.scorers.0.options.processor_path 'laion/CLIP-ViT-H-14-laion2B-s32B-b79K': not in the local "
        "Hugging Face cache; downloading it first (3.0 MB)"]


def test_good_inputs_pass_the_preflight(tmp_path, tiny_model_dirs):
    """The corpus' base config passes every check, and the output folder probe leaves nothing behind."""
    from cluster.config_loading import load_config
    from learner.driver.preflight import preflight

    out = tmp_path / "a" / "b"
    cfg = load_config(TINY, [f"model.path={tiny_model_dirs['flux']}", f"output_dir={out}"])
    preflight(cfg, "none")
    preflight(cfg, "auto")
    assert list(tmp_path.iterdir()) == []


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith(("error:", "config error:"))]


@pytest.mark.slow
def test_process_prints_one_line_and_exits_2(tmp_path):
    """The real process with the hub's own offline switch in its environment (read at import, as users set it):
    exit status 2, stderr holds the one error line and nothing else, Ray never starts, nothing is written."""
    env = job_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub-cache"))
    r = run_job(TINY, "model.path=some-org/not-cached-model", "metrics.port=0", "model.build_tiny=false",
                out=tmp_path / "out", expect_rc=2, timeout=300, env=env)
    lines = r.stderr.strip().splitlines()
    assert lines == error_lines(r.stderr) and len(lines) == 1, r.stderr[-3000:]
    assert "'some-org/not-cached-model'" in lines[0] and "HF_HUB_OFFLINE=1 is set" in lines[0]
    assert "started a local Ray" not in r.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_pools_larger_than_the_started_ray_exit_2_before_any_actor(tmp_path, tiny_model_dirs):
    """With ray.num_cpus unset the preflight cannot know the size: the check after Ray starts refuses the pools."""
    r = run_job(TINY, f"model.path={tiny_model_dirs['flux']}", "ray.num_cpus=null", "rollout.num_actors=1000",
                "metrics.enabled=false", "metrics.port=0", out=tmp_path / "out", expect_rc=2, timeout=300)
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "ClusterTooSmall: the pools need 500.75 CPUs (rollout 500" in errors[0]
    assert "but the Ray cluster has" in errors[0] and "lower the pools' num_actors" in errors[0]
    assert "ray.num_cpus" not in errors[0]  # the check after start-up, not the preflight
    assert "started a local Ray" in r.stdout and "actors up" not in r.stdout and "training prompts" not in r.stdout
    assert not (tmp_path / "out").exists()
