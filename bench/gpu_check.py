"""GPU check: every model family's transformer at its real size, randomly initialised on the device, through the
project's own rollout and learner code, at each shipped config's resolution, steps and batch sizes.

    python bench/gpu_check.py [--families sd3,flux2,z_image,flux,qwen_image] [--budget-s 330] [--json out.json]
    python bench/gpu_check.py --tiny        # the same code on CPU with the tiny models (the test suite runs it)

No weights are downloaded and no text encoder runs: the transformer and the VAE are built from the published configs
(bench/real_configs.py) in bf16 directly on the device, and the prompt embeddings are random tensors of the shapes the
text encoders give. Per family it measures

- rollout: images/s of `RolloutSampler.sample_group` (log-probs recorded) on one chunk of `samples_per_forward`
  images, and of the family's diffusers pipeline (the plain ODE loop) on the same transformer and batch;
- host synchronisations per sampling step (CUDA's sync debug mode counts every call that waits for the device);
- learner: one (micro-batch, step) update of the learner's loss with the LoRA of the config, with and without
  gradient checkpointing (seconds, peak memory), and of full fine-tuning where the weights, gradients and AdamW states
  fit (bf16 AdamW, no KL reference);
- model FLOPs utilisation from counted FLOPs: every matrix product and attention of one forward counted from its shapes
  (torch's FlopCounterMode: 2·m·n·k per product, 4·B·H·S_q·S_kv·d per attention), VAE convolutions included. Rollout
  FLOPs = steps × forward(chunk) + decode(chunk); learner FLOPs = forward(micro-batch) × 2 (LoRA: the backward through
  frozen weights is one more forward's worth) or × 3 (full), plus the reference forward when β > 0; recomputation
  under gradient checkpointing is not counted. MFU = FLOPs / (seconds × peak), peak the chip's dense bf16 rate
  (datasheet) or, for a chip not listed, a measured matrix-product rate;
- the on-policy ratio of the first update, |ρ − 1| max and mean over the samples: bf16 compares the rollout's recorded
  log-probs with the learner's recompute; fp32 (the transformer cast to fp32) re-runs one sampling step of 2 samples
  and recomputes it; each with the rollout's batch layout and with single-sample micro-batches.

Then the levers, each measured off and on in the same run, after everything above (compiling changes the model for
what follows), with the job's LoRA and gradient checkpointing on, as the job runs:

- compile (`model.compile`, rollout/models/compile.py): the blocks compiled (default mode), one untimed
  `sample_group` to compile and warm up, then one timed: images/s, rollout MFU, speed-up over the eager sampler
  (timed just before, same LoRA) and over the diffusers loop above (eager, no LoRA). Goal: sampler ≥ 1.3× the
  diffusers loop on FLUX.1 and SD3.5;
- |ρ − 1| bf16 in the rollout layout with the compiled model (the compiled rollout's steps recomputed by the compiled
  learner forward). Goal: 0, as eager (at worst within the 1e-3 of single-sample micro-batches);
- compiled LoRA update: seconds, learner MFU and speed-up over the eager LoRA update above. Goal: faster than eager;
- CUDA graphs: as compile with mode="reduce-overhead" (two untimed calls: warm-up and recording). Goal: above compile;
- fused optimizer: the (eager) LoRA update with AdamW(fused=True) against foreach=True. Goal: no slower;
- micro-batch from memory: the largest learner micro-batch (powers of two up to 4× the rollout chunk, samples
  repeated past it) whose eager LoRA update peaks within 85 % of the device memory, tried in increasing order up to
  the first that does not fit; its update seconds and MFU. Goal: MFU above the configured micro-batch's.

Compiling is static-shaped: the rollout chunk and each micro-batch size compile once (not timed). `--tiny` compiles
only the first family (a cold inductor cache takes a minute a family on CPU): the others report "skipped: tiny run
compiles one family".

It prints one table (metric × family) and writes JSON. A measurement that fails is reported with its error; one that
the time budget leaves out is reported as skipped. `--budget-s` bounds the whole run: the families run from the
smallest up, and a family's optional measurements (diffusers loop, no checkpointing, fp32, full fine-tuning) are left
out once it has used its share, as are the levers.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.quiet import quiet_here  # noqa: E402

quiet_here()  # before diffusers and transformers load

from cluster.config import JobConfig  # noqa: E402
from cluster.config_loading import load_config  # noqa: E402
from learner.objectives.grpo import log_prob_scale, micro_batch, score_recorded_step, step_loss  # noqa: E402
from rollout.models.compile import compile_blocks, decompile_blocks  # noqa: E402
from rollout.models.contract import FlowModel, PromptEmbeds  # noqa: E402
from rollout.models.loading import adapter, without_cudnn_attention  # noqa: E402
from rollout.models.random_init import prompt_tokens, random_module, text_widths, with_random_text  # noqa: E402
from rollout.models.schedules import DEFAULT_CONFIGS  # noqa: E402
from rollout.policy import adapter_disabled, add_lora  # noqa: E402
from rollout.prompts.groups import PromptGroup  # noqa: E402
from rollout.sampling.forward import guided_velocity  # noqa: E402
from rollout.sampling.loop import RolloutSampler  # noqa: E402
from rollout.sampling.steps import step  # noqa: E402
from rollout.sampling.trajectory import SamplerSettings, Trajectories  # noqa: E402

FAMILIES = ("sd3", "flux2", "z_image", "flux", "qwen_image")  # smallest first: a short budget loses the largest
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0}  # dense, datasheets
TINY_TEXT_TOKENS = 16
FP32_SAMPLES = 2
LEVER_METRICS = (  # the levers, after the rest with the job's LoRA, each off and on in the same run
    ("compile_images_per_s", "compile: rollout images/s (compiled blocks, LoRA)"),
    ("compile_mfu", "compile: rollout MFU"),
    ("compile_vs_eager", "compile: compiled / eager sampler speed (same LoRA)"),
    ("compile_vs_ode", "compile: compiled sampler / diffusers loop speed"),
    ("compile_ratio_bf16_same", "compile: abs(rho-1) bf16, rollout layout (max / mean)"),
    ("compile_lora_update_s", "compile: LoRA update s (checkpointing on)"),
    ("compile_lora_mfu", "compile: learner MFU, LoRA (on)"),
    ("compile_lora_vs_eager", "compile: eager / compiled LoRA update time"),
    ("cudagraphs_images_per_s", "CUDA graphs: rollout images/s (reduce-overhead)"),
    ("cudagraphs_mfu", "CUDA graphs: rollout MFU"),
    ("cudagraphs_vs_eager", "CUDA graphs: sampler / eager sampler speed"),
    ("cudagraphs_vs_ode", "CUDA graphs: sampler / diffusers loop speed"),
    ("fused_update_s", "fused AdamW: LoRA update s (on)"),
    ("fused_vs_foreach", "fused AdamW: foreach / fused update time"),
    ("memory_micro_batch", "micro-batch from memory: largest within 85 %"),
    ("memory_update_s", "micro-batch from memory: LoRA update s (on)"),
    ("memory_mfu", "micro-batch from memory: learner MFU, LoRA (on)"),
)
METRICS = (  # (key, label) in table order
    ("parameters_b", "transformer parameters (billions)"),
    ("shape", "resolution / steps / guidance / chunk / micro-batch"),
    ("rollout_images_per_s", "rollout images/s (sampler, log-probs)"),
    ("ode_images_per_s", "diffusers ODE loop images/s"),
    ("rollout_vs_ode", "sampler / diffusers speed"),
    ("rollout_mfu", "rollout MFU"),
    ("syncs_per_step", "host syncs per step, sampler (group total / steps)"),
    ("ode_syncs_per_step", "host syncs per step, diffusers (call total / steps)"),
    ("lora_update_s", "LoRA update s (checkpointing on)"),
    ("lora_peak_gib", "LoRA update peak GiB (on)"),
    ("lora_mfu", "learner MFU, LoRA (on)"),
    ("lora_nockpt_update_s", "LoRA update s (checkpointing off)"),
    ("lora_nockpt_peak_gib", "LoRA update peak GiB (off)"),
    ("full_update_s", "full fine-tuning update s (on)"),
    ("full_peak_gib", "full fine-tuning peak GiB (on)"),
    ("full_mfu", "learner MFU, full (on)"),
    ("ratio_bf16_same", "abs(rho-1) bf16, rollout layout (max / mean)"),
    ("ratio_bf16_other", "abs(rho-1) bf16, single samples (max / mean)"),
    ("ratio_fp32_same", "abs(rho-1) fp32, rollout layout (max / mean)"),
    ("ratio_fp32_other", "abs(rho-1) fp32, single samples (max / mean)"),
) + LEVER_METRICS
LEVERS = tuple(key for key, _ in LEVER_METRICS)
OPTIONAL = {"ode_images_per_s", "ode_syncs_per_step", "rollout_vs_ode", "lora_nockpt_update_s", "lora_nockpt_peak_gib",
            "full_update_s", "full_peak_gib", "full_mfu", "ratio_fp32_same", "ratio_fp32_other", *LEVERS}
NO_CUDA = "n/a (no CUDA)"
TINY_COMPILES = "tiny run compiles one family"  # --tiny: the compile levers of the other families are skipped
MEMORY_SHARE = 0.85  # of the device memory a learner micro-batch may peak at


# ---------------------------------------------------------------------------------------------------------------------
# Recording: every measurement ends as a value or a reason.


class Skipped(Exception):
    """A measurement left out on purpose (time budget, memory, no CUDA): reported with its reason."""


def measure(results: dict[str, Any], keys: tuple[str, ...], fn: Callable[[], dict[str, Any]]) -> None:
    """Run `fn` and store the values it returns under `keys`; a failure or skip stores its reason under every key."""
    try:
        values = fn()
    except Skipped as e:
        values = {key: f"skipped: {e}" for key in keys}
    except torch.cuda.OutOfMemoryError:
        values = {key: "error: out of memory" for key in keys}
    except Exception as e:  # noqa: BLE001 — a failed measurement is reported in the table, not raised
        traceback.print_exc()
        values = {key: f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}" for key in keys}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            try:
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 — a device fault: the next measurements report it
                pass
    for key in keys:
        results[key] = values.get(key, "error: not measured")


def is_value(value: Any) -> bool:
    """A measured number (or numbers), not a reason."""
    return not (isinstance(value, str) and value.startswith(("error:", "skipped:")))


def formatted(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, (list, tuple)):
        return " / ".join(formatted(v) for v in value)
    return str(value)


def table(report: dict[str, Any], metrics: tuple[tuple[str, str], ...] = METRICS, width: int = 60) -> str:
    """One row per metric (key, label), one column per family; cells cut at `width` characters."""
    families = list(report["families"])
    rows = [["metric", *families]]
    rows += [[label, *(formatted(report["families"][f].get(key, ""))[:width] for f in families)]
             for key, label in metrics]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# The device: timing, memory, FLOPs, host synchronisations.


class Device:
    def __init__(self, name: str) -> None:
        self.torch = torch.device(name)
        self.cuda = self.torch.type == "cuda"
        self.name = torch.cuda.get_device_name(self.torch) if self.cuda else "cpu"
        self.peak_tflops, self.peak_source = self._peak()
        if self.cuda:
            without_cudnn_attention()  # as the job's rollout and learner run (rollout/models/loading.py)

    def _peak(self) -> tuple[float, str]:
        for key, tflops in PEAK_BF16_TFLOPS.items():
            if key in self.name:
                return tflops, f"{key} dense bf16 (datasheet)"
        dtype = torch.bfloat16 if self.cuda else torch.float32
        n = 4096 if self.cuda else 512
        a, b = torch.randn(n, n, device=self.torch, dtype=dtype), torch.randn(n, n, device=self.torch, dtype=dtype)
        for _ in range(3):
            a @ b
        seconds = self.timed(lambda: [a @ b for _ in range(10)])
        return 10 * 2 * n**3 / seconds / 1e12, f"measured {str(dtype).removeprefix('torch.')} {n}^3 products"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.torch)

    def timed(self, fn: Callable[[], Any]) -> float:
        self.sync()
        started = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - started

    @contextmanager
    def peak_memory(self) -> Iterator[dict[str, float | str]]:
        """{'gib': peak GiB allocated inside the block} (a reason on CPU)."""
        out: dict[str, float | str] = {"gib": "n/a (no CUDA)"}
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.torch)
        yield out
        if self.cuda:
            self.sync()
            out["gib"] = torch.cuda.max_memory_allocated(self.torch) / 2**30

    @contextmanager
    def counting_syncs(self) -> Iterator[dict[str, int | str]]:
        """{'syncs': host synchronisations inside the block}, from CUDA's sync debug mode (a reason on CPU)."""
        out: dict[str, int | str] = {"syncs": "n/a (no CUDA)"}
        if not self.cuda:
            yield out
            return
        self.sync()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield out
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out["syncs"] = sum("synchroniz" in str(w.message) for w in caught)


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matrix products, attentions and convolutions `fn` runs, counted from their shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def per_step(syncs: int | str, steps: int) -> float | str:
    """A sync count over a whole sampling call as a per-step figure (a reason stays as it is)."""
    return syncs if isinstance(syncs, str) else syncs / steps


