"""FLUX / SD3 adapters against the diffusers pipelines themselves, and the sampling schedules against docs/math.md
"Schedules"."""

from __future__ import annotations

import json
import pickle
import shutil

import huggingface_hub
import pytest
import torch

from rollout.models.contract import PromptEmbeds
from rollout.models.loading import ModelLoadError, load_flow_model
from rollout.models.schedules import sigmas
from rollout.models.tiny import MARKER, build_tiny_pipeline

PROMPTS = ["a red cat on a blue sofa", "two dogs"]
GUIDANCE = {"flux": 3.5, "sd3": 4.5}
STEPS = {"flux": 6, "sd3": 10}
SIZE = 64
FAMILIES = ("flux", "sd3")


@pytest.fixture(scope="module")
def pipes(tiny_model_dirs):
    """The in-memory pipelines, built with the same seed as the saved folders (the independent reference)."""
    seeds = {family: json.loads((tiny_model_dirs[family] / MARKER).read_text())["seed"] for family in FAMILIES}
    pipes = {family: build_tiny_pipeline(family, seed=seed) for family, seed in seeds.items()}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    return {family: load_flow_model(str(tiny_model_dirs[family]), family) for family in FAMILIES}


def _noise(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _pipeline_velocity(pipe, family, prompts, latents, sigma, guidance, height=SIZE, width=SIZE):
    """One velocity evaluated the way FluxPipeline / StableDiffusion3Pipeline evaluate it inside their loops."""
    batch = latents.shape[0]
    with torch.no_grad():
        if family == "flux":
            embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=512)
            # FluxPipeline.prepare_latents: ids on the grid of 2x2 patches of the (H/8, W/8) latent
            image_ids = pipe._prepare_latent_image_ids(batch, height // 16, width // 16, "cpu", embeds.dtype)
            timestep = torch.full((batch,), 1000 * sigma) / 1000
            return pipe.transformer(
                hidden_states=latents,
                timestep=timestep,
                guidance=torch.full((batch,), guidance),
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=image_ids,
                return_dict=False,
            )[0]
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True, negative_prompt=""
        )
        out = pipe.transformer(
            hidden_states=torch.cat([latents, latents]),
            timestep=torch.full((2 * batch,), 1000 * sigma),
            encoder_hidden_states=torch.cat([negative, embeds]),
            pooled_projections=torch.cat([negative_pooled, pooled]),
            return_dict=False,
        )[0]
        uncond, cond = out.chunk(2)
        return uncond + guidance * (cond - uncond)


def _velocity(model, latents, sigma, embeds, **kwargs):
    negative = model.negative_embeds() if model.true_cfg else None
    return model.velocity(latents, sigma, embeds, guidance_scale=GUIDANCE[model.family], negative=negative, **kwargs)


def _sample(model, latents, prompts, steps):
    """Plain Euler (ODE) sampling with the adapter: x_s = x_t + (s - t) * v."""
    embeds = model.encode_prompts(prompts)
    schedule = model.sigmas(steps, SIZE, SIZE)
    x = latents.clone()
    with torch.no_grad():
        for t, s in zip(schedule[:-1], schedule[1:]):
            x = x + (s - t) * _velocity(model, x, t, embeds)
    return x


# --- schedules (numbers typed from docs/math.md "Schedules") -----------------------------------------------------


def test_sd3_schedule_matches_the_closed_form():
    expected = [1, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0]
    got = sigmas("sd3", 10)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)


def test_flux_schedule_at_512px_matches_the_closed_form():
    expected = [1, 0.9037, 0.7897, 0.6525, 0.4842, 0.2730, 0]
    got = sigmas("flux", 6, image_seq_len=1024)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)


def test_flux_schedule_shifts_with_resolution():
    # exp(mu) * t / (1 + (exp(mu) - 1) * t) with mu = 0.5 + (L - 256) * 0.65 / 3840, at t = 1/2 of 2 steps
    for tokens in (256, 4096):
        mu = 0.5 + (tokens - 256) * 0.65 / 3840
        e = torch.tensor(mu, dtype=torch.float64).exp()
        expected = e * 0.5 / (1 + (e - 1) * 0.5)
        assert sigmas("flux", 2, image_seq_len=tokens)[1].item() == pytest.approx(expected.item(), abs=1e-6)


