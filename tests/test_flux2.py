"""FLUX.2 [klein] against diffusers' Flux2KleinPipeline itself: prompt encoding, schedule, velocity with true CFG,
decoding, a whole ODE sampling; then a tiny job on it whose exported LoRA the pipeline loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rollout.models.loading import load_flow_model
from rollout.models.tiny import build_tiny, build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
SIZE, STEPS, GUIDANCE, MAX_LEN = 64, 4, 4.0, 40
PROMPTS = ["a red cat on a blue sofa", "two dogs"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny("flux2", tmp_path_factory.mktemp("tiny") / "flux2", seed=0)


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_pipeline("flux2", seed=0)  # the same seed as the folder: the independent reference
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def model(folder):
    return load_flow_model(str(folder), "flux2", max_sequence_length=MAX_LEN)


def packed_noise(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's latent noise (B, 4C, h, w) and the same noise as the adapter's packed tokens (B, h*w, 4C)."""
    unpacked = torch.randn((batch, 16, SIZE // 16, SIZE // 16), generator=torch.Generator().manual_seed(seed))
    return unpacked, unpacked.flatten(2).permute(0, 2, 1).contiguous()


def test_prompt_embeddings_equal_the_pipelines(pipe, model):
    expected, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_LEN)
    got = model.encode_prompts(PROMPTS)
    torch.testing.assert_close(got.prompt_embeds, expected, rtol=0, atol=0)
    assert got.pooled.shape == (2, 0)


def test_schedule_equals_the_pipelines(pipe, model):
    seen = []

    def record(p, i, t, kwargs):
        seen.append(p.scheduler.sigmas.clone()) if i == 0 else None
        return kwargs

    for steps, size in ((4, 64), (28, 128)):
        seen.clear()
        pipe(prompt="x", height=size, width=size, num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
             max_sequence_length=MAX_LEN, callback_on_step_end=record)
        torch.testing.assert_close(model.sigmas(steps, size, size), seen[0].float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("guidance", [1.0, GUIDANCE])
def test_ode_sampling_equals_the_pipelines_images(pipe, model, guidance):
    unpacked, x = packed_noise(len(PROMPTS))
    expected = pipe(prompt=PROMPTS, latents=unpacked, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                    guidance_scale=guidance, max_sequence_length=MAX_LEN, output_type="np").images
    embeds, negative = model.encode_prompts(PROMPTS), model.negative_embeds()
    schedule = model.sigmas(STEPS, SIZE, SIZE)
    with torch.no_grad():
        for t, s in zip(schedule[:-1], schedule[1:]):
            x = x + (s - t) * model.velocity(x, t, embeds, guidance_scale=guidance, negative=negative)
    difference = np.abs(model.decode(x, SIZE, SIZE).numpy().astype(np.float32) - np.round(expected * 255))
    # at most one level, and rarely: float rounding (a batched [negative, positive] forward against two) at the edges
    assert difference.max() <= 1.0 and (difference > 0).mean() < 0.01


def test_guidance_changes_the_velocity_and_needs_the_negative(model):
    _, x = packed_noise(1)
    embeds = model.encode_prompts(PROMPTS[:1])
    plain = model.velocity(x, 0.5, embeds, guidance_scale=1.0)
    guided = model.velocity(x, 0.5, embeds, guidance_scale=GUIDANCE, negative=model.negative_embeds())
    assert not torch.allclose(plain, guided)
    with pytest.raises(ValueError, match="needs negative embeddings"):
        model.velocity(x, 0.5, embeds, guidance_scale=GUIDANCE)


@pytest.mark.slow
def test_a_tiny_job_trains_and_its_lora_loads_into_the_pipeline(tmp_path, folder):
    from diffusers import Flux2KleinPipeline

    out = tmp_path / "run"
    sets = [f"output_dir={out}", f"model.path={folder}", "model.family=flux2", "model.build_tiny=false",
            f"model.max_sequence_length={MAX_LEN}", "iterations=3", "data.images_per_iteration=16",
            "data.group_size=8", "rollout.samples_per_forward=8", "learner.micro_batch_size=8",
            "sampler.guidance_scale=2.0", "eval.every_n_iterations=0", "metrics.port=0",
            "learner.lora.target_modules=[to_q,to_k,to_v,to_out.0,to_qkv_mlp_proj,proj_out,x_embedder]"]
    args = [sys.executable, "-m", "learner.main", "--cfg", "cluster/tiny.yaml"]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [row["policy_version"] for row in rows] == [1, 2, 3] and rows[0]["ratio_mean"] == 1.0

    pipe = Flux2KleinPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    unpacked, _ = packed_noise(1)
    kwargs = dict(prompt="a photo", latents=unpacked, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                  guidance_scale=2.0, max_sequence_length=MAX_LEN, output_type="np")
    base = pipe(**kwargs).images
    pipe.load_lora_weights(str(out / "checkpoints" / "iter-000003" / "lora"))
    tuned = pipe(**kwargs).images
    assert np.abs(tuned - base).max() > 1 / 255  # the trained adapter changes the image
