"""FLUX.2 [klein], Qwen-Image and Z-Image against their diffusers pipelines themselves (FLUX.1 and SD3.5:
tests/test_models.py): prompt encoding, schedule, guidance, decoding and a whole ODE sampling from the same noise;
batches of prompts of different lengths; a tiny job on each whose exported LoRA the pipeline loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

from rollout.models.contract import PromptEmbeds
from rollout.models.loading import load_flow_model
from rollout.models.tiny import build_tiny_pipeline
from tests.jobs import run_job

SIZE, STEPS, MAX_LEN = 64, 4, 40
PROMPTS = ["a red cat on a blue sofa", "two dogs"]  # of different lengths


@dataclass(frozen=True)
class Family:
    """How the pipeline of one family is called and read, next to the adapter."""

    guidance: tuple[float, float]  # (no guidance, guidance) in the family's own convention
    pipeline_noise: Callable[[torch.Tensor], torch.Tensor]  # the adapter's latents -> the pipeline's `latents`
    guidance_kwargs: Callable[[float], dict]
    pipeline_rows: Callable[[object, list[str]], list[torch.Tensor]]  # each prompt's embeddings, own length
    lora_targets: str


def _unpacked(x: torch.Tensor) -> torch.Tensor:  # (B, h*w, 4C) tokens -> (B, 4C, h, w)
    side = int(x.shape[1] ** 0.5)
    return x.permute(0, 2, 1).reshape(x.shape[0], x.shape[2], side, side)


def _masked(embeds: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each row's real tokens."""
    return list(embeds) if mask is None else [e[m.bool()] for e, m in zip(embeds, mask)]


