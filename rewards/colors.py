"""Colour of detected objects over GenEval's ten colours: zero-shot CLIP (as GenEval does) or an HSV heuristic.

`ClipColors` follows GenEval: the object's crop (masked onto grey #999 when a mask exists), scored against the mean of
three prompt templates per colour; GenEval uses open_clip ViT-L-14 "openai", the same weights as the transformers
checkpoint `openai/clip-vit-large-patch14`. `HSVColors` needs no model: it votes per pixel by hue, saturation and value
over the object's mask, or, for box-only detectors, over a GrabCut foreground of the box. It is weaker: thin objects
(a bicycle frame), shadows and multi-coloured objects fool it, so use it when no CLIP checkpoint is at hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import cv2
import numpy as np

from rewards.geneval_rules import Detection

COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
CLIP_TEMPLATES: tuple[str, ...] = ("a photo of a {color} {object}", "a photo of a {color}-colored {object}",
                                   "a photo of a {color} object")
CROP_BACKGROUND = (153, 153, 153)  # GenEval's "#999" behind masked crops


class ColorClassifier(Protocol):
    """Names one of COLORS for each detection of `class_name` in an RGB uint8 image (H, W, 3)."""

    def classify(self, image: np.ndarray, detections: Sequence[Detection], class_name: str) -> list[str]: ...


def _box_ints(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The box rounded and clipped to the image, at least one pixel wide and high."""
    x0 = int(np.clip(round(box[0]), 0, width - 1))
    y0 = int(np.clip(round(box[1]), 0, height - 1))
    x1 = int(np.clip(round(box[2]), x0 + 1, width))
    y1 = int(np.clip(round(box[3]), y0 + 1, height))
    return x0, y0, x1, y1


# ----------------------------------------------------------------------------------------------------------- HSV


