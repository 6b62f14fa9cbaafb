"""Step rules of flow-matching sampling (ODE, Flow-SDE, Dance-SDE, CPS, exact SDE), their log-probs and the KL term.

Notation as in docs/math.md "Notation": a step goes from noise level `t` down to `s < t`, `Δ = t − s`, the model
predicts the velocity `v`, `x̂0 = x_t − t·v` is the predicted clean sample and `x̂1 = x_t + (1 − t)·v` the predicted
noise. Every rule returns the mean of the next state, the per-element std of the fresh noise and the noise scale the KL
term divides by; `step` samples (or scores a given next state) around them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from cluster.config import LOG_PROB_FORMS, STEP_KINDS

# The log-prob each rule's reference code trains with (docs/math.md "Log-probabilities and KL"): CPS's squared score,
# a Gaussian density otherwise.
DEFAULT_LOG_PROB_FORM = {kind: "squared" if kind == "cps" else "gaussian" for kind in STEP_KINDS}
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class StepOutput:
    """One step's result: the next state, its log-prob `(B,)`, and the Gaussian it was drawn from.

    `std` is the std of the fresh noise per element and `noise_scale` what the Gaussian KL divides by (σ_t without
    √Δ for Flow-SDE/Dance, the std itself for CPS and the exact SDE, 0 for ODE); both have shape `(B, 1, ..., 1)`.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    noise_scale: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------------
# The rules: (x_t, v, t, s, noise level) -> (mean, std, noise scale).


def ode_rule(x: torch.Tensor, v: torch.Tensor, t: float, s: float) -> tuple[torch.Tensor, float, float]:
    """Euler: x_s = x_t − Δ·v (deterministic)."""
    return x - (t - s) * v, 0.0, 0.0


def _flow_sde_mean(x: torch.Tensor, v: torch.Tensor, t: float, s: float, sigma_t: float) -> torch.Tensor:
    """Drift of the Flow-GRPO SDE: μ = x_t − Δ·[v + σ_t²/(2t)·(x_t + (1 − t)·v)]."""
    return x - (t - s) * (v + sigma_t**2 / (2.0 * t) * (x + (1.0 - t) * v))


def flow_sde_rule(
    x: torch.Tensor, v: torch.Tensor, t: float, s: float, a: float, t_second: float
) -> tuple[torch.Tensor, float, float]:
    """Flow-GRPO: σ_t = a·√(t/(1 − t̃)), t̃ = t except t̃ = (second schedule value) at t = 1; std σ_t·√Δ."""
    t_tilde = t_second if t == 1.0 else t
    if t_tilde >= 1.0:
        raise ValueError(f"Flow-SDE needs the second schedule value below 1 to start from t = 1, got {t_second}")
    sigma_t = a * math.sqrt(t / (1.0 - t_tilde))
    return _flow_sde_mean(x, v, t, s, sigma_t), sigma_t * math.sqrt(t - s), sigma_t


def dance_rule(x: torch.Tensor, v: torch.Tensor, t: float, s: float, eta: float) -> tuple[torch.Tensor, float, float]:
    """Dance-SDE: the Flow-SDE drift with a constant noise scale σ_t ≡ η; std η·√Δ."""
    return _flow_sde_mean(x, v, t, s, eta), eta * math.sqrt(t - s), eta


def cps_rule(x: torch.Tensor, v: torch.Tensor, t: float, s: float, eta: float) -> tuple[torch.Tensor, float, float]:
    """CPS: μ = (1 − s)·x̂0 + s·cos(ηπ/2)·x̂1, std s·sin(ηπ/2) (clean coefficient 1 − s, total noise exactly s)."""
    x0_hat, x1_hat = x - t * v, x + (1.0 - t) * v
    std = s * math.sin(eta * math.pi / 2.0)
    return (1.0 - s) * x0_hat + s * math.cos(eta * math.pi / 2.0) * x1_hat, std, std


def sde_exact_rule(x: torch.Tensor, v: torch.Tensor, t: float, s: float, a: float) -> tuple[torch.Tensor, float, float]:
    """Flow-SDE integrated exactly with x̂0 frozen: ρ = (s(1−t)/(t(1−s)))^(a²/2), μ = (1−s)·x̂0 + s·ρ·x̂1, std s·√(1−ρ²)."""
    x0_hat, x1_hat = x - t * v, x + (1.0 - t) * v
    rho = (s * (1.0 - t) / (t * (1.0 - s))) ** (a * a / 2.0)  # 0 at t = 1 or s = 0 (a > 0); 1 for a = 0
    std = s * math.sqrt(max(0.0, 1.0 - rho * rho))
    return (1.0 - s) * x0_hat + s * rho * x1_hat, std, std


# The rule of each kind, in STEP_KINDS order, called as (x, v, t, s, noise level, the schedule's second value).
Rule = Callable[[torch.Tensor, torch.Tensor, float, float, float, float], tuple[torch.Tensor, float, float]]
RULES: dict[str, Rule] = dict(zip(STEP_KINDS, (
    lambda x, v, t, s, level, second: ode_rule(x, v, t, s),
    flow_sde_rule,
    lambda x, v, t, s, level, second: dance_rule(x, v, t, s, level),
    lambda x, v, t, s, level, second: cps_rule(x, v, t, s, level),
    lambda x, v, t, s, level, second: sde_exact_rule(x, v, t, s, level),
), strict=True))


