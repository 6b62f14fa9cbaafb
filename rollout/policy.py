"""The policy state of a transformer: its peft LoRA adapter or all its weights (what a policy version consists of),
and the adapter itself. No Ray here: `rollout/weights.py` moves these states between processes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from cluster.config import LoraConfig


def add_lora(transformer: torch.nn.Module, lora: LoraConfig) -> None:
    """Add the job's LoRA adapter (B = 0, so the output is unchanged until weights arrive) to the transformer."""
    from peft import LoraConfig as PeftLoraConfig

    names = [name for name, _ in transformer.named_modules()]
    missing = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(
            f"learner.lora.target_modules {missing} match no module of the {type(transformer).__name__}; "
            f"target module names end in e.g. to_q, to_k, to_v, to_out.0 (attention projections)"
        )
    transformer.add_adapter(PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        init_lora_weights=True,
    ))


def policy_state(transformer: torch.nn.Module, finetune: str) -> dict[str, torch.Tensor]:
    """What a policy version consists of: the LoRA adapter's tensors (peft names, no adapter name) or the full state."""
    if finetune == "lora":
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(transformer)
    if finetune == "full":
        return transformer.state_dict()
    raise ValueError(f"unknown finetune {finetune!r}; expected 'lora' or 'full'")


@torch.no_grad()
def apply_policy_state(transformer: torch.nn.Module, state: Mapping[str, torch.Tensor], finetune: str) -> None:
    """Load a state from `policy_state` (of a transformer with the same adapter) into this transformer, exactly."""
    expected = policy_state(transformer, finetune)
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(
            f"the published {finetune} state does not fit this transformer: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}); same model and lora config?"
        )
    if finetune == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(transformer, dict(state))
    else:
        transformer.load_state_dict(dict(state), strict=True)


@contextmanager
def adapter_disabled(transformer: torch.nn.Module) -> Iterator[None]:
    """The base model: the peft adapter switched off inside the block (the reference policy), on again after it."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()