def mfu(flops: float, seconds: float, device: Device) -> float:
    return flops / seconds / (device.peak_tflops * 1e12)


# ---------------------------------------------------------------------------------------------------------------------
# A family at real (or tiny) size.


@dataclass
class Case:
    """What one family is checked at: its job config, sampler settings, rollout chunk, learner micro-batch and the
    prompt's text tokens."""

    family: str
    cfg: JobConfig
    settings: SamplerSettings
    chunk: int
    micro: int
    text_tokens: int


def case(family: str, tiny: bool) -> Case:
    """The shipped config of `family` (cluster/<family>.yaml), sampled without a Fast window or shared initial noise
    and recording at most 2 steps (the ratios use the first); tiny: 64 px, 4 steps, 2 samples per forward."""
    overrides = ["model.resolution=64", "sampler.num_steps=4", "rollout.samples_per_forward=2",
                 "learner.micro_batch_size=2", "learner.num_actors=1", "learner.updates_per_iteration=1",
                 "data.group_size=2", "data.images_per_iteration=2"] if tiny else []
    cfg = load_config(ROOT / "cluster" / f"{family}.yaml", overrides)
    settings = replace(SamplerSettings.from_config(cfg), fast_window_size=0, same_initial_noise=False)
    settings = replace(settings, trained_steps=min(settings.trained_steps, 2))  # recorded steps the ratios use
    chunk = min(cfg.rollout.samples_per_forward, cfg.data.group_size)
    return Case(family, cfg, settings, chunk, min(cfg.learner.micro_batch_size, chunk),
                TINY_TEXT_TOKENS if tiny else prompt_tokens(family, cfg.model.max_sequence_length))