def test_schedule_arguments_are_validated():
    with pytest.raises(ValueError, match="flux, sd3"):
        sigmas("sdxl", 10)
    with pytest.raises(ValueError, match="num_steps"):
        sigmas("sd3", 0)
    with pytest.raises(ValueError, match="image_seq_len"):
        sigmas("flux", 6)


def test_model_schedule_uses_its_packed_token_count(models):
    assert models["flux"].image_seq_len(512, 512) == 1024
    torch.testing.assert_close(models["flux"].sigmas(6, 512, 512), sigmas("flux", 6, image_seq_len=1024))
    torch.testing.assert_close(models["sd3"].sigmas(10, 512, 512), sigmas("sd3", 10))


# --- adapters against the pipelines -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_loaded_model_velocity_matches_the_pipeline_forward(models, pipes, family):
    model = models[family]
    latents = _noise(model.latent_shape(len(PROMPTS), SIZE, SIZE))
    sigma = 0.7
    got = _velocity(model, latents, sigma, model.encode_prompts(PROMPTS))
    expected = _pipeline_velocity(pipes[family], family, PROMPTS, latents, sigma, GUIDANCE[family])
    assert got.dtype == torch.float32 and got.shape == latents.shape
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_flux_non_square_images_need_their_size(models, pipes):
    model = models["flux"]
    latents = _noise(model.latent_shape(1, 64, 128))
    assert latents.shape == (1, 32, 64)
    got = _velocity(model, latents, 0.5, model.encode_prompts(PROMPTS[:1]), image_size=(64, 128))
    expected = _pipeline_velocity(pipes["flux"], "flux", PROMPTS[:1], latents, 0.5, GUIDANCE["flux"], 64, 128)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="image_size"):
        _velocity(model, latents, 0.5, model.encode_prompts(PROMPTS[:1]))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_sampling_and_decoding_reproduce_the_pipeline(models, pipes, family):
    model, pipe = models[family], pipes[family]
    latents = _noise(model.latent_shape(len(PROMPTS), SIZE, SIZE))
    final = _sample(model, latents, PROMPTS, STEPS[family])
    call = dict(prompt=PROMPTS, latents=latents, height=SIZE, width=SIZE, num_inference_steps=STEPS[family],
                guidance_scale=GUIDANCE[family])
    torch.testing.assert_close(final, pipe(**call, output_type="latent").images, atol=1e-5, rtol=1e-5)
    reference = torch.from_numpy((pipe(**call, output_type="np").images * 255).round()).to(torch.int32)
    images = model.decode(final, SIZE, SIZE)
    assert images.dtype == torch.uint8 and images.shape == (len(PROMPTS), SIZE, SIZE, 3)
    assert (images.to(torch.int32) - reference).abs().max() <= 1  # rounding at exact .5 boundaries
    assert images.float().std() > 5  # not a constant image


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_sampling_is_deterministic(models, family):
    model = models[family]
    latents = _noise(model.latent_shape(2, SIZE, SIZE))
    first = model.decode(_sample(model, latents, PROMPTS, 3), SIZE, SIZE)
    second = model.decode(_sample(model, latents, PROMPTS, 3), SIZE, SIZE)
    assert torch.equal(first, second)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_group_reuses_one_encoding(models, family):
    model = models[family]
    latents = _noise(model.latent_shape(3, SIZE, SIZE))
    once = model.encode_prompts(PROMPTS[:1])
    each = model.encode_prompts(PROMPTS[:1] * 3)
    expanded = _velocity(model, latents, 0.6, once.expand(3))
    torch.testing.assert_close(expanded, _velocity(model, latents, 0.6, each), atol=1e-5, rtol=1e-5)
    assert torch.equal(expanded, _velocity(model, latents, 0.6, once))  # a single row broadcasts
    both = model.encode_prompts(PROMPTS)
    picked = PromptEmbeds.cat([both, once]).index_select([2, 1, 2])
    torch.testing.assert_close(picked.prompt_embeds[[0, 2]], each.prompt_embeds[:2], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(picked.pooled[1], both.pooled[1])


def test_sd3_guidance_combines_the_unguided_velocities(models):
    model = models["sd3"]
    latents = _noise(model.latent_shape(2, SIZE, SIZE))
    embeds, negative = model.encode_prompts(PROMPTS), model.negative_embeds()
    cond = model.velocity(latents, 0.8, embeds, guidance_scale=1.0)
    uncond = model.velocity(latents, 0.8, negative, guidance_scale=1.0)
    guided = model.velocity(latents, 0.8, embeds, guidance_scale=4.5, negative=negative)
    assert (cond - uncond).abs().mean() > 1e-3
    torch.testing.assert_close(guided, uncond + 4.5 * (cond - uncond), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="negative"):
        model.velocity(latents, 0.8, embeds, guidance_scale=4.5)


def test_flux_guidance_is_an_embedding_not_cfg(models):
    model = models["flux"]
    latents, embeds = _noise(model.latent_shape(1, SIZE, SIZE)), model.encode_prompts(PROMPTS[:1])
    low = model.velocity(latents, 0.5, embeds, guidance_scale=1.0)
    high = model.velocity(latents, 0.5, embeds, guidance_scale=3.5)
    assert (low - high).abs().max() > 1e-4
    with pytest.raises(ValueError, match="no true classifier-free guidance"):
        model.velocity(latents, 0.5, embeds, guidance_scale=3.5, negative=model.negative_embeds())


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_gradients_reach_the_transformer_only(models, family):
    model = models[family]
    latents = _noise(model.latent_shape(2, SIZE, SIZE))
    embeds = model.encode_prompts(PROMPTS)
    model.transformer.zero_grad(set_to_none=True)
    with torch.enable_grad():
        _velocity(model, latents, torch.tensor([0.9, 0.3]), embeds).square().mean().backward()
    grads = [p.grad for p in model.transformer.parameters()]
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) > len(grads) // 2
    model.transformer.zero_grad(set_to_none=True)
    frozen = [m for name, m in model.modules.items() if name != "transformer" and isinstance(m, torch.nn.Module)]
    assert frozen and not any(p.requires_grad for m in frozen for p in m.parameters())


