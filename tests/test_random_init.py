"""`model.init: random` (rollout/models/random_init.py through rollout/models/loading.py): the same weights in every
process that builds a component, random prompt embeddings of the encoders' shapes where their configs are absent,
and the random-weight PickScore of the GPU job."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.config import ConfigError
from cluster.config_loading import load_config
from rollout.models.loading import ModelLoadError, load_flow_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tiny_model_dirs, tmp_path_factory):
    """family -> (tiny model folder, the same with only the transformer's and the VAE's config.json)."""
    out = {}
    for family in ("flux", "qwen_image"):
        full = tiny_model_dirs[family]
        configs = tmp_path_factory.mktemp(family) / "configs"
        for sub in ("transformer", "vae"):
            (configs / sub).mkdir(parents=True)
            shutil.copy(full / sub / "config.json", configs / sub / "config.json")
        out[family] = (full, configs)
    return out


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_every_process_builds_the_same_weights_and_not_the_stored_ones(folders):
    full, _ = folders["flux"]
    rollout = load_flow_model(str(full), "flux", random_seed=3)  # every part, as a rollout worker loads
    learner = load_flow_model(str(full), "flux", random_seed=3, parts=("transformer",))  # as a learner rank
    a, b = state(rollout.transformer), state(learner.transformer)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = state(load_flow_model(str(full), "flux", random_seed=4, parts=("transformer",)).transformer)
    stored = state(load_flow_model(str(full), "flux", parts=("transformer",)).transformer)
    weights = [k for k in a if k.endswith(".weight") and a[k].ndim == 2]  # layers drawn at random (norms: 1)
    assert all(not torch.equal(a[k], other[k]) for k in weights)
    assert all(not torch.equal(a[k], stored[k]) for k in weights)
    # the text encoders are built too (their configs are in the folder): real modules, not random embeddings
    assert type(rollout).__name__ == "FluxModel" and "text_encoder_2" in rollout.modules


def test_weights_are_drawn_in_the_model_dtype(folders):
    full, _ = folders["flux"]
    model = load_flow_model(str(full), "flux", random_seed=0, dtype=torch.bfloat16, parts=("transformer", "vae"))
    dtypes = {p.dtype for m in (model.transformer, model.vae) for p in m.parameters()}
    assert dtypes == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.vae.parameters())


def test_configs_alone_give_random_prompt_embeddings_of_the_encoders_shapes(folders):
    _, configs = folders["flux"]
    with pytest.raises(ModelLoadError, match="text_encoder"):
        load_flow_model(str(configs), "flux")  # pretrained weights need every part
    model = load_flow_model(str(configs), "flux", random_seed=0, max_sequence_length=24)
    config = model.transformer.config
    e = model.encode_prompts(["a cat", "a dog", "a cat"])
    assert e.prompt_embeds.shape == (3, 24, config.joint_attention_dim)  # padded to max_sequence_length
    assert e.pooled.shape == (3, config.pooled_projection_dim) and e.mask is None
    assert torch.equal(e.prompt_embeds[0], e.prompt_embeds[2]) and not torch.equal(e.prompt_embeds[0],
                                                                                  e.prompt_embeds[1])
    again = load_flow_model(str(configs), "flux", random_seed=0, max_sequence_length=24).encode_prompts(["a dog"])
    assert torch.equal(again.prompt_embeds[0], e.prompt_embeds[1])
    assert "text" in model.parts
    x = torch.randn(model.latent_shape(2, 32, 32))
    v = model.velocity(x, 0.5, e.index_select([0, 1]), guidance_scale=3.5, image_size=(32, 32))
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_unpadded_families_keep_a_short_negative_prompt(folders):
    _, configs = folders["qwen_image"]
    model = load_flow_model(str(configs), "qwen_image", random_seed=0, max_sequence_length=512)
    width = model.transformer.config.joint_attention_dim
    e = model.encode_prompts(["a cat", ""])
    # 64 tokens for a prompt, 64 // 8 for the empty negative one, padded and masked when batched
    assert e.prompt_embeds.shape == (2, 64, width) and e.pooled.shape == (2, 0)
    assert e.mask[0].all() and e.mask[1].sum() == 8 and not e.mask[1, 8:].any()


def test_config_names_the_allowed_inits():
    overrides = ["model.init=random", "model.init_seed=5"]
    cfg = load_config(ROOT / "cluster" / "tiny.yaml", overrides)
    assert (cfg.model.init, cfg.model.init_seed) == ("random", 5)
    with pytest.raises(ConfigError, match="model.init.*'pretrained'.*'random'"):
        load_config(ROOT / "cluster" / "tiny.yaml", ["model.init=zeros"])


def test_pickscore_with_random_weights_from_a_config_folder(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from real_configs import TINY_CLIP, write_clip_folder

    import rewards

    folder = write_clip_folder(TINY_CLIP, tmp_path / "clip")
    assert not list(folder.glob("*.safetensors"))
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    first = rewards.build("pickscore", path=str(folder), processor_path=None, init="random")
    second = rewards.build("pickscore", path=str(folder), processor_path=None, init="random")
    a = first.score(images, ["a cat", "a dog"], [{}, {}]).scores
    assert np.array_equal(a, second.score(images, ["a cat", "a dog"], [{}, {}]).scores)
    # CLIP's initial logit scale, exp(2.6592) (CLIPConfig.logit_scale_init_value), scaled by 1/26
    assert first.logit_scale == pytest.approx(math.exp(2.6592), rel=1e-6)
    assert np.all(np.abs(a) <= math.exp(2.6592) / 26 + 1e-6)
    with pytest.raises(ValueError, match="init must be 'pretrained' or 'random'"):
        rewards.build("pickscore", path=str(folder), processor_path=None, init="zeros")
