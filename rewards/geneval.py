"""GenEval scorer: a COCO detector and a colour classifier feed GenEval's rules (rewards/geneval_rules.py).

`scores` is the partial-credit training reward; `metrics` carries the official `accuracy` (evaluation, per-tag tables)
and `strict_accuracy` (training diagnostic), each 0.0 or 1.0 per image. Metadata per image is GenEval's: `tag`,
`include` [{class, count, color?, position?: [relation, index]}], optional `exclude` [{class, count}].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from rewards.base import RewardInputError, Scorer, ScoreResult
from rewards.clip_common import find_pretrained
from rewards.colors import COLORS, build_colors
from rewards.detectors import build_detector, detector_class, ssd_files
from rewards.geneval_rules import RELATIONS, Detection, accuracy, group_by_class, partial_reward, strict_accuracy


class GenEvalScorer(Scorer):
    """GenEval over a detector backend ("ssd_mobilenet" offline, or "mask2former" with `detector_model`).

    Colours by CLIP zero-shot when `clip_model` is given, else the weaker HSV heuristic. Checkpoints given as hub
    ids are read from the local Hugging Face cache, downloaded there first when missing (unless HF_HUB_OFFLINE=1).
    """

    name = "geneval"
    path_options = {"detector_model": "model", "clip_model": "model"}

    @classmethod
    def check(cls, detector: str = "ssd_mobilenet", detector_model: str | None = None,
              threshold: float | None = None, counting_threshold: float | None = None,
              clip_model: str | None = None, device: str = "cpu") -> None:
        detector_class(detector)
        if detector == "mask2former":
            if not detector_model:
                raise ValueError("detector 'mask2former' needs detector_model (local path or hub id of a checkpoint, "
                                 "e.g. facebook/mask2former-swin-small-coco-instance)")
            find_pretrained(cls.name, detector_model, option="detector_model")
        else:
            ssd_files(detector_model)
        if clip_model:
            find_pretrained(cls.name, clip_model, option="clip_model")
            find_pretrained(cls.name, clip_model, option="clip_model", kind="processor")

    def __init__(self, detector: str = "ssd_mobilenet", detector_model: str | None = None,
                 threshold: float | None = None, counting_threshold: float | None = None,
                 clip_model: str | None = None, device: str = "cpu") -> None:
        self.check(detector=detector, detector_model=detector_model, threshold=threshold,
                   counting_threshold=counting_threshold, clip_model=clip_model, device=device)
        options: dict[str, Any] = {"threshold": threshold, "counting_threshold": counting_threshold}
        if detector == "mask2former":
            options.update(model=detector_model, device=device)
        elif detector_model:
            options["model_dir"] = detector_model
        self.detector = build_detector(detector, **{k: v for k, v in options.items() if v is not None})
        self.colors = build_colors(clip_model, device)

    def score(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> ScoreResult:
        for index, (prompt, meta) in enumerate(zip(prompts, metadata)):
            self._check(index, prompt, meta)
        rewards, official, strict = (np.zeros(len(images), np.float32) for _ in range(3))
        for index, (image, dets, meta) in enumerate(zip(images, self.detector.detect(images), metadata)):
            objects = self.objects(image, dets, meta)
            rewards[index] = partial_reward(objects, meta)
            official[index] = accuracy(objects, meta)
            strict[index] = strict_accuracy(objects, meta)
        return ScoreResult(rewards, {"accuracy": official, "strict_accuracy": strict})

    def objects(self, image: np.ndarray, detections: list[Detection], meta: Mapping[str, Any]
                ) -> dict[str, list[Detection]]:
        """Detections kept by the backend's threshold for this tag, by class, coloured where a clause names a colour."""
        counting = meta.get("tag") == "counting"
        min_score = self.detector.counting_threshold if counting else self.detector.threshold
        objects = group_by_class(detections, min_score, self.detector.max_per_class)
        for name in {c["class"] for c in meta["include"] if "color" in c and c["class"] in objects}:
            colors = self.colors.classify(image, objects[name], name)
            objects[name] = [replace(det, color=color) for det, color in zip(objects[name], colors)]
        return objects

    def _check(self, index: int, prompt: str, meta: Mapping[str, Any]) -> None:
        """GenEval metadata this backend can score, or a RewardInputError naming the prompt."""
        def fail(why: str) -> RewardInputError:
            return RewardInputError(f"GenEval metadata of prompt {index} ({prompt!r}): {why}")

        include = meta.get("include") if isinstance(meta, Mapping) else None
        if not isinstance(include, list) or not include:
            raise fail(f"needs a non-empty 'include' list, got {meta!r}")
        for position, clause in enumerate(include + list(meta.get("exclude", []))):
            if not isinstance(clause, Mapping) or clause.get("class") not in self.detector.class_names:
                raise fail(f"clause {clause!r} names no class this detector knows")
            if not isinstance(clause.get("count"), int) or clause["count"] < 1:
                raise fail(f"clause {clause!r} needs an integer count >= 1")
            if "color" in clause and clause["color"] not in COLORS:
                raise fail(f"unknown colour {clause['color']!r}; valid: {', '.join(COLORS)}")
            if "position" in clause:
                relation, target = clause["position"]
                if relation not in RELATIONS or not (isinstance(target, int) and 0 <= target < position):
                    raise fail(f"position {clause['position']!r} needs a relation in {RELATIONS} and an earlier "
                               "include index")
