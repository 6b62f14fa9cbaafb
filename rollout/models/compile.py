"""Regional compilation: `torch.compile` applied to each repeated transformer block in place (`model.compile`).

Compiling the blocks instead of the whole transformer keeps the compile time to one graph per distinct block (every
block of a class reuses it), leaves the embedders, the rotary tables and diffusers' Python control flow (gradient
checkpointing, the adapter's scale) eager, and composes with peft LoRA and gradient checkpointing:

- peft replaces the Linear layers inside a block by its LoRA wrappers; compile after `add_lora` so the traced graph
  holds the adapter (the order the rollout worker and the learner rank use);
- with gradient checkpointing diffusers calls `self._gradient_checkpointing_func(block.__call__, ...)`: `__call__`
  runs the compiled block, both in the forward and in the recomputation of the backward;
- toggling the adapter (`adapter_disabled`, the KL reference), grad mode or train/eval mode adds one graph per state
  (dynamo guards on them); `dynamic=False`: a new batch size or sequence length compiles again (the rollout chunk and
  the learner micro-batch each compile once per shape).

The rollout samples under no_grad and the learner recomputes with gradients: dynamo compiles two different graphs,
and inductor fuses them differently (the training graph also outputs what the backward saves). In bf16 a fused kernel
keeps its intermediates in fp32 and rounds only at its outputs, so different fusions round at different places and the
recorded log-probs are not reproduced (|ρ − 1| ~1e-5 on the tiny models, where eager gives 0). Inductor's
`emulate_precision_casts` rounds every intermediate to the working dtype as eager does: the two graphs then agree bit
for bit (on the tiny models with eager too; bench/gpu_check.py's compile lever measures it in bf16 at real size), at
the cost of a few conversions inside the kernels. In fp32 there is nothing to round (tests/test_compile.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch._inductor

# Families whose diffusers class declares no `_repeated_blocks` (SD3Transformer2DModel's list is empty in 0.42).
_FALLBACK_BLOCKS = {"SD3Transformer2DModel": ("JointTransformerBlock",)}

# Enough cached graphs per block class for its states (grad on/off × adapter on/off × train/eval × two shapes ...):
# dynamo's default of 8 would fall back to eager without an error.
RECOMPILE_LIMIT = 64
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def repeated_block_names(transformer: torch.nn.Module) -> tuple[str, ...]:
    """Class names of the transformer's repeated blocks: diffusers' `_repeated_blocks` of the class, else the known
    ones; an error naming the class for a module that declares none."""
    cls = type(transformer)
    names = tuple(getattr(cls, "_repeated_blocks", None) or ())
    if not names:
        for klass in cls.__mro__:
            if klass.__name__ in _FALLBACK_BLOCKS:
                names = _FALLBACK_BLOCKS[klass.__name__]
                break
    if not names:
        raise ValueError(
            f"compile_blocks: {cls.__module__}.{cls.__name__} declares no repeated transformer blocks "
            f"(no `_repeated_blocks` on the class and none known for it); expected a diffusers transformer of "
            f"FLUX.1, SD3, FLUX.2, Qwen-Image or Z-Image"
        )
    return names


def compile_options(mode: str | None = None) -> dict[str, Any]:
    """Inductor's options of torch.compile's `mode`, with eager's rounding in low precision (`emulate_precision_casts`,
    module docstring); torch.compile takes a mode or options, not both."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"compile_blocks: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    options = dict(torch._inductor.list_mode_options(mode, False)) if mode not in (None, "default") else {}
    return {**options, "emulate_precision_casts": True}


def compile_blocks(transformer: torch.nn.Module, *, mode: str | None = None) -> int:
    """`torch.compile` each repeated block of `transformer` in place (`block.compile(dynamic=False, options=...)`,
    the options of `mode` with eager's rounding); returns how many blocks were compiled.

    Blocks are found by class name (see `repeated_block_names`): FLUX.1 and FLUX.2 `transformer_blocks` and
    `single_transformer_blocks`, SD3 and Qwen-Image `transformer_blocks`, Z-Image `layers` and its noise / context
    refiners. Call it after the LoRA is added (and gradient checkpointing set). Shapes are static: a new batch size or
    sequence length recompiles the blocks (once per shape). `mode`: torch.compile's mode, e.g. "reduce-overhead"
    (CUDA graphs) or "max-autotune". Blocks compiled again with the same mode reuse dynamo's cached graphs.
    """
    names = set(repeated_block_names(transformer))
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"compile_blocks: the {type(transformer).__name__} holds no module of the classes "
                         f"{sorted(names)} its class declares as repeated blocks")
    options = compile_options(mode)
    for block in blocks:
        block.compile(dynamic=False, options=dict(options), recompile_limit=RECOMPILE_LIMIT)
    return len(blocks)


def decompile_blocks(transformer: torch.nn.Module) -> int:
    """Undo `compile_blocks`: every compiled block runs eagerly again (the bench's on/off); returns how many were
    compiled. Dynamo's cached graphs stay until `torch._dynamo.reset()`."""
    blocks = [m for m in transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    for block in blocks:
        block._compiled_call_impl = None
    return len(blocks)
