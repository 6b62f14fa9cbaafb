"""Qwen-Image against diffusers' QwenImagePipeline itself: prompt encoding at each prompt's own length, schedule,
true CFG with the norm rescale, decoding, a whole ODE sampling; padded batches; a tiny job whose LoRA the pipeline
loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rollout.models.contract import PromptEmbeds
from rollout.models.loading import load_flow_model
from rollout.models.tiny import build_tiny, build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
SIZE, STEPS, GUIDANCE = 64, 4, 4.0
PROMPTS = ["a red cat on a blue sofa", "two dogs"]  # of different lengths: the batch is padded and masked


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny("qwen_image", tmp_path_factory.mktemp("tiny") / "qwen_image", seed=0)


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_pipeline("qwen_image", seed=0)  # the same seed as the folder: the independent reference
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def model(folder):
    return load_flow_model(str(folder), "qwen_image")


def noise(batch: int, seed: int = 1) -> torch.Tensor:
    """Packed latent noise (B, (H/16)*(W/16), 4*4), the layout both the pipeline and the adapter sample in."""
    return torch.randn((batch, (SIZE // 16) ** 2, 16), generator=torch.Generator().manual_seed(seed))


def test_prompt_embeddings_and_mask_equal_the_pipelines(pipe, model):
    expected, mask = pipe.encode_prompt(PROMPTS)
    got = model.encode_prompts(PROMPTS)
    torch.testing.assert_close(got.prompt_embeds, expected, rtol=0, atol=0)
    assert torch.equal(got.mask, mask.bool()) and got.mask.sum(1).tolist()[0] > got.mask.sum(1).tolist()[1]
    alone = model.encode_prompts(PROMPTS[1:])  # one prompt: its own length, no mask
    assert alone.mask is None and alone.prompt_embeds.shape[1] == int(mask[1].sum())


def test_schedule_equals_the_pipelines(pipe, model):
    seen = []

    def record(p, i, t, kwargs):
        if i == 0:
            seen.append(p.scheduler.sigmas.clone())
        return kwargs

    for steps, size in ((4, 64), (20, 128)):
        seen.clear()
        pipe(prompt="x", height=size, width=size, num_inference_steps=steps, output_type="latent",
             callback_on_step_end=record)
        torch.testing.assert_close(model.sigmas(steps, size, size), seen[0].float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("guidance", [1.0, GUIDANCE])
def test_ode_sampling_equals_the_pipelines_images(pipe, model, guidance):
    x = noise(len(PROMPTS))
    kwargs = dict(negative_prompt=" ", true_cfg_scale=guidance) if guidance > 1 else {}
    expected = pipe(prompt=PROMPTS, latents=x, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                    output_type="np", **kwargs).images
    embeds, negative = model.encode_prompts(PROMPTS), model.negative_embeds()
    schedule = model.sigmas(STEPS, SIZE, SIZE)
    with torch.no_grad():
        for t, s in zip(schedule[:-1], schedule[1:]):
            x = x + (s - t) * model.velocity(x, t, embeds, guidance_scale=guidance, negative=negative)
    difference = np.abs(model.decode(x, SIZE, SIZE).numpy().astype(np.float32) - np.round(expected * 255))
    assert difference.max() <= 1.0 and (difference > 0).mean() < 0.01


def test_a_padded_batch_gives_each_prompt_its_own_velocity(model):
    """The learner batches groups of different prompts: padding and mask leave each row's velocity as it was."""
    x = noise(2)
    parts = [model.encode_prompts([p]) for p in PROMPTS]
    batched = model.velocity(x, 0.6, PromptEmbeds.cat(parts), guidance_scale=GUIDANCE,
                             negative=model.negative_embeds())
    for i, part in enumerate(parts):
        alone = model.velocity(x[i:i + 1], 0.6, part, guidance_scale=GUIDANCE, negative=model.negative_embeds())
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_tiny_job_trains_and_its_lora_loads_into_the_pipeline(tmp_path, folder):
    from diffusers import QwenImagePipeline

    out = tmp_path / "run"
    sets = [f"output_dir={out}", f"model.path={folder}", "model.family=qwen_image", "model.build_tiny=false",
            "iterations=3", "data.images_per_iteration=16", "data.group_size=8", "rollout.samples_per_forward=8",
            "learner.micro_batch_size=8", "sampler.guidance_scale=2.0", "eval.every_n_iterations=0",
            "metrics.port=0", "learner.lora.target_modules=[to_q,to_k,to_v,to_out.0,add_q_proj,img_in,proj_out]"]
    args = [sys.executable, "-m", "learner.main", "--cfg", "cluster/tiny.yaml"]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [row["policy_version"] for row in rows] == [1, 2, 3] and rows[0]["ratio_mean"] == 1.0

    pipe = QwenImagePipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a photo", latents=noise(1), height=SIZE, width=SIZE, num_inference_steps=STEPS,
                  negative_prompt=" ", true_cfg_scale=2.0, output_type="np")
    base = pipe(**kwargs).images
    pipe.load_lora_weights(str(out / "checkpoints" / "iter-000003" / "lora"))
    tuned = pipe(**kwargs).images
    assert np.abs(tuned - base).max() > 1 / 255  # the trained adapter changes the image
