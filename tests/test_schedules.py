"""Schedules read from the model's own scheduler config, against the sigmas each diffusers pipeline itself uses."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rollout.models.loading import ModelLoadError, load_flow_model
from rollout.models.schedules import DEFAULT_CONFIGS, read_config
from rollout.models.tiny import build_tiny_pipeline

# The scheduler_config.json files the real models ship (black-forest-labs/FLUX.1-dev, FLUX.1-schnell,
# stabilityai/stable-diffusion-3.5-medium), and a made-up SD3 config with dynamic shifting.
CONFIGS = {
    "flux-dev": ("flux", dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                              num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)),
    "flux-schnell": ("flux", dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                                  num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)),
    "sd3.5": ("sd3", dict(num_train_timesteps=1000, shift=3.0)),
    "sd3-dynamic": ("sd3", dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.3,
                                max_shift=1.0)),
}


def pipeline_sigmas(pipe, steps: int, size: int) -> torch.Tensor:
    """The sigmas the pipeline's own loop runs with, read from its scheduler at the first step."""
    seen = []

    def record(p, i, t, kwargs):
        if i == 0:
            seen.append(p.scheduler.sigmas.clone())
        return kwargs

    pipe.set_progress_bar_config(disable=True)
    pipe(prompt="a red square", num_inference_steps=steps, height=size, width=size, output_type="latent",
         callback_on_step_end=record, generator=torch.Generator().manual_seed(0))
    return seen[0].float()


@pytest.fixture(scope="module")
def pipes():
    return {family: build_tiny_pipeline(family) for family in ("flux", "sd3")}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("steps,size", [(4, 64), (7, 128)])
def test_model_schedule_equals_the_pipelines_own(pipes, tmp_path, name, steps, size):
    family, config = CONFIGS[name]
    pipe = pipes[family]
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    pipe.save_pretrained(tmp_path)  # the model folder as it is published, with this scheduler config
    model = load_flow_model(str(tmp_path), family, parts=("transformer",))
    assert model.scheduler_config["shift"] == config["shift"]
    torch.testing.assert_close(model.sigmas(steps, size, size), pipeline_sigmas(pipe, steps, size), atol=1e-6, rtol=0)


def test_schnell_and_dev_differ_and_schnell_is_unshifted(pipes, tmp_path):
    # FLUX.1-schnell: shift 1, no dynamic shifting: the linear schedule 1, 3/4, 1/2, 1/4, 0
    pipe = pipes["flux"]
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(CONFIGS["flux-schnell"][1])
    pipe.save_pretrained(tmp_path)
    model = load_flow_model(str(tmp_path), "flux", parts=("transformer",))
    assert model.sigmas(4, 64, 64).tolist() == pytest.approx([1, 0.75, 0.5, 0.25, 0], abs=1e-7)
    dev = model.sigmas(4, 64, 64)
    model.scheduler_config = CONFIGS["flux-dev"][1]
    assert not torch.allclose(model.sigmas(4, 64, 64), dev)


def test_a_folder_without_a_scheduler_config_gets_the_family_default(tiny_model_dirs, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["sd3"], folder)
    shutil.rmtree(folder / "scheduler")
    assert read_config(folder, "sd3") == DEFAULT_CONFIGS["sd3"]
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ModelLoadError, match="scheduler config is a JSON object"):
        load_flow_model(str(folder), "sd3", parts=("transformer",))