def test_shapes_and_sizes(models):
    flux, sd3 = models["flux"], models["sd3"]
    assert flux.latent_shape(2, 64, 64) == (2, 16, 64)
    assert sd3.latent_shape(2, 64, 128) == (2, 16, 8, 16)
    assert flux.image_seq_len(1024, 1024) == 4096
    with pytest.raises(ValueError, match="multiples of 16"):
        sd3.latent_shape(1, 72, 64)
    assert len(flux.encode_prompts(["x"])) == 1
    assert flux.encode_prompts(["x"]).prompt_embeds.shape[1] == 512
    assert sd3.encode_prompts(["x"]).prompt_embeds.shape[1] == 77 + 256
    assert (flux.family, sd3.family, flux.dtype, str(flux.device)) == ("flux", "sd3", torch.float32, "cpu")


def test_sequence_length_is_configurable(tiny_model_dirs):
    model = load_flow_model(str(tiny_model_dirs["sd3"]), "sd3", max_sequence_length=32)
    embeds = model.encode_prompts(PROMPTS)
    assert embeds.prompt_embeds.shape == (2, 77 + 32, 48) and embeds.pooled.shape == (2, 32)


def test_prompt_embeds_move_and_pickle_cheaply(models):
    one = models["flux"].encode_prompts(PROMPTS[:1])
    group = one.expand(24)
    assert len(group) == 24 and group.prompt_embeds.data_ptr() == one.prompt_embeds.data_ptr()
    assert len(pickle.dumps(group)) < 1.5 * len(pickle.dumps(one))
    back = pickle.loads(pickle.dumps(group))
    assert torch.equal(back.prompt_embeds, group.prompt_embeds) and torch.equal(back.pooled, group.pooled)
    assert one.to("cpu", torch.bfloat16).pooled.dtype == torch.bfloat16


def test_negative_embeddings_are_cached(models):
    model = models["sd3"]
    assert model.negative_embeds() is model.negative_embeds()
    torch.testing.assert_close(model.negative_embeds().pooled, model.encode_prompts([""]).pooled)


# --- loading ------------------------------------------------------------------------------------------------------