# ---------------------------------------------------------------------------------------------------------------------
# Log-probabilities and the KL term.


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Normal log-density of `sample` under N(mean, std²), averaged over all non-batch elements: shape (B,)."""
    per_element = -((sample - mean) ** 2) / (2.0 * std * std) - math.log(std) - _HALF_LOG_2PI
    return per_element.reshape(per_element.shape[0], -1).mean(dim=1)


def squared_log_prob(sample: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The CPS code's score ℓ = −mean_D (x_s − μ)², with no variance term and no constants: shape (B,)."""
    per_element = -((sample - mean) ** 2)
    return per_element.reshape(per_element.shape[0], -1).mean(dim=1)


def kl(
    mean: torch.Tensor, mean_ref: torch.Tensor, noise_scale: torch.Tensor | float, *, form: str
) -> torch.Tensor:
    """KL to the reference policy per sample, (B,): mean_D (μθ − μref)²/(2σ²) (gaussian), mean_D (μθ − μref)² (squared).

    σ is the step's noise scale (σ_t without √Δ for Flow-SDE/Dance), as in the reference code whose β values are used;
    it may be a float, a `(B,)` tensor or anything broadcastable to `mean`. Where σ = 0 (never trained) the term is 0.
    """
    if form not in LOG_PROB_FORMS:
        raise ValueError(f"unknown KL form {form!r}; expected one of {', '.join(LOG_PROB_FORMS)}")
    if mean.shape != mean_ref.shape:
        raise ValueError(f"mean and mean_ref shapes differ: {tuple(mean.shape)} vs {tuple(mean_ref.shape)}")
    dtype = torch.promote_types(torch.promote_types(mean.dtype, mean_ref.dtype), torch.float32)
    sq = (mean.to(dtype) - mean_ref.to(dtype)) ** 2
    if form == "gaussian":
        sigma = torch.as_tensor(noise_scale, dtype=dtype, device=mean.device)
        if sigma.ndim == 1 and mean.ndim > 1:
            sigma = sigma.reshape(-1, *([1] * (mean.ndim - 1)))  # one noise scale per sample
        safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
        sq = torch.where(sigma > 0, sq / (2.0 * safe * safe), torch.zeros_like(sq))
    return sq.reshape(sq.shape[0], -1).mean(dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# The step.


def step(
    kind: str,
    x: torch.Tensor,
    velocity: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    index: int,
    *,
    noise_level: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    log_prob_form: str,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One sampling step of rule `kind` from t = sigmas[index] to s = sigmas[index + 1], with its log-prob.

    `noise` given: it is the fresh z. `prev_sample` given: nothing is sampled and the log-prob is that of the given
    state (the training path; the state is treated as a constant). Arithmetic runs in float32 (float64 if `x` is
    float64) whatever the input dtype, and `prev_sample` is returned in that dtype. The log-prob (`log_prob_form`,
    each rule's own in DEFAULT_LOG_PROB_FORM) is averaged over all non-batch elements. ODE returns a zero log-prob, and
    so does the Gaussian form wherever the std is 0 (Flow-SDE with a = 0, CPS at s = 0): such steps are never trained.
    The noise level's range per rule is the config's to check (cluster/config.py), not this hot path's.
    """
    if kind not in RULES:
        raise ValueError(f"unknown step kind {kind!r}; expected one of {', '.join(STEP_KINDS)}")
    form = log_prob_form
    if form not in LOG_PROB_FORMS:
        raise ValueError(f"unknown log_prob_form {log_prob_form!r}; expected one of {', '.join(LOG_PROB_FORMS)}")
    if velocity.shape != x.shape:
        raise ValueError(f"velocity shape {tuple(velocity.shape)} differs from x shape {tuple(x.shape)}")
    if x.ndim < 1:
        raise ValueError("x needs a batch dimension (dim 0)")
    if noise is not None and prev_sample is not None:
        raise ValueError("give either noise (sampling) or prev_sample (scoring a recorded state), not both")
    schedule = torch.as_tensor(sigmas).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if isinstance(index, bool) or int(index) != index or not 0 <= int(index) < schedule.numel() - 1:
        last = schedule.numel() - 2
        raise ValueError(f"index {index!r} out of range for a schedule of {schedule.numel()} values (0..{last})")
    index = int(index)
    t, s = float(schedule[index]), float(schedule[index + 1])
    if not (1.0 >= t > s >= 0.0):
        raise ValueError(f"a step needs 1 >= t > s >= 0, got t = {t}, s = {s}")

    dtype = torch.promote_types(torch.promote_types(x.dtype, velocity.dtype), torch.float32)
    mean, std, noise_scale = RULES[kind](x.to(dtype), velocity.to(dtype), t, s, noise_level, float(schedule[1]))

    if prev_sample is None:
        if noise is not None and noise.shape != x.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x shape {tuple(x.shape)}")
        if std == 0.0:
            prev_sample = mean.detach()  # deterministic: no noise is drawn
        else:
            z = torch.randn(x.shape, dtype=dtype, device=x.device, generator=generator) if noise is None else noise.to(dtype)
            prev_sample = (mean + std * z).detach()
    elif prev_sample.shape != x.shape:
        raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} differs from x shape {tuple(x.shape)}")
    else:
        prev_sample = prev_sample.detach().to(dtype)

    if kind == "ode" or (form == "gaussian" and std == 0.0):
        log_prob = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
    elif form == "gaussian":
        log_prob = gaussian_log_prob(prev_sample, mean, std)
    else:
        log_prob = squared_log_prob(prev_sample, mean)

    per_sample = (x.shape[0],) + (1,) * (x.ndim - 1)
    return StepOutput(
        prev_sample=prev_sample,
        log_prob=log_prob,
        mean=mean,
        std=torch.full(per_sample, std, dtype=dtype, device=x.device),
        noise_scale=torch.full(per_sample, noise_scale, dtype=dtype, device=x.device),
    )
