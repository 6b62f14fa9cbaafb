"""Regional compilation (`model.compile`, rollout/models/compile.py) on the tiny FLUX model in float32 on CPU: the
compiled blocks give the eager velocity (with a LoRA that matters), the learner recomputes a compiled rollout's
log-probs (ρ = 1), and gradients flow through compiled blocks under gradient checkpointing.

One transformer is compiled once for the module (no_grad graphs for the sampler, grad graphs for the learner, batch 2
throughout): a cold inductor cache takes about a minute on 2 cores, a warm one seconds.
"""

from __future__ import annotations

import pytest
import torch

from cluster.config import LoraConfig
from learner.objectives.grpo import micro_batch, score_recorded_step
from rollout.models.compile import compile_blocks, decompile_blocks, repeated_block_names
from rollout.models.loading import adapter
from rollout.models.tiny import build_tiny_pipeline
from rollout.policy import add_lora
from rollout.prompts.groups import PromptGroup
from rollout.sampling.forward import guided_velocity
from rollout.sampling.loop import RolloutSampler
from rollout.sampling.trajectory import SamplerSettings

# cluster/tiny.yaml's learner.lora
LORA = LoraConfig(rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
                                                   "proj_mlp", "proj_out", "x_embedder", "norm_out.linear"])
SETTINGS = SamplerSettings(kind="cps", noise_level=0.7, log_prob_form="squared", guidance_scale=3.5, height=64,
                           width=64, num_steps=3, samples_per_forward=2, trained_steps=2)
BATCH = SETTINGS.samples_per_forward  # every forward of the module has this batch: one shape (grad mode adds graphs)
# fp32 tolerances. Inductor fuses the elementwise chains and the norms/softmax reductions into its own kernels, so
# the compiled block rounds differently from eager at the ulp level (~1e-7 relative per op); through the two blocks
# the velocity moves by ~1e-7 of its scale (measured 2.4e-7 on |v| ≤ 2.6). 1e-5 of the scale leaves two orders of
# margin and is still far below what a wrong graph changes (the adapter alone moves it by > 1e-2). The gradients sum
# over batch and tokens, which accumulates more rounding (measured 2e-6 relative): 1e-4 of each tensor's largest entry.
VELOCITY_RTOL = 1e-5
GRAD_RTOL = 1e-4


def _family_blocks(transformer: torch.nn.Module, family: str) -> list[torch.nn.Module]:
    """The repeated blocks counted from the family's module lists (independently of `_repeated_blocks`)."""
    lists = {"flux": ("transformer_blocks", "single_transformer_blocks"),
             "flux2": ("transformer_blocks", "single_transformer_blocks"),
             "sd3": ("transformer_blocks",), "qwen_image": ("transformer_blocks",),
             "z_image": ("noise_refiner", "context_refiner", "siglip_refiner", "layers")}[family]
    return [block for name in lists for block in (getattr(transformer, name, None) or ())]


class CountingCheckpoint:
    """diffusers' default gradient checkpointing function (non-reentrant `checkpoint(block.__call__, ...)`), counted."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, block: torch.nn.Module, *args):
        self.calls += 1
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)


@pytest.fixture(scope="module")
def flux(one_thread):
    """The tiny FLUX model in fp32 with the job's LoRA (B random: the adapter changes the output) and gradient
    checkpointing, its eager velocity, LoRA gradients and adapter-free velocity on a fixed input; then compiled."""
    pipe = build_tiny_pipeline("flux", seed=0)
    model = adapter("flux")(dict(pipe.components), dtype=torch.float32, device="cpu")
    transformer = model.transformer
    transformer.requires_grad_(False)
    torch.manual_seed(0)
    add_lora(transformer, LORA)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    transformer.eval()
    checkpoint = CountingCheckpoint()
    transformer.enable_gradient_checkpointing(checkpoint)

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(model.latent_shape(BATCH, SETTINGS.height, SETTINGS.width), generator=generator)
    sigma = model.sigmas(SETTINGS.num_steps, SETTINGS.height, SETTINGS.width)[1]
    conditioning = model.conditioning(model.encode_prompts(["a photo of a cat"]), None, BATCH,
                                      SETTINGS.guidance_scale)
    weight = torch.randn(x.shape, generator=generator)

    def velocity() -> torch.Tensor:
        return guided_velocity(model, x, sigma, conditioning, None, SETTINGS)

    def lora_grads() -> tuple[dict[str, torch.Tensor], int]:
        """The LoRA parameters' gradients of a fixed projection of the velocity, and the checkpointed block calls."""
        transformer.zero_grad(set_to_none=True)
        before = checkpoint.calls
        (velocity() * weight).sum().backward()
        return ({n: p.grad.clone() for n, p in transformer.named_parameters() if p.requires_grad},
                checkpoint.calls - before)

    with torch.no_grad():
        eager = velocity()
        transformer.disable_adapters()
        without_adapter = velocity()
        transformer.enable_adapters()
    eager_grads, _ = lora_grads()
    compiled = compile_blocks(transformer)
    return dict(model=model, velocity=velocity, lora_grads=lora_grads, eager=eager, without_adapter=without_adapter,
                eager_grads=eager_grads, compiled=compiled)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> float:
    """|actual − expected| max over the scale of `expected` (its largest entry); asserted ≤ rtol."""
    deviation = float((actual - expected).abs().max() / expected.abs().max())
    assert deviation <= rtol, deviation
    return deviation