def module_configs(family: str, tiny: bool) -> tuple[dict, dict]:
    """(transformer config, VAE config): the published ones, or those of the tiny test model."""
    if tiny:
        from rollout.models.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(family, seed=0)
        return dict(pipe.transformer.config), dict(pipe.vae.config)
    sys.path.insert(0, str(ROOT / "bench"))
    from real_configs import REAL_CONFIGS

    return REAL_CONFIGS[family]["transformer"], REAL_CONFIGS[family]["vae"]


def build(family: str, tiny: bool, device: Device, dtype: torch.dtype, tokens: int) -> FlowModel:
    """The family's transformer and VAE with random weights on the device, random prompt embeddings for its text
    encoders (rollout/models/random_init.py, as `model.init: random` builds them)."""
    transformer_config, vae_config = module_configs(family, tiny)
    parts = adapter(family).components
    modules = {name: random_module(parts[name][1], config, dtype=dtype, device=device.torch, seed=0, name=name)
               for name, config in (("transformer", transformer_config), ("vae", vae_config))}
    model_class = with_random_text(adapter(family), tokens, text_widths(family, transformer_config))
    return model_class(modules, dtype=dtype, device=device.torch)


# ---------------------------------------------------------------------------------------------------------------------
# The measurements.


def diffusers_loop(model: FlowModel, c: Case, device: Device) -> Callable[[], Any]:
    """One call of the family's diffusers pipeline on the same transformer and VAE: `chunk` images of one prompt."""
    import diffusers

    s = c.settings
    cls = getattr(diffusers, model.pipeline)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(DEFAULT_CONFIGS[c.family])
    names = [n for n in inspect.signature(cls.__init__).parameters if n.startswith(("text_encoder", "tokenizer"))]
    pipe = cls(transformer=model.transformer, vae=model.vae, scheduler=scheduler, **dict.fromkeys(names))
    pipe.set_progress_bar_config(disable=True)
    # the embeddings of all `chunk` images given (a pipeline repeats only the embeddings it encodes itself)
    prompt = model.encode_prompts(["a photo of a cat"]).expand(c.chunk)
    negative = model.encode_prompts([model.negative_prompt]).expand(c.chunk)
    kwargs: dict[str, Any] = dict(num_inference_steps=s.num_steps, height=s.height, width=s.width, output_type="pt",
                                  generator=torch.Generator(device.torch).manual_seed(0))
    g = s.guidance_scale
    if c.family == "flux":
        kwargs.update(prompt_embeds=prompt.prompt_embeds, pooled_prompt_embeds=prompt.pooled, guidance_scale=g)
    elif c.family == "sd3":
        kwargs.update(prompt_embeds=prompt.prompt_embeds, pooled_prompt_embeds=prompt.pooled,
                      negative_prompt_embeds=negative.prompt_embeds, negative_pooled_prompt_embeds=negative.pooled,
                      guidance_scale=g)
    elif c.family == "flux2":
        kwargs.update(prompt_embeds=prompt.prompt_embeds, negative_prompt_embeds=negative.prompt_embeds,
                      guidance_scale=g)
    elif c.family == "qwen_image":
        def mask(e: PromptEmbeds) -> torch.Tensor:
            return torch.ones(e.prompt_embeds.shape[:2], dtype=torch.long, device=device.torch)

        kwargs.update(prompt_embeds=prompt.prompt_embeds, prompt_embeds_mask=mask(prompt),
                      negative_prompt_embeds=negative.prompt_embeds, negative_prompt_embeds_mask=mask(negative),
                      true_cfg_scale=g)
    else:  # z_image: one caption tensor per prompt
        kwargs.update(prompt_embeds=list(prompt.prompt_embeds), negative_prompt_embeds=list(negative.prompt_embeds),
                      guidance_scale=g)
    return lambda: pipe(**kwargs)


