"""The shapes base-model builder (quick settings) and its bench scoring: a loadable SD3 folder, cached, deterministic
from the seed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rollout.models.loading import load_flow_model
from rollout.sampling.loop import RolloutSampler
from rollout.sampling.trajectory import SamplerSettings
from rollout.shapes import base_model
from rollout.shapes.base_model import MARKER, T5_LENGTH, quick_settings
from rollout.shapes.data import shapes_prompts
from tests.bench_helpers import load_bench

build_shapes_base = load_bench("shapes_base").shapes_base

TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("shapes-base")
    marker = build_shapes_base(root / "base", quick_settings(0))
    return root / "base", marker


def test_the_folder_loads_through_the_sd3_adapter_and_samples_64px_images(built):
    path, marker = built
    assert json.loads((path / MARKER).read_text()) == marker
    assert marker["job_config"] == {"model.family": "sd3", "model.resolution": 64, "model.max_sequence_length": 8}
    model = load_flow_model(str(path), "sd3", max_sequence_length=T5_LENGTH)
    embeds = model.encode_prompts(["a photo of two red squares"])
    assert embeds.prompt_embeds.shape == (1, 8 + T5_LENGTH, 64) and embeds.pooled.shape == (1, 32)
    assert model.latent_shape(1, 64, 64) == (1, 4, 16, 16)
    settings = SamplerSettings(kind="ode", noise_level=0.0, log_prob_form="gaussian", guidance_scale=4.5, height=64,
                               width=64, num_steps=4, samples_per_forward=2, trained_steps=1)
    images = RolloutSampler(model, settings, run_seed=0).sample_eval(
        ["a photo of one blue square", "three red squares"], [1, 2], num_steps=4, batch_size=2)
    assert images.shape == (2, 64, 64, 3) and images.dtype == torch.uint8
    for key in ("train_exact", "heldout_exact", "vae_exact", "total_s"):
        assert key in marker


def test_config_matches_the_project_sd3_conventions(built):
    path, _ = built
    vae = json.loads((path / "vae" / "config.json").read_text())
    assert (vae["scaling_factor"], vae["shift_factor"], vae["latent_channels"]) == (1.0, 0.0, 4)
    scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == 3.0 and not scheduler["use_dynamic_shifting"]
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"


def test_every_caption_word_is_one_token_in_the_saved_tokenizers(built):
    path, _ = built
    model = load_flow_model(str(path), "sd3", parts=("text",))
    for item in shapes_prompts("all"):
        words = len(item.prompt.split())
        assert len(model.modules["tokenizer"](item.prompt).input_ids) == words + 2
        ids = model.modules["tokenizer_3"](item.prompt).input_ids
        assert len(ids) == words + 1 and model.modules["tokenizer_3"].unk_token_id not in ids


def test_a_second_call_with_the_same_settings_is_a_cache_hit(built, monkeypatch):
    path, marker = built
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*")}

    def no_training(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(base_model, "train_vae", no_training)
    assert build_shapes_base(path, quick_settings(0)) == marker
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["base"]  # no temp folders left behind
    with pytest.raises(FileExistsError, match="overwrite"):
        build_shapes_base(path, quick_settings(1))


def test_the_same_seed_gives_identical_weights(built, tmp_path, one_thread):
    path, _ = built
    again = build_shapes_base(tmp_path / "again", quick_settings(0))
    assert again["settings"] == json.loads((path / MARKER).read_text())["settings"]
    for part in (TRANSFORMER, "vae/diffusion_pytorch_model.safetensors"):
        first, second = load_file(path / part), load_file(tmp_path / "again" / part)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), part


def test_folding_the_latent_normalisation_keeps_decoding_and_whitens_the_latents():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = base_model.new_vae().eval()
        pixels = torch.rand(6, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        raw = base_model.latent_means(vae, pixels) * 3 + 1  # an uneven spread and offset
        reference = vae.decode(raw).sample
        vae.quant_conv.weight *= 3
        vae.quant_conv.bias[:4] = vae.quant_conv.bias[:4] * 3 + 1
        normalised = base_model.fold_latent_normalisation(vae, raw)
        torch.testing.assert_close(normalised.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(normalised.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(vae.decode(normalised).sample, reference, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(base_model.latent_means(vae, pixels), normalised, atol=1e-4, rtol=1e-4)


def test_the_build_validates_and_records_what_it_reached(built):
    _, marker = built
    assert [iteration for iteration, _ in marker["validations"]] == [3]  # quick: after its 3 iterations, no target
    assert 0.0 <= marker["validations"][0][1] <= 1.0


def test_training_goes_on_until_the_validation_reaches_the_target(tmp_path, one_thread):
    import dataclasses

    scripted = iter([0.1, 0.2, 0.5, 0.9])  # what the validations report, in order

    def validate(path, s):
        assert (path / "transformer" / "config.json").is_file()  # it validates a saved, loadable folder
        return next(scripted)

    settings = dataclasses.replace(quick_settings(0), target_train_exact=0.45, check_every=2, max_iterations=20)
    marker = base_model.build_shapes_base(tmp_path / "base", settings, evaluate=load_bench("shapes_base").evaluate,
                                          validate=validate)
    assert marker["validations"] == [[3, 0.1], [5, 0.2], [7, 0.5]]


def test_a_model_below_the_target_is_refused_and_nothing_is_saved(tmp_path, one_thread):
    import dataclasses

    settings = dataclasses.replace(quick_settings(0), target_train_exact=1.01, check_every=2, max_iterations=5)
    with pytest.raises(base_model.BaseModelTooWeak, match=r"after 5 iterations .*below the target 1.01"):
        build_shapes_base(tmp_path / "base", settings)
    assert list(tmp_path.iterdir()) == []  # no model folder, no temporary one
