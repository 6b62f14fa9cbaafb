"""The offline tiny-model builder: real diffusers layout, deterministic per seed, atomic, cached by ensure_tiny."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from rollout.models import tiny
from rollout.models.tiny import build_tiny, ensure_tiny

FLUX_FOLDERS = {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"}
SD3_FOLDERS = FLUX_FOLDERS | {"text_encoder_3", "tokenizer_3"}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


@pytest.mark.parametrize("family,folders", [("flux", FLUX_FOLDERS), ("sd3", SD3_FOLDERS)])
def test_folder_has_the_diffusers_pipeline_layout(tiny_model_dirs, family, folders):
    folder = tiny_model_dirs[family]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}[family]
    assert folders <= {p.name for p in folder.iterdir() if p.is_dir()}
    assert list((folder / "transformer").glob("*.safetensors"))


@pytest.mark.parametrize(
    "family,scaling,shift,scheduler",
    [
        ("flux", 0.3611, 0.1159, dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                      base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)),
        ("sd3", 1.5305, 0.0609, dict(use_dynamic_shifting=False, shift=3.0)),
    ],
)
def test_vae_and_scheduler_are_configured_like_the_real_models(tiny_model_dirs, family, scaling, shift, scheduler):
    folder = tiny_model_dirs[family]
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert (vae["scaling_factor"], vae["shift_factor"], vae["latent_channels"]) == (scaling, shift, 16)
    assert len(vae["block_out_channels"]) == 4  # 8x downsampling
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert {key: config[key] for key in scheduler} == scheduler


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_same_seed_gives_identical_files_and_another_seed_different_weights(tiny_model_dirs, tmp_path, family):
    again = build_tiny(family, tmp_path / "again", seed=0)
    assert _files(again) == _files(tiny_model_dirs[family])
    other = build_tiny(family, tmp_path / "other", seed=1)
    weights = load_file(tiny_model_dirs[family] / "transformer" / "diffusion_pytorch_model.safetensors")
    other_weights = load_file(other / "transformer" / "diffusion_pytorch_model.safetensors")
    assert weights.keys() == other_weights.keys()
    assert not all(torch.equal(weights[k], other_weights[k]) for k in weights)


def test_building_does_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_pipeline("sd3", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_all_modules_are_in_eval_mode():
    pipe = tiny.build_tiny_pipeline("flux")
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert len(modules) == 4 and not any(m.training for m in modules)


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        build_tiny("flux", out)
    assert (out / "keep.txt").read_text() == "user data"
    build_tiny("flux", out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()
    assert _siblings(out) == []  # no temp or old folders left behind


def test_an_empty_existing_folder_is_filled(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    build_tiny("sd3", out)
    assert (out / "model_index.json").is_file()


def test_an_interrupted_build_leaves_no_folder(tmp_path, monkeypatch):
    def fail_halfway(self, save_directory, **kwargs):
        Path(save_directory, "transformer").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", fail_halfway)
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        build_tiny("flux", out)
    assert not out.exists() and _siblings(out) == []


def test_unknown_family_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="flux, sd3"):
        build_tiny("sdxl", tmp_path / "model")


def test_ensure_tiny_builds_once_then_reuses(tmp_path, capsys):
    out = tmp_path / "cache" / "flux"
    assert ensure_tiny("flux", out, seed=0) == out
    assert f"built tiny flux model (seed 0) at {out}" in capsys.readouterr().out
    stamp = (out / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny("flux", out, seed=0) == out
    assert capsys.readouterr().out == ""
    assert (out / "model_index.json").stat().st_mtime_ns == stamp


def test_ensure_tiny_refuses_a_folder_built_for_another_family_or_seed(tmp_path):
    out = ensure_tiny("flux", tmp_path / "model", seed=0)
    with pytest.raises(ValueError, match="sd3 with seed 0"):
        ensure_tiny("sd3", out, seed=0)
    with pytest.raises(ValueError, match="flux with seed 1"):
        ensure_tiny("flux", out, seed=1)


def test_command_line_reports_path_and_parameter_counts(tmp_path, capsys):
    out = tmp_path / "model"
    tiny.main(["--family", "sd3", "--out", str(out), "--seed", "3"])
    printed = capsys.readouterr().out
    assert str(out) in printed and "transformer" in printed and "total" in printed
    assert json.loads((out / tiny.MARKER).read_text()) == {"family": "sd3", "seed": 3}
    with pytest.raises(SystemExit) as exit_info:
        tiny.main(["--family", "sd3", "--out", str(out)])
    assert exit_info.value.code == 2