def ratio_deviation(new: torch.Tensor, old: torch.Tensor, scale: float) -> list[float]:
    """[max, mean] of |ρ − 1|, ρ = exp(scale·(ℓ_new − ℓ_old)), over the samples."""
    deviation = (torch.exp(scale * (new.double().cpu() - old.double().cpu())) - 1).abs()
    return [float(deviation.max()), float(deviation.mean())]


def recomputed(model: FlowModel, record: Trajectories, negative: PromptEmbeds | None, rows: list[list[int]],
               k: int, device: Device) -> torch.Tensor:
    """The learner's log-probs of step slot k (grad enabled, as training runs it) with micro-batches `rows`."""
    out = torch.empty(record.group_size)
    for part in rows:
        mb = micro_batch([record], [(0, i) for i in part], torch.zeros(len(part)), device.torch)
        out[part] = score_recorded_step(model, mb, k, negative).log_prob.detach().float().cpu()
    return out


def singles(n: int) -> list[list[int]]:
    return [[i] for i in range(n)]


def in_layout(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def fp32_ratios(model: FlowModel, sampler: RolloutSampler, record: Trajectories, c: Case, scale: float,
                device: Device) -> dict[str, Any]:
    """One sampling step of FP32_SAMPLES samples re-run in fp32 from the recorded states, then recomputed by the
    learner in the same batch and one sample at a time. The transformer is cast back to bf16 (exactly) after."""
    transformer, dtype = model.transformer, model.dtype
    transformer.float()
    model.dtype = torch.float32
    try:
        s, n = c.settings, min(FP32_SAMPLES, record.group_size)
        index = int(record.step_indices[0])
        x = record.states[:n, 0].to(device.torch)
        with torch.no_grad():
            v = guided_velocity(model, x, sampler.sigmas[index], record.prompt_embeds.to(device.torch),
                                sampler.negative, s)
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device.torch)
            out = step(s.kind, x, v, sampler.sigmas, index, noise_level=s.noise_level, noise=noise,
                       log_prob_form=s.log_prob_form)
        fp32 = replace(record, seeds=record.seeds[:n], states=record.states[:n, :1],
                       next_states=out.prev_sample.float().cpu()[:, None],
                       log_probs=out.log_prob.float().cpu()[:, None],
                       step_indices=record.step_indices[:1], images=record.images[:n],
                       means=None if record.means is None else out.mean.float().cpu()[:, None])
        return {
            "ratio_fp32_same": ratio_deviation(recomputed(model, fp32, sampler.negative, [list(range(n))], 0, device),
                                               fp32.log_probs[:, 0], scale),
            "ratio_fp32_other": ratio_deviation(recomputed(model, fp32, sampler.negative, singles(n), 0, device),
                                                fp32.log_probs[:, 0], scale),
        }
    finally:
        transformer.to(dtype)
        model.dtype = dtype


