"""Evaluation: ODE samples of fixed prompts and seeds, scored by the job's rewards, saved as PNG grids of at most
PAGE_SIZE images, and appended to output_dir/eval/results.jsonl (one line per evaluation, iteration 0 included)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.config import JobConfig
from rewards.service import RewardService
from rollout.pool import RolloutPool
from rollout.prompts.sources import eval_prompts

PAGE_SIZE = 64  # images per grid page: 8 x 8


def evaluate(cfg: JobConfig, pool: RolloutPool, rewards: RewardService, weights: Any, iteration: int) -> dict[str, Any]:
    """ODE samples of the fixed evaluation prompts and seeds with `weights` ([ref], meta) (the EMA; the policy when
    None), each batch scored by reference: PNG grid pages under output_dir/eval (`grids`; `grid` the first) and the
    mean of each scorer (GenEval per-tag accuracy when it is on). Only the grids' pixels come to the driver."""
    import ray

    items = eval_prompts(cfg.eval)
    seeds = [cfg.eval.seed + i for i in range(len(items))]
    batches = pool.sample_eval([i.prompt for i in items], seeds, weights)
    images = torch.cat(ray.get(batches))  # for the grids; raises here if a rollout actor was lost
    size = cfg.eval.batch_size
    handles = []
    try:  # ids -1, -2, ...: never a training group's; whatever happens, none is left to the next evaluation
        for b, (ref, at) in enumerate(zip(batches, range(0, len(items), size))):
            handles.append(rewards.submit(ref, [i.prompt for i in items[at:at + size]],
                                          [i.metadata for i in items[at:at + size]], group_id=-1 - b))
        scored = [rewards.collect(handle) for handle in handles]
    finally:
        for handle in handles:
            rewards.drop(handle)
    scores = {name: np.concatenate([s.scores[name] for s in scored]) for name in scored[0].scores}
    result: dict[str, Any] = {name: float(s.mean()) for name, s in scores.items()}
    if "geneval/accuracy" in scored[0].metrics:
        tags = [i.metadata.get("tag", "?") for i in items]
        acc = np.concatenate([s.metrics["geneval/accuracy"] for s in scored])
        result["geneval_accuracy_by_tag"] = {t: float(np.mean([a for a, tt in zip(acc, tags) if tt == t]))
                                             for t in sorted(set(tags))}
    folder = Path(cfg.output_dir) / "eval"
    result["grids"] = save_pages(images, folder, f"iter-{iteration:06d}")
    result["grid"] = result["grids"][0]
    with open(folder / "results.jsonl", "a") as f:
        f.write(json.dumps({"iteration": iteration, **result}) + "\n")
    return result


def save_pages(images: torch.Tensor, folder: Path, stem: str) -> list[str]:
    """Grid pages of at most PAGE_SIZE images in order: `stem`.png, or `stem`-p1.png, -p2, ... when there are more."""
    pages = max(1, math.ceil(len(images) / PAGE_SIZE))
    paths = [folder / (f"{stem}-p{page + 1}.png" if pages > 1 else f"{stem}.png") for page in range(pages)]
    for page, path in enumerate(paths):
        save_grid(images[page * PAGE_SIZE:(page + 1) * PAGE_SIZE], path)
    return [str(path) for path in paths]


def save_grid(images: torch.Tensor, path: Path) -> None:
    """uint8 (N, H, W, 3) images as one PNG grid, written atomically."""
    from PIL import Image

    n, h, w, _ = images.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images.numpy()):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid).save(tmp, format="PNG")
    tmp.replace(path)