@pytest.mark.slow
def test_compiled_blocks_are_counted_and_give_the_eager_velocity_with_lora(flux):
    transformer = flux["model"].transformer
    blocks = _family_blocks(transformer, "flux")
    assert flux["compiled"] == len(blocks) == len(transformer.transformer_blocks) + \
        len(transformer.single_transformer_blocks)
    assert all(block._compiled_call_impl is not None for block in blocks)
    eager = flux["eager"]
    with torch.no_grad():
        compiled = flux["velocity"]()
    _close(compiled, eager, VELOCITY_RTOL)
    # the adapter matters: without it the velocity moves far beyond the tolerance
    assert float((flux["without_adapter"] - eager).abs().max() / eager.abs().max()) > 1000 * VELOCITY_RTOL


@pytest.mark.slow
def test_the_learner_recomputes_a_compiled_rollout_with_ratio_one(flux):
    """The compiled sampler records the steps (no_grad), the learner's micro-batch of the same chunk recomputes them
    with gradients on and checkpointing, through the same compiled blocks: ρ = exp(new − old) = 1 within 1e-6."""
    model = flux["model"]
    sampler = RolloutSampler(model, SETTINGS, run_seed=0)
    record = sampler.sample_group(PromptGroup(group_id=0, prompt="a photo of a cat", metadata={},
                                              seeds=tuple(range(BATCH))))
    assert record.log_probs.shape == (BATCH, SETTINGS.trained_steps)
    mb = micro_batch([record], [(0, i) for i in range(BATCH)], torch.zeros(BATCH))
    new = torch.stack([score_recorded_step(model, mb, k, sampler.negative).log_prob
                       for k in range(mb.num_steps)], dim=1)
    assert new.requires_grad  # the training path, not an inference one
    ratio = torch.exp(new.detach().double() - record.log_probs.double())
    assert float((ratio - 1).abs().max()) <= 1e-6


@pytest.mark.slow
def test_gradients_flow_through_compiled_blocks_under_checkpointing(flux):
    grads, checkpointed = flux["lora_grads"]()
    assert checkpointed == flux["compiled"]  # every block ran through diffusers' checkpointing function
    eager = flux["eager_grads"]
    assert grads.keys() == eager.keys() and any("transformer_blocks.0" in n for n in grads)
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        _close(grad, eager[name], GRAD_RTOL)


@pytest.mark.parametrize("family", ["sd3", "flux2", "qwen_image", "z_image"])
def test_every_family_compiles_its_repeated_blocks_and_decompiles(family, monkeypatch):
    """Which modules are compiled (torch.compile is lazy: nothing is traced without a forward): the blocks of the
    family's module lists, SD3's from the fallback (its class declares no `_repeated_blocks`); `decompile_blocks`
    makes them eager again."""
    transformer = build_tiny_pipeline(family, seed=0).transformer
    calls = []
    original = torch.nn.Module.compile

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", spy)
    blocks = _family_blocks(transformer, family)

    def compiled() -> list[torch.nn.Module]:
        return [m for m in transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]

    assert compile_blocks(transformer, mode="max-autotune") == len(blocks) > 0
    assert compiled() == [m for m in transformer.modules() if any(m is b for b in blocks)]
    assert len(calls) == len(blocks) and all(k["dynamic"] is False and k["recompile_limit"] >= 32 for k in calls)
    # the mode's inductor options (max_autotune), and eager's rounding in bf16 (the rollout/learner ratio)
    assert all(k["options"]["max_autotune"] and k["options"]["emulate_precision_casts"] for k in calls)
    assert decompile_blocks(transformer) == len(blocks) and not compiled()


def test_a_module_without_repeated_blocks_or_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match=r"torch\.nn\.modules\.linear\.Linear declares no repeated transformer"):
        compile_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        compile_blocks(build_tiny_pipeline("flux", seed=0).transformer, mode="fast")
    assert repeated_block_names(type("SD3Transformer2DModel", (torch.nn.Module,), {})()) == \
        ("JointTransformerBlock",)
