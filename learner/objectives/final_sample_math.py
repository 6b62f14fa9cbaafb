"""Forward-process objectives on clean samples: DiffusionNFT and AWM (docs/math.md "Forward-process objectives");
no Ray, no DeepSpeed, no model.

Both train on a rollout's final clean latents `x0` with the flow-matching forward process `x_t = (1 − t)·x0 + t·ε`
and its target `v = ε − x0`. At the rollout policy both are advantage-weighted flow matching with different
self-normalising weights. Shapes: a batch of B samples, tensors (B, ...), per-sample quantities (B,).
"""

from __future__ import annotations

import torch

NFT_WEIGHT_FLOOR = 1e-5  # the adaptive weight's lower bound
AWM_POWER = 0.25  # p of AWM's log-likelihood surrogate
AWM_EPS = 1e-10


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _per_sample(values: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) quantity shaped to broadcast against (B, ...) `like`."""
    v = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim == 1 else v


def forward_process(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, v): the noised sample (1 − t)·x0 + t·ε and the velocity target ε − x0; `t` scalar or (B,)."""
    tt = _per_sample(t, x0)
    return (1.0 - tt) * x0 + tt * noise, noise - x0


def reference_distance(v_theta: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """mean (v_θ − v_ref)²: the velocity distance to the reference policy (the adapter switched off), `v_ref` without
    gradient; nft and awm add it weighted by `learner.ref_beta`."""
    return ((v_theta - v_ref.detach()) ** 2).mean()


# ---------------------------------------------------------------------------------------------------------------------
# DiffusionNFT


def optimality_probability(advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """r = clip(½ + A_c/(2C), 0, 1) with A_c = clip(A, −C, C): ½ at A = 0, 1 at A ≥ C, 0 at A ≤ −C."""
    a = advantages.clamp(-clip, clip)
    return (0.5 + a / (2.0 * clip)).clamp(0.0, 1.0)


def implicit_velocities(v_old: torch.Tensor, v_theta: torch.Tensor, beta: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(v⁺, v⁻) = ((1 − β)·v_old + β·v_θ, (1 + β)·v_old − β·v_θ); v⁺ + v⁻ = 2·v_old."""
    v_old = v_old.detach()
    return (1.0 - beta) * v_old + beta * v_theta, (1.0 + beta) * v_old - beta * v_theta


def nft_loss(
    x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float, v_theta: torch.Tensor, v_old: torch.Tensor,
    r: torch.Tensor, *, beta: float, clip: float, adaptive: bool = True,
) -> torch.Tensor:
    """(C/β)·mean_i [r·L⁺ + (1 − r)·L⁻], L± = mean_D (x̂0± − x0)² / w±, x̂0± = x_t − t·v±.

    Adaptive weighting: w± = sg(max(mean_D |x̂0± − x0|, 1e-5)) per sample and branch, computed in float64; without
    it w = 1. `v_old` (the sampling adapter) carries no gradient.
    """
    if beta <= 0:
        raise ValueError(f"the NFT beta must be > 0, got {beta}")
    tt = _per_sample(t, x0)
    v_pos, v_neg = implicit_velocities(v_old, v_theta, beta)
    losses = []
    for v in (v_pos, v_neg):
        err = x_t - tt * v - x0
        sq = _per_sample_mean(err**2)
        if adaptive:
            w = _per_sample_mean(err.detach().double().abs()).clamp_min(NFT_WEIGHT_FLOOR)
            sq = sq / w.to(sq.dtype)
        losses.append(sq)
    r = r.detach().to(losses[0].dtype)
    return (clip / beta) * (r * losses[0] + (1.0 - r) * losses[1]).mean()


def old_adapter_decay(step: int, schedule: str = "default") -> float:
    """η_k of the old (sampling) adapter's soft update θ_old ← η·θ_old + (1 − η)·θ after optimizer step k:
    "default" min(0.001·k, 0.5); "ocr" 0 for k < 75, then min(0.0075·(k − 75), 0.999)."""
    if schedule == "default":
        return min(0.001 * step, 0.5)
    if schedule == "ocr":
        return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)
    raise ValueError(f"unknown old-adapter schedule {schedule!r}; expected 'default' or 'ocr'")


def nft_timestep_indices(num_steps: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """(B, ⌊0.99·N⌋) schedule indices: per sample a random permutation of 0..N−1, its first ⌊0.99·N⌋ entries."""
    keep = int(0.99 * num_steps)
    return torch.stack([torch.randperm(num_steps, generator=generator)[:keep] for _ in range(batch)])


# ---------------------------------------------------------------------------------------------------------------------
# AWM


def awm_log_likelihood(v_theta: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float,
                       power: float = AWM_POWER) -> torch.Tensor:
    """ℓ = −t·[(L + ε)^p − ε^p]/p per sample, L = mean_D (v_θ − v)², ε = 1e-10."""
    loss = _per_sample_mean((v_theta - v) ** 2)
    tt = torch.as_tensor(t, dtype=loss.dtype, device=loss.device)
    return -tt * ((loss + AWM_EPS) ** power - AWM_EPS**power) / power


def awm_loss(
    v_theta: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, advantages: torch.Tensor, *, clip: float = 5.0,
    v_prox: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean_i −(A_i/C)·ℓ_i (A clipped to ±C) + mean (v_θ − v_prox)² (the pull towards the prox adapter, when its
    velocity is given)."""
    a = advantages.detach().clamp(-clip, clip) / clip
    loss = (-a.to(v_theta.dtype) * awm_log_likelihood(v_theta, v, t)).mean()
    if v_prox is not None:
        loss = loss + ((v_theta - v_prox.detach()) ** 2).mean()
    return loss


def prox_adapter_decay(step: int) -> float:
    """d_k of AWM's prox adapter θ_prox ← d·θ_prox + (1 − d)·θ: min(0.3, 0.001·k)."""
    return min(0.3, 0.001 * step)


def awm_timestep_indices(num_steps: int, batch: int, strata: int, generator: torch.Generator) -> torch.Tensor:
    """(B, strata) schedule indices in 1..N−1 (never index 0, t = 1): the indices split into `strata` contiguous
    strata, one drawn uniformly from each."""
    if not 1 <= strata <= num_steps - 1:
        raise ValueError(f"{strata} strata over the {num_steps - 1} schedule indices below t = 1")
    bounds = torch.linspace(1, num_steps, strata + 1).floor().long()
    cols = []
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        cols.append(torch.randint(lo, max(hi, lo + 1), (batch,), generator=generator))
    return torch.stack(cols, dim=1)


@torch.no_grad()
def soft_update(target: list[torch.Tensor], source: list[torch.Tensor], decay: float) -> None:
    """target ← decay·target + (1 − decay)·source, in place (the old or prox adapter following θ)."""
    for tgt, src in zip(target, source, strict=True):
        tgt.mul_(decay).add_(src.detach().to(tgt.dtype), alpha=1.0 - decay)
