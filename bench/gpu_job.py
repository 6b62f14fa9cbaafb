"""The whole job on one GPU, per model family at real size: `python -m learner.main` as a user runs it, with Ray pools,
the DeepSpeed learner and weight publishing, then a resume and the exported LoRA in the family's diffusers pipeline.

    python bench/gpu_job.py [--families sd3,flux,...] [--iterations 3] [--budget-s 420] [--json out.json]
    python bench/gpu_job.py --tiny      # the same on CPU with the tiny models (the test suite runs this)

Per family (smallest first, each in a job of its own, so a fault costs one column):
- the model: the published transformer and VAE configs (bench/real_configs.py) built with random weights on the
  device (`model.init: random`; the text encoders are random prompt embeddings of their shapes); with --tiny the
  offline tiny model, text encoders included, also with `model.init: random`;
- the job: the shipped cluster/<family>.yaml with one rollout actor, one learner rank (ZeRO-2, the config's precision,
  NCCL on a GPU, gloo on CPU) and the reward pool sharing the GPU by fractional `num_gpus`, a real-size random CLIP
  scorer of PickScore's architecture on the GPU plus JPEG compressibility, two groups of 8 per iteration, one update
  per iteration, the EMA updated at every update, no evaluation, a checkpoint at the end;
- a second job that resumes it for one more iteration (`--resume auto`);
- the exported LoRA (`iter-NNNNNN/lora`) loaded by the family's diffusers pipeline into the same random transformer:
  a layer per saved A/B pair, the loaded weights' norm the saved one's, and the velocity changed.

One table (metric x family): seconds per stage (mean over the iterations after the first), end-to-end images/s per
GPU, peak GPU memory and resident memory per actor (sampled every 0.5 s from the job's processes: nvidia-smi per
process, which includes the CUDA context and the allocator's cache), |rho - 1| at the first update between the rollout
process's recorded and the learner process's recomputed log-probs, and the resume and LoRA results.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

FAMILIES = ("sd3", "flux2", "z_image", "flux", "qwen_image")  # smallest first
ROLES = {"RolloutWorker": "rollout", "LearnerActor": "learner", "ScorerActor": "reward"}
GPU_SHARES = {"rollout": 0.4, "learner": 0.4, "reward": 0.1}  # one GPU, fractional num_gpus
GROUP_SIZE, GROUPS = 8, 2
METRICS = (
    ("shape", "resolution / steps / trained steps / images per iteration / micro-batch"),
    ("startup_s", "job start-up and shut-down s (pools, models)"),
    ("first_iteration_s", "first iteration s"),
    ("rollout_s", "rollout s / iteration"),
    ("reward_s", "reward s / iteration (after the rollout)"),
    ("train_s", "train s / iteration"),
    ("weight_sync_s", "weight sync s / iteration"),
    ("iteration_s", "iteration s"),
    ("checkpoint_s", "checkpoint s"),
    ("images_per_s_gpu", "end-to-end images/s per GPU (per process on CPU)"),
    ("gpu_gib", "peak GPU GiB rollout / learner / reward"),
    ("rss_gib", "peak resident GiB driver / rollout / learner / reward"),
    ("ratio_first", "abs(rho-1) max, first update, across processes"),
    ("resume", "resume for one iteration"),
    ("lora_load", "exported LoRA in the diffusers pipeline"),
)


class MemoryWatch:
    """Peak resident memory (and GPU memory, where nvidia-smi is) of a job's processes by role, sampled in a thread."""

    def __init__(self, pid: int, period_s: float = 0.5) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.period_s = period_s
        self.rss: dict[str, float] = {}
        self.gpu: dict[str, float] = {}
        self.smi = shutil.which("nvidia-smi")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _roles(self) -> dict[int, str]:
        import psutil

        roles = {self.root.pid: "driver"}
        try:
            children = self.root.children(recursive=True)
        except psutil.Error:
            return roles
        for proc in children:
            try:
                title = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            for key, role in ROLES.items():
                if f"ray::{key}" in title:
                    roles[proc.pid] = role
        return roles

    def _gpu_mib(self) -> dict[int, float]:
        if not self.smi:
            return {}
        out = subprocess.run([self.smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
        used = {}
        for line in out.splitlines():
            pid, _, mib = line.partition(",")
            if pid.strip().isdigit() and mib.strip().replace(".", "", 1).isdigit():
                used[int(pid)] = float(mib)
        return used

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.period_s):
            roles = self._roles()
            gpu = self._gpu_mib()
            for pid, role in roles.items():
                try:
                    gib = psutil.Process(pid).memory_info().rss / 2**30
                except psutil.Error:
                    continue
                self.rss[role] = max(self.rss.get(role, 0.0), gib)
                if pid in gpu:
                    self.gpu[role] = max(self.gpu.get(role, 0.0), gpu[pid] / 1024)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def job_config(family: str, folder: Path, clip: Path, args: argparse.Namespace, gpu: bool) -> dict[str, Any]:
    """The shipped config of `family` made into a one-GPU (or CPU) job on the random-weight model."""
    cfg = yaml.safe_load((ROOT / "cluster" / f"{family}.yaml").read_text())
    learner = cfg["learner"]
    micro = min(learner.get("micro_batch_size", 1), GROUP_SIZE)
    share = GPU_SHARES if gpu else dict.fromkeys(GPU_SHARES, 0.0)
    cfg.update(run_name=f"gpu-job-{family}", iterations=args.iterations, output_dir=str(folder / "run"))
    cfg["model"].update(path=str(folder / "model"), init="random", build_tiny=False)
    cfg["rollout"].update(num_actors=1, num_gpus_per_actor=share["rollout"], num_cpus_per_actor=0.5,
                          samples_per_forward=GROUP_SIZE)
    cfg["rewards"] = {
        "scorers": [
            {"name": "pickscore", "weight": 1.0, "num_gpus_per_actor": share["reward"],
             "options": {"path": str(clip), "processor_path": None, "init": "random",
                         "device": "cuda" if gpu else "cpu", "dtype": "bfloat16" if gpu else "float32"}},
            {"name": "jpeg_compressibility", "weight": 0.1, "num_gpus_per_actor": 0.0},
        ],
        "num_actors": 1, "num_cpus_per_actor": 0.25, "timeout_s": 600,
    }
    learner.update(num_actors=1, num_gpus_per_actor=share["learner"], num_cpus_per_actor=0.5,
                   updates_per_iteration=1, micro_batch_size=micro, ema={"every": 1})  # the exported LoRA moves
    cfg["data"] = {"source": "builtin", "group_size": GROUP_SIZE, "images_per_iteration": GROUP_SIZE * GROUPS}
    cfg["eval"] = {"every_n_iterations": 0}
    cfg["checkpoint"] = {"every_n_iterations": 0, "keep_last": 2}
    cfg["metrics"] = {"enabled": False}
    cfg["ray"] = {"num_cpus": max(2, os.cpu_count() or 2), **({"num_gpus": 1} if gpu else {})}
    if args.tiny:  # as bench/gpu_check.py --tiny: 64 px, 4 steps, float32
        cfg["model"].update(resolution=64, dtype="float32")
        cfg["sampler"].update(num_steps=4)
        cfg["sampler"].pop("fast_window", None)
        learner.update(precision="fp32")
    return cfg


def prepare(family: str, folder: Path, tiny: bool) -> Path:
    """The model folder (published configs, or the tiny model) and the CLIP scorer's folder; returns the latter."""
    from real_configs import PICKSCORE_CLIP, TINY_CLIP, write_clip_folder, write_model_folder

    if tiny:
        from rollout.models.tiny import ensure_tiny

        ensure_tiny(family, folder / "model")
    else:
        write_model_folder(family, folder / "model")
    return write_clip_folder(TINY_CLIP if tiny else PICKSCORE_CLIP, folder / "clip")


def run_job(config: Path, timeout_s: float, *extra: str) -> tuple[int, float, MemoryWatch, str]:
    """`python -m learner.main --cfg config`: (exit code, seconds, memory watch, the output's tail)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "learner.main", "--cfg", str(config), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch = MemoryWatch(proc.pid)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: [lines.append(line) or print("   ", line, end="", flush=True)
                                              for line in proc.stdout], daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        code = proc.wait()
        lines.append(f"timed out after {timeout_s:.0f} s\n")
    reader.join(timeout=10)
    watch.stop()
    return code, time.perf_counter() - started, watch, "".join(lines[-20:])


def failure(code: int, tail: str) -> str:
    last = [line for line in tail.splitlines() if line.strip()][-1:] or [""]
    return f"error: exit {code}: {last[0][:150]}"


def mean(values: list[float]) -> float | str:
    return sum(values) / len(values) if values else "n/a (one iteration)"


def stage_figures(history: list[dict[str, Any]], cfg: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Stage seconds (mean over the iterations after the first), images/s, the first update's ratio."""
    steady = history[1:]
    times = {stage: mean([h["times"][stage] for h in steady if stage in h["times"]])
             for stage in ("rollout", "reward", "train", "weight_sync", "iteration")}
    checkpoints = [h["times"]["checkpoint"] for h in history if "checkpoint" in h["times"]]
    images = cfg["data"]["images_per_iteration"]
    iteration = times["iteration"] if not isinstance(times["iteration"], str) else history[0]["times"]["iteration"]
    return {
        "startup_s": seconds - sum(h["times"]["iteration"] for h in history),
        "first_iteration_s": history[0]["times"]["iteration"],
        **{f"{stage}_s": value for stage, value in times.items()},
        "checkpoint_s": checkpoints[-1] if checkpoints else "error: no checkpoint written",
        "images_per_s_gpu": images / iteration,  # one GPU (or one CPU job)
        "ratio_first": history[0].get("ratio_max_dev_first", "error: not in history"),
    }


def lora_check(family: str, cfg: dict[str, Any], lora: Path, device: str) -> str:
    """The exported LoRA loaded by the family's diffusers pipeline into the same random transformer: how many layers
    it wraps and how much it changes the velocity at one fixed input."""
    import diffusers
    import torch
    from safetensors.torch import load_file

    from rollout.models.loading import load_flow_model

    m, s = cfg["model"], cfg["sampler"]
    dtype = getattr(torch, m["dtype"])
    model = load_flow_model(m["path"], family, dtype=dtype, device=device, random_seed=m.get("init_seed", 0),
                            max_sequence_length=m.get("max_sequence_length"))
    size = m["resolution"]
    x = torch.randn(model.latent_shape(1, size, size), generator=torch.Generator().manual_seed(0)).to(device)
    embeds = model.encode_prompts(["a photo of a cat"])

    def velocity() -> torch.Tensor:
        with torch.no_grad():
            g = s["guidance_scale"]
            negative = model.negative_embeds() if model.guides(g) else None
            return model.velocity(x, 0.5, embeds, guidance_scale=g, negative=negative, image_size=(size, size)).float()

    before = velocity()
    pipeline = getattr(diffusers, model.pipeline)
    names = [n for n in inspect.signature(pipeline.__init__).parameters if n.startswith(("text_encoder", "tokenizer"))]
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    pipe = pipeline(transformer=model.transformer, vae=model.vae, scheduler=scheduler, **dict.fromkeys(names))
    pipe.load_lora_weights(str(lora))
    layers = sum(1 for module in model.transformer.modules() if hasattr(module, "lora_A"))
    saved = load_file(str(lora / "pytorch_lora_weights.safetensors"))
    norm_saved = math.sqrt(sum(float(t.double().square().sum()) for t in saved.values()))
    lora_params = [p.detach() for name, p in model.transformer.named_parameters() if "lora_" in name]
    norm_loaded = math.sqrt(sum(float(p.double().square().sum()) for p in lora_params))
    change = float((velocity() - before).abs().max() / before.abs().max())
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-6
    if layers != len(saved) // 2 or not math.isclose(norm_loaded, norm_saved, rel_tol=tolerance) or not change > 0:
        return (f"error: {layers} layers for {len(saved)} saved tensors, norm {norm_loaded:.4g} loaded, "
                f"{norm_saved:.4g} saved, velocity changed by {change:.3g}")
    return f"ok: {layers} layers as saved, velocity changed by {change:.2g} (relative max)"


def check_family(family: str, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    gpu = not args.tiny
    folder = args.out / family
    shutil.rmtree(folder, ignore_errors=True)
    clip = prepare(family, folder, args.tiny)
    cfg = job_config(family, folder, clip, args, gpu)
    config = folder / "job.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    s, lc = cfg["sampler"], cfg["learner"]
    trained = s.get("trained_steps") or (s.get("fast_window") or {}).get("size") or s["num_steps"] - 1
    results: dict[str, Any] = {"shape": f"{cfg['model']['resolution']} px / {s['num_steps']} / {trained} / "
                                        f"{cfg['data']['images_per_iteration']} / {lc['micro_batch_size']}"}
    print(f"[gpu_job] {family}: {args.iterations} iterations ({'tiny, CPU' if args.tiny else 'real size, GPU'})",
          flush=True)
    code, seconds, watch, tail = run_job(config, max(1.0, deadline - time.perf_counter()))
    results["gpu_gib"] = [watch.gpu.get(role, "n/a") for role in ("rollout", "learner", "reward")] if gpu \
        else "n/a (no CUDA)"
    results["rss_gib"] = [watch.rss.get(role, "n/a") for role in ("driver", "rollout", "learner", "reward")]
    history_file = Path(cfg["output_dir"]) / "history.jsonl"
    history = [json.loads(line) for line in history_file.read_text().splitlines()] if history_file.is_file() else []
    if code != 0 or len(history) != args.iterations:
        reason = failure(code, tail) if code else f"error: {len(history)} of {args.iterations} iterations in history"
        return {**results, **{key: reason for key, _ in METRICS if key not in results}}
    results.update(stage_figures(history, cfg, seconds))

    cfg_resume = {**cfg, "iterations": args.iterations + 1}
    (folder / "resume.yaml").write_text(yaml.safe_dump(cfg_resume, sort_keys=False))
    code, _, _, tail = run_job(folder / "resume.yaml", max(1.0, deadline - time.perf_counter()), "--resume", "auto")
    lines = [json.loads(line) for line in history_file.read_text().splitlines()]
    last = lines[-1]
    if code == 0 and len(lines) == args.iterations + 1 and last["policy_version"] == args.iterations + 1:
        results["resume"] = f"ok: iteration {last['iteration']} at policy version {last['policy_version']}"
    else:
        results["resume"] = failure(code, tail) if code else f"error: history ends at {last}"

    lora = Path(cfg["output_dir"]) / "checkpoints" / f"iter-{args.iterations:06d}" / "lora"
    try:
        results["lora_load"] = lora_check(family, cfg, lora, "cuda" if gpu else "cpu")
    except Exception as e:  # noqa: BLE001 — reported in the table
        from cluster.errors import described

        results["lora_load"] = f"error: {described(e)}"
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    deadline = started + args.budget_s
    report: dict[str, Any] = {"tiny": args.tiny, "iterations": args.iterations, "families": {}, **versions()}
    for i, family in enumerate(args.families):
        family_started = time.perf_counter()
        if family_started > deadline:
            results = {key: "skipped: time budget" for key, _ in METRICS}
        else:
            share = family_started + (deadline - family_started) / (len(args.families) - i)
            results = check_family(family, args, share if i < len(args.families) - 1 else deadline)
        results["seconds"] = time.perf_counter() - family_started
        report["families"][family] = results
        print(f"[gpu_job] {family} done in {results['seconds']:.0f} s", flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=1))
    report["seconds"] = time.perf_counter() - started
    return report


def versions() -> dict[str, str]:
    import importlib.metadata as md

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    found = {"device": device}
    for name in ("torch", "ray", "deepspeed", "diffusers", "transformers", "peft"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "missing"
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated (default {','.join(FAMILIES)})")
    ap.add_argument("--tiny", action="store_true", help="the tiny models on CPU (the test suite runs this)")
    ap.add_argument("--iterations", type=int, default=3, help="iterations of the first job (default 3; >= 2)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock bound for the whole run")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_job", help="where the jobs write")
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown or not args.families:
        ap.error(f"--families: unknown {unknown}; allowed: {', '.join(FAMILIES)}")
    if args.iterations < 2:
        ap.error(f"--iterations must be >= 2 (the first iteration warms up), got {args.iterations}")
    if not args.budget_s > 0 or not math.isfinite(args.budget_s):
        ap.error(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    if args.json is not None and not args.json.parent.is_dir():
        ap.error(f"--json: folder {args.json.parent} does not exist")
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA device here: the real-size job needs a GPU (--tiny runs the same code on CPU)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = run(args)
    print(f"[gpu_job] {report['device']}, torch {report['torch']}, ray {report['ray']}, deepspeed "
          f"{report['deepspeed']}, diffusers {report['diffusers']}")
    from gpu_check import table

    print(table(report, METRICS, width=70), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"[gpu_job] wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