FAMILIES = {
    "flux2": Family(
        guidance=(1.0, 4.0), pipeline_noise=_unpacked,
        guidance_kwargs=lambda g: dict(guidance_scale=g, max_sequence_length=MAX_LEN),
        pipeline_rows=lambda pipe, p: list(pipe.encode_prompt(p, max_sequence_length=MAX_LEN)[0]),
        lora_targets="[to_q,to_k,to_v,to_out.0,to_qkv_mlp_proj,proj_out,x_embedder]"),
    "qwen_image": Family(
        guidance=(1.0, 4.0), pipeline_noise=lambda x: x,
        guidance_kwargs=lambda g: dict(max_sequence_length=MAX_LEN, **(dict(negative_prompt=" ", true_cfg_scale=g)
                                                                       if g > 1 else {})),
        pipeline_rows=lambda pipe, p: _masked(*pipe.encode_prompt(p, max_sequence_length=MAX_LEN)),
        lora_targets="[to_q,to_k,to_v,to_out.0,add_q_proj,img_in,proj_out]"),
    "z_image": Family(
        guidance=(0.0, 3.0), pipeline_noise=lambda x: x,
        guidance_kwargs=lambda g: dict(guidance_scale=g, max_sequence_length=MAX_LEN),
        pipeline_rows=lambda pipe, p: pipe.encode_prompt(p, do_classifier_free_guidance=False,
                                                         max_sequence_length=MAX_LEN)[0],
        lora_targets="[to_q,to_k,to_v,to_out.0,w1,w2,w3]"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_model_dirs):
    """(name, its spec, the tiny folder, the in-memory pipeline of the same seed, the adapter loaded from the folder)."""
    name = request.param
    folder = tiny_model_dirs[name]
    pipe = build_tiny_pipeline(name, seed=0)  # the independent reference
    pipe.set_progress_bar_config(disable=True)
    return name, FAMILIES[name], folder, pipe, load_flow_model(str(folder), name, max_sequence_length=MAX_LEN)


def noise(model, batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(model.latent_shape(batch, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))


def rows(embeds: PromptEmbeds) -> list[torch.Tensor]:
    return _masked(embeds.prompt_embeds, embeds.mask)


def test_prompt_embeddings_equal_the_pipelines(family):
    _, spec, _, pipe, model = family
    expected = spec.pipeline_rows(pipe, list(PROMPTS))
    got = rows(model.encode_prompts(PROMPTS))
    assert len(got) == len(expected) == 2
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_schedule_equals_the_pipelines(family):
    _, spec, _, pipe, model = family
    seen = []

    def record(p, i, t, kwargs):
        if i == 0:
            seen.append(p.scheduler.sigmas.clone())
        return kwargs

    for steps, size in ((4, 64), (20, 128)):
        seen.clear()
        pipe(prompt="x", height=size, width=size, num_inference_steps=steps, output_type="latent",
             callback_on_step_end=record, **spec.guidance_kwargs(spec.guidance[0]))
        torch.testing.assert_close(model.sigmas(steps, size, size), seen[0].float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("guided", [False, True])
def test_ode_sampling_equals_the_pipelines_images(family, guided):
    _, spec, _, pipe, model = family
    guidance = spec.guidance[guided]
    x = noise(model, len(PROMPTS))
    expected = pipe(prompt=list(PROMPTS), latents=spec.pipeline_noise(x), height=SIZE, width=SIZE,
                    num_inference_steps=STEPS, output_type="np", **spec.guidance_kwargs(guidance)).images
    embeds, negative = model.encode_prompts(PROMPTS), model.negative_embeds()
    schedule = model.sigmas(STEPS, SIZE, SIZE)
    with torch.no_grad():
        for t, s in zip(schedule[:-1], schedule[1:]):
            x = x + (s - t) * model.velocity(x, t, embeds, guidance_scale=guidance, negative=negative)
    difference = np.abs(model.decode(x, SIZE, SIZE).numpy().astype(np.float32) - np.round(expected * 255))
    # at most one level, and rarely: float rounding of a batched forward against separate ones, at the edges
    assert difference.max() <= 1.0 and (difference > 0).mean() < 0.01


def test_a_batch_of_prompts_gives_each_its_own_velocity(family):
    """The learner batches groups of different prompts (padded and masked where lengths differ): each row's guided
    velocity is the one its group alone gets."""
    _, spec, _, _, model = family
    x, guidance = noise(model, 2), spec.guidance[1]
    parts = [model.encode_prompts([p]) for p in PROMPTS]
    batched = model.velocity(x, 0.6, PromptEmbeds.cat(parts), guidance_scale=guidance,
                             negative=model.negative_embeds())
    for i, part in enumerate(parts):
        alone = model.velocity(x[i:i + 1], 0.6, part, guidance_scale=guidance, negative=model.negative_embeds())
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs negative embeddings"):
        model.velocity(x, 0.6, parts[0], guidance_scale=guidance)


@pytest.mark.slow
def test_a_tiny_job_trains_and_its_lora_loads_into_the_pipeline(family, tmp_path):
    name, spec, folder, _, model = family
    out, guidance = tmp_path / "run", spec.guidance[1] / 2
    history = run_job("tiny", f"model.path={folder}", f"model.family={name}", "model.build_tiny=false",
                      f"model.max_sequence_length={MAX_LEN}", "iterations=3", "data.images_per_iteration=16",
                      "data.group_size=8", "rollout.samples_per_forward=8", "learner.micro_batch_size=8",
                      f"sampler.guidance_scale={guidance}", "eval.every_n_iterations=0", "metrics.port=0",
                      f"learner.lora.target_modules={spec.lora_targets}", out=out).history
    assert [row["policy_version"] for row in history] == [1, 2, 3] and history[0]["ratio_mean"] == 1.0

    import diffusers

    pipe = getattr(diffusers, model.pipeline).from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a photo", latents=spec.pipeline_noise(noise(model, 1)), height=SIZE, width=SIZE,
                  num_inference_steps=STEPS, output_type="np", **spec.guidance_kwargs(guidance))
    base = pipe(**kwargs).images
    pipe.load_lora_weights(str(out / "checkpoints" / "iter-000003" / "lora"))
    assert np.abs(pipe(**kwargs).images - base).max() > 1 / 255  # the trained adapter changes the image