def pixel_colors(rgb: np.ndarray) -> np.ndarray:
    """Index into COLORS for each RGB uint8 pixel (..., 3): achromatic by value, else by hue with dark/pale variants."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8).reshape(-1, 1, 3), cv2.COLOR_RGB2HSV_FULL)
    hsv = hsv.reshape(-1, 3).astype(np.float32)
    hue, sat, val = hsv[:, 0] * (360.0 / 256.0), hsv[:, 1] / 255.0, hsv[:, 2] / 255.0
    idx = {name: i for i, name in enumerate(COLORS)}
    out = np.full(hue.shape, idx["black"], dtype=np.int64)
    gray = (sat < 0.2) | (val < 0.2)
    out[gray & (val >= 0.6)] = idx["white"]
    bands = [  # (hue band, colour); dark and pale variants are reassigned below
        ((hue < 15) | (hue >= 345), "red"),
        ((hue >= 15) & (hue < 45), "orange"),
        ((hue >= 45) & (hue < 70), "yellow"),
        ((hue >= 70) & (hue < 170), "green"),
        ((hue >= 170) & (hue < 260), "blue"),
        ((hue >= 260) & (hue < 290), "purple"),
        ((hue >= 290) & (hue < 345), "pink"),
    ]
    for band, name in bands:
        out[~gray & band] = idx[name]
    chroma = ~gray
    red, orange, yellow, pink = (chroma & bands[i][0] for i in (0, 1, 2, 6))
    out[red & (sat < 0.5) & (val > 0.7)] = idx["pink"]
    out[red & (val < 0.45)] = idx["brown"]
    out[orange & ((val < 0.6) | (sat < 0.45))] = idx["brown"]
    out[yellow & (val < 0.4)] = idx["brown"]
    out[pink & (val < 0.45)] = idx["purple"]
    return out.reshape(rgb.shape[:-1])


def grabcut_pixels(image: np.ndarray, box: Sequence[float], max_side: int = 128, iterations: int = 3) -> np.ndarray:
    """RGB pixels (K, 3) GrabCut calls foreground inside the box (on a downscaled crop); all box pixels if it fails."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = _box_ints(box, width, height)
    mx, my = max(2, (x1 - x0) // 10), max(2, (y1 - y0) // 10)
    cx0, cy0, cx1, cy1 = max(0, x0 - mx), max(0, y0 - my), min(width, x1 + mx), min(height, y1 + my)
    crop = image[cy0:cy1, cx0:cx1]
    scale = min(1.0, max_side / max(crop.shape[:2]))
    small = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else crop
    sh, sw = small.shape[:2]
    rx0, ry0 = max(1, int((x0 - cx0) * scale)), max(1, int((y0 - cy0) * scale))
    rx1, ry1 = min(sw - 1, int(round((x1 - cx0) * scale))), min(sh - 1, int(round((y1 - cy0) * scale)))
    box_pixels = image[y0:y1, x0:x1].reshape(-1, 3)
    if rx1 - rx0 < 4 or ry1 - ry0 < 4:
        return box_pixels
    mask = np.zeros((sh, sw), np.uint8)
    try:
        cv2.grabCut(np.ascontiguousarray(small[..., ::-1]), mask, (rx0, ry0, rx1 - rx0, ry1 - ry0),
                    np.zeros((1, 65)), np.zeros((1, 65)), iterations, cv2.GC_INIT_WITH_RECT)
    except cv2.error:
        return box_pixels
    foreground = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    if foreground.sum() < 0.05 * (rx1 - rx0) * (ry1 - ry0):
        return box_pixels
    return small[foreground]


class HSVColors:
    """Majority colour of the object's pixels (mask, else GrabCut in the box) by a fixed HSV partition; no model."""

    def __init__(self, grabcut_side: int = 128) -> None:
        self.grabcut_side = grabcut_side

    def object_pixels(self, image: np.ndarray, det: Detection) -> np.ndarray:
        """RGB pixels (K, 3) of the object: its mask when it has one, else GrabCut's foreground of its box."""
        if det.mask is not None and det.mask.any():
            return image[det.mask.astype(bool)]
        return grabcut_pixels(image, det.box, self.grabcut_side)

    def classify(self, image: np.ndarray, detections: Sequence[Detection], class_name: str) -> list[str]:
        votes = [np.bincount(pixel_colors(self.object_pixels(image, det)), minlength=len(COLORS))
                 for det in detections]
        return [COLORS[int(np.argmax(v))] for v in votes]


# ---------------------------------------------------------------------------------------------------------- CLIP


def object_crop(image: np.ndarray, det: Detection, background: tuple[int, int, int] = CROP_BACKGROUND) -> np.ndarray:
    """The detection's box crop, pixels outside its mask (if any) painted `background`, as GenEval crops for CLIP."""
    height, width = image.shape[:2]
    if det.mask is not None:
        image = np.where(det.mask.astype(bool)[..., None], image, np.array(background, dtype=np.uint8))
    x0, y0, x1, y1 = _box_ints(det.box, width, height)
    return np.ascontiguousarray(image[y0:y1, x0:x1])


class ClipColors:
    """Zero-shot CLIP over COLORS with GenEval's three templates, from a local path or hub id of a CLIP checkpoint."""

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 16) -> None:
        import torch

        from rewards.clip_common import ClipEncoder, load_clip_model, load_clip_processor, torch_device

        dev = torch_device("geneval", device)
        clip = load_clip_model("geneval", model, dtype=torch.float32, device=dev, option="clip_model")
        processor = load_clip_processor("geneval", model, option="clip_model")
        self.encoder = ClipEncoder(clip, processor, dev, batch_size)
        self._classifiers: dict[str, object] = {}

    def _classifier(self, class_name: str) -> object:
        """(D, 10) unit text embeddings, one column per colour: mean of the unit template embeddings, renormalised."""
        if class_name not in self._classifiers:
            texts = [t.format(color=c, object=class_name) for c in COLORS for t in CLIP_TEMPLATES]
            emb = self.encoder.texts(texts).reshape(len(COLORS), len(CLIP_TEMPLATES), -1).mean(dim=1)
            self._classifiers[class_name] = (emb / emb.norm(dim=-1, keepdim=True)).T
        return self._classifiers[class_name]

    def classify(self, image: np.ndarray, detections: Sequence[Detection], class_name: str) -> list[str]:
        if not detections:
            return []
        crops = [object_crop(image, det) for det in detections]
        logits = self.encoder.images(crops) @ self._classifier(class_name)
        return [COLORS[int(i)] for i in logits.argmax(dim=1)]


def build_colors(clip_model: str | None = None, device: str = "cpu") -> ColorClassifier:
    """CLIP zero-shot when a CLIP checkpoint (local path or hub id) is given, else the HSV heuristic."""
    return ClipColors(clip_model, device) if clip_model else HSVColors()