def learner_update(model: FlowModel, record: Trajectories, negative: PromptEmbeds | None, c: Case, scale: float,
                   device: Device, *, full: bool, micro: int | None = None, fused: bool = False) -> Callable[[], Any]:
    """One (micro-batch, step) update of the learner's loss: forward, loss, backward, AdamW step (foreach, or fused).
    `micro`: the micro-batch size (default the case's); past the record's samples they repeat."""
    lc = c.cfg.learner
    beta = 0.0 if full else lc.kl_beta
    transformer = model.transformer
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lc.lr, **({"fused": True} if fused else {"foreach": True}))
    micro = micro or c.micro
    refs = [(0, i % record.group_size) for i in range(micro)]
    advantages = torch.randn(micro, generator=torch.Generator().manual_seed(2))

    def update() -> None:
        mb = micro_batch([record], refs, advantages, device.torch)
        reference = None
        if beta > 0:
            with torch.no_grad(), adapter_disabled(transformer):
                reference = score_recorded_step(model, mb, 0, negative).mean
        scored = score_recorded_step(model, mb, 0, negative)
        call = step_loss(scored, mb, 0, clip_range=lc.clip_range, kl_beta=beta, reference_mean=reference,
                         log_prob_scale=scale, ratio_norm=lc.ratio_norm)
        call.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return update


def timed_update(update: Callable[[], Any], device: Device) -> tuple[float, float | str]:
    """(seconds of the second call, peak GiB over both calls): the first call warms the allocator up."""
    with device.peak_memory() as peak:
        update()
        seconds = device.timed(update)
    return seconds, peak["gib"]