def test_learner_loads_only_the_transformer(tiny_model_dirs, models):
    model = load_flow_model(str(tiny_model_dirs["sd3"]), "sd3", parts=("transformer",))
    assert set(model.modules) == {"transformer"}
    full = models["sd3"]
    latents, embeds = _noise(full.latent_shape(1, SIZE, SIZE)), full.encode_prompts(PROMPTS[:1])
    alone = model.velocity(latents, 0.4, embeds, guidance_scale=1.0)
    torch.testing.assert_close(alone, full.velocity(latents, 0.4, embeds, guidance_scale=1.0))
    with pytest.raises(RuntimeError, match="'text' part"):
        model.encode_prompts(["a cat"])


def test_bfloat16_loads_and_returns_float32(tiny_model_dirs):
    model = load_flow_model(str(tiny_model_dirs["flux"]), "flux", dtype=torch.bfloat16, parts=("transformer",))
    assert model.transformer.dtype == torch.bfloat16
    embeds = PromptEmbeds(torch.randn(1, 8, 48), torch.randn(1, 32))
    out = model.velocity(_noise(model.latent_shape(1, SIZE, SIZE)), 0.5, embeds, guidance_scale=3.5)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_missing_component_is_named(tiny_model_dirs, tmp_path):
    broken = tmp_path / "flux"
    shutil.copytree(tiny_model_dirs["flux"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match="subfolder 'vae' missing"):
        load_flow_model(str(broken), "flux")
    assert set(load_flow_model(str(broken), "flux", parts=("transformer", "text")).modules) >= {"transformer"}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / "tokenizer_2" / name).unlink()
    with pytest.raises(ModelLoadError, match="'tokenizer_2' has no tokenizer file"):
        load_flow_model(str(broken), "flux", parts=("text",))


def test_invalid_family_and_parts_are_rejected(tiny_model_dirs):
    with pytest.raises(ValueError, match="flux, sd3"):
        load_flow_model(str(tiny_model_dirs["flux"]), "sdxl")
    with pytest.raises(ValueError, match="parts"):
        load_flow_model(str(tiny_model_dirs["flux"]), "flux", parts=("unet",))


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache (the hub reads both settings at import, so patch the module too)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return tmp_path / "hub-cache"


def test_uncached_hub_id_with_the_hub_offline_raises_a_clear_error(offline_hub):
    with pytest.raises(ModelLoadError) as err:
        load_flow_model("black-forest-labs/FLUX.1-dev", "flux")
    message = str(err.value)
    assert "'black-forest-labs/FLUX.1-dev'" in message
    assert "neither a local folder nor in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1 is set" in message and "model.path" in message


def test_unreachable_hub_raises_a_clear_error(offline_hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ModelLoadError, match="could not download 'stabilityai/stable-diffusion-3.5-medium'"):
        load_flow_model("stabilityai/stable-diffusion-3.5-medium", "sd3")


def test_cached_hub_id_loads_from_the_cache(offline_hub, tiny_model_dirs):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--tiny-org--tiny-sd3"
    shutil.copytree(tiny_model_dirs["sd3"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = load_flow_model("tiny-org/tiny-sd3", "sd3", parts=("transformer",))
    assert model.transformer.config.in_channels == 16


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_conditioning_built_once_gives_the_velocity_of_plain_embeddings(models, family):
    """The sampler's per-group conditioning (guidance rows joined once) and the learner's plain embeddings give the same
    velocity bit for bit; a conditioning built for another batch size is refused."""
    model = models[family]
    embeds, latents = model.encode_prompts(PROMPTS[:1]), _noise(model.latent_shape(3, SIZE, SIZE))
    negative = model.negative_embeds() if model.true_cfg else None
    guidance = GUIDANCE[family]
    cond = model.conditioning(embeds, negative, 3, guidance)
    assert cond.guided == (family == "sd3") and len(cond.embeds) == (6 if cond.guided else 3)
    if cond.guided:  # [negative, positive]: the rows StableDiffusion3Pipeline stacks
        assert torch.equal(cond.embeds.prompt_embeds[0], negative.prompt_embeds[0])
        assert torch.equal(cond.embeds.prompt_embeds[3], embeds.prompt_embeds[0])
    with torch.no_grad():
        plain = model.velocity(latents, 0.6, embeds, guidance_scale=guidance, negative=negative)
        built = model.velocity(latents, torch.tensor(0.6), cond, guidance_scale=guidance)
    assert torch.equal(plain, built)
    with pytest.raises(ValueError, match="conditioning for a batch of 3 latents used with 2"):
        model.velocity(latents[:2], 0.6, cond, guidance_scale=guidance)
