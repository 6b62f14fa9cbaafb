"""Per-image latency of the offline scorers: OCR (rapidocr) and GenEval (SSD-MobileNet, HSV colours), on this machine.

Usage: .venv/bin/python bench/reward_latency.py [--sizes 512 1024] [--batch 8] [--repeats 3]
OCR images are rendered text; GenEval images are Debian's darknet sample photos (tests/fixtures/fetch_darknet_photos.sh)
resized square, or noise when those are missing. Reports the best and the median over repeats of one batch, per
image (on a shared machine the best is the closer estimate of the scorer's own cost).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewards.registry import build  # noqa: E402

TEXTS = ("Open Late", "Forever Yours", "Step Goal Achieved", "Try Our New Burger", "Lost City Near",
         "Fuel Low", "Spring Sale", "Welcome Home")
DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


def text_images(size: int, n: int) -> np.ndarray:
    """n images of dark text on light backgrounds, (n, size, size, 3)."""
    font_size = size // 12
    font = ImageFont.truetype(str(DEJAVU), font_size) if DEJAVU.is_file() else ImageFont.load_default(size=font_size)
    out = []
    for i in range(n):
        image = Image.new("RGB", (size, size), (236, 228 - 10 * (i % 4), 205))
        ImageDraw.Draw(image).text((size // 10, size // 2), TEXTS[i % len(TEXTS)], font=font, fill=(20, 24, 60))
        out.append(np.asarray(image))
    return np.stack(out)


def photos(size: int, n: int) -> tuple[np.ndarray, str]:
    """n darknet photos resized to size × size (cycled), or noise when they are missing."""
    files = sorted((ROOT / ".cache/darknet-photos").glob("*.jpg"))
    if not files:
        return np.random.default_rng(0).integers(0, 255, (n, size, size, 3), dtype=np.uint8), "noise"
    ims = [np.asarray(Image.open(files[i % len(files)]).convert("RGB").resize((size, size))) for i in range(n)]
    return np.stack(ims), "photos"


def per_image_ms(scorer, images: np.ndarray, prompts: list[str], metas: list[dict], repeats: int) -> str:
    """Best and median over repeats of one batch's wall time, divided by the batch size, in ms."""
    scorer(images[:1], prompts[:1], metas[:1])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        scorer(images, prompts, metas)
        times.append(time.perf_counter() - start)
    best, median = (1000 * t / len(images) for t in (min(times), statistics.median(times)))
    return f"{best:6.0f} {median:8.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rows = []
    start = time.perf_counter()
    ocr = build("ocr")
    rows.append(("ocr (rapidocr) init", "-", f"{1000 * (time.perf_counter() - start):6.0f}"))
    start = time.perf_counter()
    geneval = build("geneval")
    rows.append(("geneval-ssd init", "-", f"{1000 * (time.perf_counter() - start):6.0f}"))

    n = args.batch
    single = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    colour = {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "black"},
                                               {"class": "horse", "count": 1, "color": "white"}]}
    for size in args.sizes:
        images = text_images(size, n)
        prompts = [f'a sign that says "{TEXTS[i % len(TEXTS)]}"' for i in range(n)]
        rows.append((f"ocr {size}px", n, per_image_ms(ocr, images, prompts, [{}] * n, args.repeats)))
        images, kind = photos(size, n)
        for name, meta in (("detection only", single), ("+ HSV colours", colour)):
            ms = per_image_ms(geneval, images, ["a photo"] * n, [meta] * n, args.repeats)
            rows.append((f"geneval-ssd {size}px {name} ({kind})", n, ms))

    width = max(len(r[0]) for r in rows)
    print(f"{'scorer (ms per image; init: ms once)':<{width}}  batch   best   median")
    for name, batch, value in rows:
        print(f"{name:<{width}}  {batch!s:>5}  {value}")


if __name__ == "__main__":
    main()