def check_family(family: str, args: argparse.Namespace, device: Device, deadline: float,
                 save: Callable[[dict[str, Any]], None] = lambda results: None) -> dict[str, Any]:
    """Every measurement of one family, in order of importance; `save` gets the results after each."""
    started = time.perf_counter()
    results: dict[str, Any] = {}

    def take(keys: tuple[str, ...], fn: Callable[[], dict[str, Any]]) -> None:
        measure(results, keys, fn)
        save(results)

    c = case(family, args.tiny)
    s, lc = c.settings, c.cfg.learner
    results["shape"] = f"{s.height} px / {s.num_steps} / {s.guidance_scale:g} / {c.chunk} / {c.micro}"
    print(f"[gpu_check] {family}: building the transformer and VAE ({'tiny' if args.tiny else 'real size'})",
          flush=True)
    model = build(family, args.tiny, device, torch.bfloat16, c.text_tokens)
    results["parameters_b"] = sum(p.numel() for p in model.transformer.parameters()) / 1e9
    state: dict[str, Any] = {}
    share = deadline  # this family's end: set once the rollout shows its speed

    def optional() -> None:
        if time.perf_counter() > share:
            raise Skipped("time budget")

    def rollout() -> dict[str, Any]:
        sampler = RolloutSampler(model, s, run_seed=0)
        group = PromptGroup(group_id=0, prompt="a photo of a cat", metadata={}, seeds=tuple(range(c.chunk)))
        latent = model.latent_shape(c.chunk, s.height, s.width)
        x = torch.randn(latent, device=device.torch)
        conditioning = model.conditioning(model.encode_prompts([group.prompt]), sampler.negative, c.chunk,
                                          s.guidance_scale)
        with torch.no_grad():  # one forward and one decode, counted (and the kernels warmed up)
            forward = counted_flops(lambda: guided_velocity(model, x, sampler.sigmas[0], conditioning,
                                                            sampler.negative, s))
            decode = counted_flops(lambda: model.decode(x, s.height, s.width))
        with device.counting_syncs() as syncs:
            seconds = device.timed(lambda: state.update(record=sampler.sample_group(group)))
        state.update(sampler=sampler, forward_flops=forward, rollout_flops=s.num_steps * forward + decode)
        return {"rollout_images_per_s": c.chunk / seconds, "rollout_mfu": mfu(state["rollout_flops"], seconds, device),
                "syncs_per_step": per_step(syncs["syncs"], s.num_steps)}

    take(("rollout_images_per_s", "rollout_mfu", "syncs_per_step"), rollout)
    if "record" not in state:
        return results
    remaining = max(1, len(args.families) - args.families.index(family))
    share = started + (deadline - started) / remaining

    def ode() -> dict[str, Any]:
        optional()
        call = diffusers_loop(model, c, device)
        with device.counting_syncs() as syncs:
            seconds = device.timed(call)
        images_per_s = c.chunk / seconds
        return {"ode_images_per_s": images_per_s, "rollout_vs_ode": results["rollout_images_per_s"] / images_per_s,
                "ode_syncs_per_step": per_step(syncs["syncs"], s.num_steps)}

    take(("ode_images_per_s", "rollout_vs_ode", "ode_syncs_per_step"), ode)

    record: Trajectories = state["record"]
    sampler: RolloutSampler = state["sampler"]
    scale = log_prob_scale(lc.log_prob_reduction, record.states[0, 0].numel())
    transformer = model.transformer
    torch.manual_seed(c.cfg.seed)
    add_lora(transformer, lc.lora)
    transformer.train(lc.lora.dropout > 0)
    transformer.enable_gradient_checkpointing()

    def ratios_bf16() -> dict[str, Any]:
        old = record.log_probs[:, 0]
        return {"ratio_bf16_same": ratio_deviation(recomputed(model, record, sampler.negative,
                                                              in_layout(record.group_size, c.chunk), 0, device),
                                                   old, scale),
                "ratio_bf16_other": ratio_deviation(recomputed(model, record, sampler.negative,
                                                               singles(record.group_size), 0, device), old, scale)}

    take(("ratio_bf16_same", "ratio_bf16_other"), ratios_bf16)

    forward_micro = state["forward_flops"] * c.micro / c.chunk
    reference = forward_micro if lc.kl_beta > 0 else 0.0

    def lora() -> dict[str, Any]:
        seconds, peak = timed_update(learner_update(model, record, sampler.negative, c, scale, device, full=False),
                                     device)
        return {"lora_update_s": seconds, "lora_peak_gib": peak,
                "lora_mfu": mfu(2 * forward_micro + reference, seconds, device)}

    take(("lora_update_s", "lora_peak_gib", "lora_mfu"), lora)

    def fp32() -> dict[str, Any]:
        optional()
        needed = 4 * sum(p.numel() for p in transformer.parameters())
        if device.cuda and needed > 0.95 * torch.cuda.mem_get_info(device.torch)[0]:
            raise Skipped(f"an fp32 copy needs {needed / 2**30:.0f} GiB")
        return fp32_ratios(model, sampler, record, c, scale, device)

    take(("ratio_fp32_same", "ratio_fp32_other"), fp32)

    def lora_no_checkpointing() -> dict[str, Any]:
        optional()
        transformer.disable_gradient_checkpointing()
        try:
            seconds, peak = timed_update(learner_update(model, record, sampler.negative, c, scale, device,
                                                        full=False), device)
        finally:
            transformer.enable_gradient_checkpointing()
        return {"lora_nockpt_update_s": seconds, "lora_nockpt_peak_gib": peak}

    take(("lora_nockpt_update_s", "lora_nockpt_peak_gib"), lora_no_checkpointing)

    def full() -> dict[str, Any]:
        optional()
        transformer.delete_adapters("default")
        transformer.requires_grad_(True)
        needed = 8 * sum(p.numel() for p in transformer.parameters())  # bf16 weights, gradients, 2 AdamW states
        if device.cuda and needed > 0.85 * torch.cuda.get_device_properties(device.torch).total_memory:
            raise Skipped(f"weights, gradients and AdamW states need {needed / 2**30:.0f} GiB")
        seconds, peak = timed_update(learner_update(model, record, sampler.negative, c, scale, device, full=True),
                                     device)
        return {"full_update_s": seconds, "full_peak_gib": peak, "full_mfu": mfu(3 * forward_micro, seconds, device)}

    take(("full_update_s", "full_peak_gib", "full_mfu"), full)
    levers(family, args, model, c, state, results, device, take, optional)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# The levers: each off and on in the same run, last (compiling changes the model for whatever would follow).


