"""Per-image latency of the JPEG, PickScore, HPSv2 and aesthetic scorers, in process and through the RewardService.

    .venv/bin/python bench/reward_service.py                        # real architectures on CPU, 2 images a batch
    .venv/bin/python bench/reward_service.py --size tiny --images 16  # the tiny test CLIP: a quick check
    .venv/bin/python bench/reward_service.py --device cuda --dtype bfloat16 --images 32

The CLIP scorers are built at their real architectures with random weights (no checkpoint is read or fetched):
PickScore and HPSv2 on CLIP ViT-H-14 (HPSv2 after conversion is the same transformers CLIPModel), aesthetic on CLIP
ViT-L/14 + the improved-aesthetic-predictor MLP, so the compute per image is that of the real models. Prompts go
through an offline byte-level tokenizer (longer token sequences than CLIP's BPE; one distinct prompt per group, as in
training, so text encoding is a small share). Rows report the median over `--repeats` batches after one warm-up
batch. The service row sends groups of `--group-size` images to `--actors` JPEG actors of `--cpus-per-actor` CPUs.
Timings on a shared machine vary up to 2x from run to run: compare rows of one run.
"""

from __future__ import annotations

import os

# Before anything imports ray: keep the local Ray on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewards.base import Scorer  # noqa: E402
from rewards.clip_common import torch_dtype  # noqa: E402

# name -> (text width, layers, heads, MLP), (vision width, layers, heads, MLP, patch, image), projection, activation
ARCHITECTURES = {
    "ViT-H-14": ((1024, 24, 16, 4096), (1280, 32, 16, 5120, 14, 224), 1024, "gelu"),
    "ViT-L-14": ((768, 12, 12, 3072), (1024, 24, 16, 4096, 14, 224), 768, "quick_gelu"),
    "tiny": ((32, 2, 4, 64), (48, 2, 4, 96, 8, 32), 16, "gelu"),
}
PROMPT = "a photo of a red bicycle leaning against a blue wall"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["real", "tiny"], default="real", help="real architectures or the tiny CLIP")
    ap.add_argument("--images", type=int, default=2, help="images per scorer call (batch)")
    ap.add_argument("--repeats", type=int, default=2, help="timed batches per row (median reported)")
    ap.add_argument("--resolution", type=int, default=512, help="generated image height and width")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--only", nargs="*", default=["jpeg_compressibility", "pickscore", "hpsv2", "aesthetic"],
                    help="scorers to time")
    ap.add_argument("--no-service", action="store_true", help="skip the RewardService row")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=float, default=0.5)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--groups", type=int, default=4)
    return ap.parse_args(argv)


def clip_parts(arch: str, device: str, dtype: str) -> tuple[torch.nn.Module, object]:
    """A random-weight transformers CLIPModel of `arch` and an offline processor (224 px or the tiny size)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from rollout.models.tiny import clip_tokenizer

    (tw, tl, th, tm), (vw, vl, vh, vm, patch, image), projection, act = ARCHITECTURES[arch]
    tokenizer = clip_tokenizer()
    text = dict(vocab_size=49408, hidden_size=tw, num_hidden_layers=tl, num_attention_heads=th, intermediate_size=tm,
                max_position_embeddings=77, hidden_act=act, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=vw, num_hidden_layers=vl, num_attention_heads=vh, intermediate_size=vm, patch_size=patch,
                  image_size=image, hidden_act=act)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)
    model = CLIPModel._from_config(config, dtype=torch_dtype("bench", dtype)).to(device).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image}, crop_size={"height": image, "width": image})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_scorer(name: str, args: argparse.Namespace) -> tuple[Scorer, str]:
    """The scorer `name` at the benchmarked size, and a description of its architecture."""
    from rewards.aesthetic import Aesthetic
    from rewards.hpsv2 import HPSv2
    from rewards.jpeg import JpegCompressibility
    from rewards.pickscore import PickScore

    big, small = ("ViT-H-14", "ViT-L-14") if args.size == "real" else ("tiny", "tiny")
    batch = max(args.images, 1)
    if name == "jpeg_compressibility":
        return JpegCompressibility(), "PIL JPEG q95"
    if name == "pickscore":
        return PickScore.from_model(*clip_parts(big, args.device, args.dtype), device=args.device,
                                    batch_size=batch), f"CLIP {big}"
    if name == "hpsv2":
        return HPSv2.from_model(*clip_parts(big, args.device, args.dtype), device=args.device,
                                batch_size=batch), f"CLIP {big}"
    if name == "aesthetic":
        model, processor = clip_parts(small, args.device, args.dtype)
        width = model.config.projection_dim
        head = torch.nn.Sequential(torch.nn.Linear(width, 1024), torch.nn.Linear(1024, 128), torch.nn.Linear(128, 64),
                                   torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
        return Aesthetic.from_model(model, processor, head, device=args.device,
                                    batch_size=batch), f"CLIP {small} + MLP"
    raise ValueError(f"no benchmark for {name!r}")


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    """Median wall time of `call` over `repeats` runs, after one warm-up run."""
    call()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def service_row(args: argparse.Namespace, images: np.ndarray) -> tuple[str, ...]:
    """Per-image latency of JPEG scoring through a RewardService of `args.actors` actors, whole groups in flight."""
    import ray

    from cluster.config import RayConfig, RewardsConfig
    from cluster.runtime import start_ray
    from rewards.service import RewardService

    start_ray(RayConfig(num_cpus=os.cpu_count() or 2, namespace="bench"))
    try:
        cfg = RewardsConfig(scorers=[{"name": "jpeg_compressibility"}], num_actors=args.actors,
                            num_cpus_per_actor=args.cpus_per_actor)
        service = RewardService(cfg)
        group = images[: args.group_size]
        prompts = [PROMPT] * len(group)

        def run() -> None:
            handles = [service.submit(group, prompts, group_id=g) for g in range(args.groups)]
            for handle in handles:
                service.collect(handle)

        seconds = median_seconds(run, args.repeats)
        service.shutdown()
    finally:
        ray.shutdown()
    n = args.groups * len(group)
    return (f"jpeg_compressibility via RewardService", f"{args.actors} actors x {args.cpus_per_actor:g} CPU",
            f"{args.groups} x {len(group)}", f"{1000 * seconds / n:.1f}", f"{n / seconds:.2f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    count = max(args.images, args.group_size)
    # smooth random images (JPEG size depends on content: pure noise would be the worst case)
    coarse = rng.integers(0, 256, (count, args.resolution // 16, args.resolution // 16, 3), dtype=np.uint8)
    images = coarse.repeat(16, axis=1).repeat(16, axis=2)
    batch, prompts = images[: args.images], [PROMPT] * args.images
    print(f"torch threads: {torch.get_num_threads()}, device {args.device}, dtype {args.dtype}, "
          f"{args.resolution}px images")

    rows = [("scorer", "model", "batch", "ms / image", "images / s")]
    for name in args.only:
        began = time.perf_counter()
        scorer, arch = build_scorer(name, args)
        print(f"built {name} ({arch}) in {time.perf_counter() - began:.1f}s", flush=True)
        seconds = median_seconds(lambda: scorer(batch, prompts), args.repeats)
        rows.append((name, arch, str(args.images), f"{1000 * seconds / args.images:.1f}",
                     f"{args.images / seconds:.2f}"))
        del scorer
    if not args.no_service:
        rows.append(service_row(args, images))

    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
