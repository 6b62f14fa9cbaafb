"""Weight transport: exact packing into one flat buffer, the LoRA / full policy state, and the WeightStore actor."""

from __future__ import annotations

import pytest
import torch

from cluster.config import LoraConfig
from rollout.models.loading import load_flow_model
from rollout.policy import add_lora, apply_policy_state, policy_state
from rollout.weights import (
    pack_state,
    fetch_state,
    publish_weights,
    unpack_state,
    weight_store,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = LoraConfig(rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def _transformer(path: str, lora: LoraConfig | None = LORA) -> torch.nn.Module:
    model = load_flow_model(str(path), "flux", parts=("transformer",))
    if lora is not None:
        add_lora(model.transformer, lora)
    return model.transformer


def _randomised(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in state.items()}


def _forward(transformer: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    cfg = transformer.config
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
            timestep=torch.tensor([0.5]),
            guidance=torch.tensor([3.5]) if cfg.guidance_embeds else None,
            pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
            encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
            txt_ids=torch.zeros(8, 3),
            img_ids=torch.zeros(16, 3),
            return_dict=False,
        )[0]


def test_pack_and_unpack_are_exact_for_every_dtype():
    g = torch.Generator().manual_seed(0)
    state = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 3, generator=g).to(torch.float16),
        "f64": torch.randn(1, generator=g).double(),
        "i64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6, generator=g).t(),  # not contiguous
    }
    buffer, meta = pack_state(state)
    assert buffer.dtype == torch.uint8 and buffer.ndim == 1
    assert [m[0] for m in meta] == list(state)
    assert all(offset % 16 == 0 for _, _, _, offset, _ in meta)
    out = unpack_state(buffer, meta)
    for name, tensor in state.items():
        assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape
        assert torch.equal(out[name].view(-1).view(torch.uint8), tensor.contiguous().view(-1).view(torch.uint8)), name
    buffer.fill_(0)  # unpacked tensors own their memory
    assert torch.equal(out["f32"], state["f32"])


def test_unpack_reports_a_bad_buffer():
    buffer, meta = pack_state({"w": torch.ones(8)})
    with pytest.raises(ValueError, match="past the buffer"):
        unpack_state(buffer[:16], meta)
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_state(buffer.float(), meta)


def test_lora_state_moves_exactly_between_transformers(tiny_model_dirs):
    source, target = _transformer(tiny_model_dirs["flux"]), _transformer(tiny_model_dirs["flux"])
    base = _forward(target)
    state = _randomised(policy_state(source, "lora"), seed=1)
    assert "transformer_blocks.0.attn.to_q.lora_A.weight" in state  # peft names, without the adapter name
    apply_policy_state(source, state, "lora")
    buffer, meta = pack_state(policy_state(source, "lora"))
    apply_policy_state(target, unpack_state(buffer, meta), "lora")
    for name, tensor in policy_state(target, "lora").items():
        assert torch.equal(tensor, state[name]), name
    assert torch.equal(_forward(target), _forward(source))
    assert not torch.allclose(_forward(target), base)


def test_a_fresh_lora_adapter_leaves_the_model_unchanged(tiny_model_dirs):
    plain = _transformer(tiny_model_dirs["flux"], lora=None)
    adapted = _transformer(tiny_model_dirs["flux"])
    assert torch.equal(_forward(plain), _forward(adapted))


def test_lora_targets_that_match_nothing_are_named(tiny_model_dirs):
    transformer = _transformer(tiny_model_dirs["flux"], lora=None)
    bad = LoraConfig(rank=2, alpha=2, target_modules=["to_q", "qkv_proj"])
    with pytest.raises(ValueError, match=r"\['qkv_proj'\]"):
        add_lora(transformer, bad)


def test_a_state_for_another_adapter_is_refused(tiny_model_dirs):
    transformer = _transformer(tiny_model_dirs["flux"])
    other = _transformer(tiny_model_dirs["flux"], lora=LoraConfig(rank=4, alpha=8, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="does not fit"):
        apply_policy_state(transformer, policy_state(other, "lora"), "lora")


def test_full_state_moves_exactly(tiny_model_dirs):
    source = _transformer(tiny_model_dirs["flux"], lora=None)
    target = _transformer(tiny_model_dirs["flux"], lora=None)
    state = _randomised(policy_state(source, "full"), seed=2)
    buffer, meta = pack_state(state)
    apply_policy_state(target, unpack_state(buffer, meta), "full")
    apply_policy_state(source, state, "full")
    assert torch.equal(_forward(target), _forward(source))


@pytest.mark.slow
def test_store_keeps_only_newer_versions(ray_local):
    ray = ray_local
    store = weight_store("test-weights-store")
    assert ray.get(store.latest.remote()) is None
    state = {"w": torch.arange(6, dtype=torch.bfloat16)}
    assert publish_weights(store, 2, [state])
    assert not publish_weights(store, 1, [{"w": torch.zeros(6, dtype=torch.bfloat16)}])
    assert not publish_weights(store, 2, [{"w": torch.zeros(6, dtype=torch.bfloat16)}])
    version, refs, metas = ray.get(store.latest.remote())
    assert version == 2 and len(refs) == 1 and isinstance(refs[0], ray.ObjectRef)
    assert torch.equal(fetch_state((refs, metas))["w"], state["w"])
    assert ray.get(store.latest.remote(2)) is None  # nothing newer than 2
    assert weight_store("test-weights-store")._actor_id == store._actor_id  # one store per run name
    ray.kill(store)


@pytest.mark.slow
def test_buckets_cut_a_state_in_order_and_arrive_whole(ray_local):
    from rollout.weights import put_buckets, split_buckets

    state = {f"t{i}": torch.full((n,), float(i)) for i, n in enumerate([10, 300, 20, 20, 5])}  # float32: 4 bytes each
    buckets = [dict(b) for b in split_buckets(state.items(), 25 * 4)]
    assert [list(b) for b in buckets] == [["t0"], ["t1"], ["t2"], ["t3", "t4"]]  # t1 alone: larger than a bucket
    packed = put_buckets(buckets)
    assert len(packed[0]) == len(packed[1]) == 4
    back = fetch_state(packed)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