Take = Callable[[tuple[str, ...], Callable[[], dict[str, Any]]], None]  # check_family's `take`


def levers(family: str, args: argparse.Namespace, model: FlowModel, c: Case, state: dict[str, Any],
           results: dict[str, Any], device: Device, take: Take, optional: Callable[[], None]) -> None:
    """The lever rows of one family (module docstring), with the job's LoRA and gradient checkpointing on."""
    lc = c.cfg.learner
    transformer, sampler = model.transformer, state["sampler"]
    record: Trajectories = state["record"]
    scale = log_prob_scale(lc.log_prob_reduction, record.states[0, 0].numel())
    group = PromptGroup(group_id=0, prompt="a photo of a cat", metadata={}, seeds=tuple(range(c.chunk)))
    transformer.requires_grad_(False)  # back to the job's LoRA: `full` deleted the adapter and trained every weight
    if not getattr(transformer, "peft_config", None):
        torch.manual_seed(c.cfg.seed)
        add_lora(transformer, lc.lora)
    transformer.train(lc.lora.dropout > 0)
    transformer.enable_gradient_checkpointing()
    eager: dict[str, float] = {}

    def update_flops(micro: int) -> float:
        forward = state["forward_flops"] * micro / c.chunk
        return 2 * forward + (forward if lc.kl_beta > 0 else 0.0)

    def compiling() -> None:
        optional()
        if args.tiny and family != args.compiled_family:
            raise Skipped(TINY_COMPILES)

    def quotient(numerator: Any, denominator: Any) -> Any:
        """Of two measurements, their quotient, or the reason one of them has none."""
        return next((v for v in (numerator, denominator) if not is_value(v)), None) or numerator / denominator

    def compiled_sampler(prefix: str, mode: str | None, warmups: int) -> dict[str, Any]:
        """The sampler with the blocks compiled in `mode` after `warmups` untimed calls; the eager one timed first."""
        if "sampler_s" not in eager:
            eager["sampler_s"] = device.timed(lambda: sampler.sample_group(group))
        compile_blocks(transformer, mode=mode)
        for _ in range(warmups):
            sampler.sample_group(group)
        seconds = device.timed(lambda: state.update({f"{prefix}_record": sampler.sample_group(group)}))
        return {f"{prefix}_images_per_s": c.chunk / seconds,
                f"{prefix}_mfu": mfu(state["rollout_flops"], seconds, device),
                f"{prefix}_vs_eager": eager["sampler_s"] / seconds,
                f"{prefix}_vs_ode": quotient(c.chunk / seconds, results["ode_images_per_s"])}

    def compiled_rollout() -> dict[str, Any]:
        compiling()
        return compiled_sampler("compile", None, warmups=1)

    take(("compile_images_per_s", "compile_mfu", "compile_vs_eager", "compile_vs_ode"), compiled_rollout)

    def compiled_ratio() -> dict[str, Any]:
        compiling()
        if "compile_record" not in state:
            raise Skipped("no compiled rollout")
        compiled: Trajectories = state["compile_record"]
        new = recomputed(model, compiled, sampler.negative, in_layout(compiled.group_size, c.chunk), 0, device)
        return {"compile_ratio_bf16_same": ratio_deviation(new, compiled.log_probs[:, 0], scale)}

    take(("compile_ratio_bf16_same",), compiled_ratio)

    def compiled_lora() -> dict[str, Any]:
        compiling()
        compile_blocks(transformer)  # as the learner runs (dynamo's cached graphs of the same mode are reused)
        seconds, _ = timed_update(learner_update(model, record, sampler.negative, c, scale, device, full=False),
                                  device)  # the first (untimed) call compiles the micro-batch's graphs
        return {"compile_lora_update_s": seconds, "compile_lora_mfu": mfu(update_flops(c.micro), seconds, device),
                "compile_lora_vs_eager": quotient(results["lora_update_s"], seconds)}

    take(("compile_lora_update_s", "compile_lora_mfu", "compile_lora_vs_eager"), compiled_lora)

    def cuda_graphs() -> dict[str, Any]:
        if not device.cuda:
            return dict.fromkeys(("cudagraphs_images_per_s", "cudagraphs_mfu", "cudagraphs_vs_eager",
                                  "cudagraphs_vs_ode"), NO_CUDA)
        compiling()
        return compiled_sampler("cudagraphs", "reduce-overhead", warmups=2)  # warm-up, recording, then replays

    take(("cudagraphs_images_per_s", "cudagraphs_mfu", "cudagraphs_vs_eager", "cudagraphs_vs_ode"), cuda_graphs)
    if decompile_blocks(transformer):  # eager from here on; the cached graphs (and CUDA graph pools) go
        torch._dynamo.reset()

    def fused_optimizer() -> dict[str, Any]:
        optional()
        foreach, _ = timed_update(learner_update(model, record, sampler.negative, c, scale, device, full=False),
                                  device)
        fused, _ = timed_update(learner_update(model, record, sampler.negative, c, scale, device, full=False,
                                               fused=True), device)
        return {"fused_update_s": fused, "fused_vs_foreach": foreach / fused}

    take(("fused_update_s", "fused_vs_foreach"), fused_optimizer)

    def micro_batch_from_memory() -> dict[str, Any]:
        keys = ("memory_micro_batch", "memory_update_s", "memory_mfu")
        if not device.cuda:
            return dict.fromkeys(keys, NO_CUDA)
        optional()
        limit = MEMORY_SHARE * torch.cuda.get_device_properties(device.torch).total_memory / 2**30
        sizes = sorted({2**i for i in range(int(math.log2(4 * c.chunk)) + 1)} | {c.chunk, 2 * c.chunk, 4 * c.chunk})
        fits: tuple[int, float] | None = None
        for size in sizes:
            out_of_memory = False
            try:
                seconds, peak = timed_update(learner_update(model, record, sampler.negative, c, scale, device,
                                                            full=False, micro=size), device)
            except torch.cuda.OutOfMemoryError:
                out_of_memory = True
            gc.collect()
            torch.cuda.empty_cache()
            if out_of_memory or peak > limit:
                break
            fits = (size, seconds)
        if fits is None:
            raise Skipped(f"no micro-batch fits in {MEMORY_SHARE:.0%} of the device memory")
        size, seconds = fits
        return dict(zip(keys, (size, seconds, mfu(update_flops(size), seconds, device))))

    take(("memory_micro_batch", "memory_update_s", "memory_mfu"), micro_batch_from_memory)


