"""GenEval's rules over detections: official accuracy, strict accuracy and the partial-credit training reward.

Pure functions of detections and one prompt's GenEval metadata (`include` clauses {class, count, color?, position?:
[relation, include index]}, optional `exclude` clauses {class, count}); no model in sight. See docs/math.md, "Reward
definitions". `objects` maps a class name to its detections (any order: the rules sort by score themselves).

The reference reward server appends an extra 1.0 to the partial-credit list after a *failed* position check, so a
position prompt with both objects found once but misplaced scores 0.75 there; here a failed position appends only its 0
(0.667 for that prompt).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

POSITION_THRESHOLD = 0.1  # fraction of the summed object sizes an offset must exceed before it counts
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True, eq=False)
class Detection:
    """One detected object: class name, confidence, box (x0, y0, x1, y1) in pixels, optional mask and colour."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None
    color: str | None = None


Objects = Mapping[str, Sequence[Detection]]


def group_by_class(detections: Iterable[Detection], min_score: float, max_per_class: int = 16
                   ) -> dict[str, list[Detection]]:
    """Class -> its detections scoring above `min_score`, best first, at most `max_per_class` of each."""
    objects: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: d.score, reverse=True):
        if det.score > min_score and len(objects.setdefault(det.label, [])) < max_per_class:
            objects[det.label].append(det)
    return {label: dets for label, dets in objects.items() if dets}


def relative_position(a: Detection, b: Detection) -> set[str]:
    """Relations of A to B (y grows down): offset beyond 0.1 of the summed sizes, over the offset's norm, vs ±0.5."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
    offset = np.array([(ax0 + ax1) / 2 - (bx0 + bx1) / 2, (ay0 + ay1) / 2 - (by0 + by1) / 2])
    sizes = np.array([abs(ax1 - ax0) + abs(bx1 - bx0), abs(ay1 - ay0) + abs(by1 - by0)])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * sizes, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _ranked(objects: Objects, label: str) -> list[Detection]:
    return sorted(objects.get(label, ()), key=lambda d: d.score, reverse=True)


def _count_color(found: Sequence[Detection], color: str) -> int:
    """How many of `found` have `color`; every one must carry a colour."""
    if any(d.color is None for d in found):
        raise ValueError(f"detections of {found[0].label!r} need a colour for a colour clause; classify them first")
    return sum(d.color == color for d in found)


def _relates(found: Sequence[Detection], groups: Sequence[Sequence[Detection] | None], position: Sequence[Any]
             ) -> bool:
    """Every found A relates to every object of the target group, which must be an earlier clause that matched."""
    relation, target = position
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; valid: {', '.join(RELATIONS)}")
    if not 0 <= target < len(groups):
        raise ValueError(f"position target {target} must be the index of an earlier include clause")
    targets = groups[target]
    if targets is None:
        return False
    return all(relation in relative_position(a, b) for a in found for b in targets)


def _include(metadata: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    include = metadata.get("include")
    if not include:
        raise ValueError(f"GenEval metadata needs a non-empty 'include' list, got {metadata!r}")
    return list(include)


def accuracy(objects: Objects, metadata: Mapping[str, Any]) -> bool:
    """The official GenEval check: top-N per clause with count ≥ N, colour and position on those; excludes apply."""
    correct = True
    groups: list[list[Detection] | None] = []
    for clause in _include(metadata):
        count = clause["count"]
        found = _ranked(objects, clause["class"])[:count]
        matched = len(found) >= count
        if matched and "color" in clause:
            matched = _count_color(found, clause["color"]) >= count
        if matched and "position" in clause:
            matched = _relates(found, groups, clause["position"])
        correct = correct and matched
        groups.append(found if matched else None)
    for clause in metadata.get("exclude", ()):
        if len(objects.get(clause["class"], ())) >= clause["count"]:
            correct = False
    return correct


def strict_accuracy(objects: Objects, metadata: Mapping[str, Any]) -> bool:
    """Exact count n == N over all detections, colour and position hold on all of them; excludes ignored."""
    correct = True
    groups: list[list[Detection] | None] = []
    for clause in _include(metadata):
        count = clause["count"]
        found = _ranked(objects, clause["class"])
        matched = len(found) == count
        if matched and "color" in clause:
            matched = _count_color(found, clause["color"]) == count
        if matched and "position" in clause:
            matched = _relates(found, groups, clause["position"])
        correct = correct and matched
        groups.append(found if matched else None)
    return correct


def partial_reward(objects: Objects, metadata: Mapping[str, Any]) -> float:
    """Training reward: the mean of one flat list of per-clause credits (count, then colour or position)."""
    credits: list[float] = []
    groups: list[list[Detection] | None] = []
    for clause in _include(metadata):
        count = clause["count"]
        found = _ranked(objects, clause["class"])
        matched = len(found) == count
        credits.append(1 - abs(count - len(found)) / count)
        if not matched:
            if "color" in clause or "position" in clause:
                credits.append(0.0)
        else:
            if "color" in clause:
                n_color = _count_color(found, clause["color"])
                credits.append(1 - abs(count - n_color) / count)
                matched = n_color == count
            if "position" in clause:
                placed = _relates(found, groups, clause["position"])
                credits.append(1.0 if placed else 0.0)
                matched = matched and placed
        groups.append(found if matched else None)
    return math.fsum(credits) / len(credits)