def isolated(family: str, args: argparse.Namespace, device: str, deadline: float) -> dict[str, Any]:
    """One family in a process of its own (a CUDA fault ends a process): what it measured before it ended, and for
    the rest the way it ended."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        partial = Path(folder) / "results.json"
        command = [sys.executable, __file__, "--families", family, "--partial", str(partial),
                   "--budget-s", f"{max(1.0, deadline - time.perf_counter()):.0f}", "--device", device,
                   "--compiled-family", args.compiled_family, *(["--tiny"] if args.tiny else [])]
        code = subprocess.run(command).returncode
        results = json.loads(partial.read_text()) if partial.is_file() else {}
    for key, _ in METRICS:
        results.setdefault(key, f"error: the family's process ended (exit code {code}) before this measurement")
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = Device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    started = time.perf_counter()
    deadline = started + args.budget_s
    report: dict[str, Any] = {"device": device.name, "peak_tflops": device.peak_tflops,
                              "peak_source": device.peak_source, "tiny": args.tiny, "torch": torch.__version__,
                              "budget_s": args.budget_s, "families": {}}
    print(f"[gpu_check] {device.name}, peak {device.peak_tflops:.1f} TFLOP/s ({device.peak_source}), "
          f"budget {args.budget_s:.0f} s", flush=True)
    for family in args.families:
        family_started = time.perf_counter()
        if family_started > deadline:
            results = {key: "skipped: time budget" for key, _ in METRICS}
        elif device.cuda and args.partial is None:
            results = isolated(family, args, str(device.torch), deadline)
        else:
            results = {}
            save = (lambda r: args.partial.write_text(json.dumps(r))) if args.partial is not None else (lambda r: None)
            measure(results, ("_all",), lambda: {"_all": check_family(family, args, device, deadline, save)})
            results = results["_all"] if isinstance(results["_all"], dict) else \
                {key: results["_all"] for key, _ in METRICS}
        results["seconds"] = time.perf_counter() - family_started
        report["families"][family] = results
        print(f"[gpu_check] {family} done in {results['seconds']:.0f} s", flush=True)
        if args.json is not None:  # after every family: a run cut short keeps what it measured
            args.json.write_text(json.dumps(report, indent=1))
        gc.collect()
        if device.cuda:
            torch.cuda.empty_cache()
    report["seconds"] = time.perf_counter() - started
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help=f"comma-separated, run in this order (default {','.join(FAMILIES)})")
    ap.add_argument("--tiny", action="store_true", help="the tiny test models on CPU (the test suite runs this)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="wall-clock bound for the whole check")
    ap.add_argument("--device", help="torch device (default: cuda when available, cpu with --tiny)")
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--partial", type=Path, help=argparse.SUPPRESS)  # one family in this process, results saved here
    ap.add_argument("--compiled-family", help=argparse.SUPPRESS)  # --tiny: the one family whose levers compile
    args = ap.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    args.compiled_family = args.compiled_family or (args.families[0] if args.families else None)
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown or not args.families:
        ap.error(f"--families: unknown {unknown}; allowed: {', '.join(FAMILIES)}")
    if not args.budget_s > 0 or not math.isfinite(args.budget_s):
        ap.error(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    if args.json is not None and not args.json.parent.is_dir():
        ap.error(f"--json: folder {args.json.parent} does not exist")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = run(args)
    if args.partial is None:
        print(table(report), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"[gpu_check] wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
