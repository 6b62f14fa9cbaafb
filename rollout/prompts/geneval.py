"""GenEval-style training prompts: same vocabulary and phrasing as the benchmark, never its test prompts."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from rollout.prompts.groups import PromptItem

# The 80 COCO classes in COCO order, spelled as GenEval spells them ("computer mouse", "tv remote", "hair drier").
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")

# Counts used for training counting prompts; GenEval's metadata also excludes count + 1.
TRAIN_COUNTS: tuple[int, ...] = (2, 3, 4)
NUMBER_WORDS: dict[int, str] = {
    1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten",
}

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_CANONICAL_RELATIONS = ("left of", "above")

_CLASS_SET, _COLOR_SET = frozenset(COCO_CLASSES), frozenset(COLORS)

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def _plural(name: str) -> str:
    """GenEval's own rule, as its test prompts show: '+es' after a final 's', else '+s'."""
    return name + "es" if name.endswith("s") else name + "s"


# Plurals match GenEval's test prompts wherever they show one, quirks included ("sheeps", "knifes",
# "benchs", "persons"); the classes GenEval never counts get ordinary English instead of "skises".
_PLURAL_OVERRIDES = {
    "skis": "skis",
    "scissors": "scissors",
    "computer mouse": "computer mice",
    "couch": "couches",
}
PLURALS: dict[str, str] = {c: _PLURAL_OVERRIDES.get(c, _plural(c)) for c in COCO_CLASSES}


def with_article(phrase: str) -> str:
    """'an' before a vowel letter, else 'a' (GenEval: 'an orange', 'an umbrella', 'a tv')."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# --------------------------------------------------------------------------- canonical keys


def _obj(entry: Any, prompt: str) -> tuple[str, Any]:
    """(class, entry) of one include entry, or a ValueError naming the prompt."""
    if not isinstance(entry, dict) or not isinstance(entry.get("class"), str):
        raise ValueError(f"GenEval metadata of {prompt!r}: include entries need a string 'class', got {entry!r}")
    return entry["class"], entry


def _key_from_metadata(meta: Mapping[str, Any], prompt: str) -> tuple:
    """Canonical key from GenEval metadata: order-free for pairs, relations folded to 'left of' / 'above'."""
    tag, include = meta["tag"], meta["include"]
    want = {"single_object": 1, "counting": 1, "colors": 1, "two_object": 2, "position": 2, "color_attr": 2}[tag]
    if not isinstance(include, list) or len(include) != want:
        raise ValueError(f"GenEval metadata of {prompt!r}: tag {tag!r} needs {want} include entries, got {include!r}")
    objs = [_obj(e, prompt) for e in include]
    if tag == "single_object":
        return (tag, objs[0][0])
    if tag == "counting":
        return (tag, objs[0][0], objs[0][1].get("count"))
    if tag == "colors":
        return (tag, objs[0][0], objs[0][1].get("color"))
    if tag == "two_object":
        return (tag, *sorted(c for c, _ in objs))
    if tag == "color_attr":
        return (tag, *sorted((c, e.get("color")) for c, e in objs))
    # position: the entry carrying "position": [relation, index] sits relative to include[index].
    placed = [(c, e) for c, e in objs if "position" in e]
    pos = placed[0][1]["position"] if len(placed) == 1 else None
    if not (isinstance(pos, list) and len(pos) == 2 and pos[0] in _INVERSE and pos[1] in (0, 1)):
        raise ValueError(
            f"GenEval metadata of {prompt!r}: a position prompt needs exactly one include entry with "
            f"'position': [relation, index], relation one of {list(RELATIONS)}"
        )
    subject, (relation, ref_index) = placed[0][0], pos
    if objs[ref_index][1] is placed[0][1]:
        raise ValueError(f"GenEval metadata of {prompt!r}: the 'position' entry must refer to the other object")
    reference = objs[ref_index][0]
    if relation in _CANONICAL_RELATIONS:
        return (tag, relation, subject, reference)
    return (tag, _INVERSE[relation], reference, subject)


@lru_cache(maxsize=1)
def _prompt_patterns() -> list[tuple[str, re.Pattern[str]]]:
    """Full-match regexes for the six GenEval templates over the known vocabulary."""
    alt = lambda words: "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # noqa: E731
    cls, col, rel = f"({alt(COCO_CLASSES)})", f"({alt(COLORS)})", f"({alt(RELATIONS)})"
    num, plural, art = f"({alt(NUMBER_WORDS.values())})", f"({alt(PLURALS.values())})", "(?:a|an)"
    head = "a photo of "
    return [
        ("color_attr", re.compile(f"{head}{art} {col} {cls} and {art} {col} {cls}")),
        ("position", re.compile(f"{head}{art} {cls} {rel} {art} {cls}")),
        ("two_object", re.compile(f"{head}{art} {cls} and {art} {cls}")),
        ("counting", re.compile(f"{head}{num} {plural}")),
        ("colors", re.compile(f"{head}{art} {col} {cls}")),
        ("single_object", re.compile(f"{head}{art} {cls}")),
    ]


def parse_geneval_prompt(prompt: str) -> dict | None:
    """GenEval metadata reconstructed from a prompt in GenEval's phrasing, or None if it is not one."""
    text = " ".join(prompt.lower().split()).rstrip(".")
    for tag, pattern in _prompt_patterns():
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groups()
        if tag == "color_attr":
            return _meta(tag, [_inc(g[1], color=g[0]), _inc(g[3], color=g[2])], prompt)
        if tag == "position":
            return _meta(tag, [_inc(g[2]), _inc(g[0], position=[g[1], 0])], prompt)
        if tag == "two_object":
            return _meta(tag, [_inc(g[0]), _inc(g[1])], prompt)
        if tag == "counting":
            count = {w: n for n, w in NUMBER_WORDS.items()}[g[0]]
            cls = {p: c for c, p in PLURALS.items()}[g[1]]
            return _meta(tag, [_inc(cls, count=count)], prompt, exclude=[_inc(cls, count=count + 1)])
        if tag == "colors":
            return _meta(tag, [_inc(g[1], color=g[0])], prompt)
        return _meta(tag, [_inc(g[0])], prompt)
    return None


def canonical_key(item: PromptItem) -> tuple:
    """Key equal for semantically identical prompts (swapped pairs, mirrored relations); from metadata when present."""
    meta = item.metadata
    if meta.get("tag") in TAGS and "include" in meta:
        return _key_from_metadata(meta, item.prompt)
    parsed = parse_geneval_prompt(item.prompt)
    if parsed is not None:
        return _key_from_metadata(parsed, item.prompt)
    return ("text", " ".join(item.prompt.lower().split()))


# --------------------------------------------------------------------------- rendering


def _inc(cls: str, *, count: int = 1, color: str | None = None, position: list | None = None) -> dict:
    """One include entry in GenEval's key order."""
    entry: dict[str, Any] = {"class": cls, "count": count}
    if color is not None:
        entry["color"] = color
    if position is not None:
        entry["position"] = position
    return entry


def _meta(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None) -> dict:
    """A GenEval metadata record with the test file's key order."""
    meta: dict[str, Any] = {"tag": tag, "include": include}
    if exclude is not None:
        meta["exclude"] = exclude
    meta["prompt"] = prompt
    return meta


def _render(key: tuple, swap: bool) -> PromptItem:
    """The prompt for a canonical key; `swap` picks which of the two equivalent orders to write."""
    tag = key[0]
    if tag == "single_object":
        text = f"a photo of {with_article(key[1])}"
        return PromptItem(text, _meta(tag, [_inc(key[1])], text))
    if tag == "counting":
        cls, n = key[1], key[2]
        text = f"a photo of {NUMBER_WORDS[n]} {PLURALS[cls]}"
        return PromptItem(text, _meta(tag, [_inc(cls, count=n)], text, exclude=[_inc(cls, count=n + 1)]))
    if tag == "colors":
        cls, color = key[1], key[2]
        text = f"a photo of {with_article(f'{color} {cls}')}"
        return PromptItem(text, _meta(tag, [_inc(cls, color=color)], text))
    if tag == "two_object":
        a, b = (key[2], key[1]) if swap else (key[1], key[2])
        text = f"a photo of {with_article(a)} and {with_article(b)}"
        return PromptItem(text, _meta(tag, [_inc(a), _inc(b)], text))
    if tag == "color_attr":
        (a, ca), (b, cb) = (key[2], key[1]) if swap else (key[1], key[2])
        text = f"a photo of {with_article(f'{ca} {a}')} and {with_article(f'{cb} {b}')}"
        return PromptItem(text, _meta(tag, [_inc(a, color=ca), _inc(b, color=cb)], text))
    # position: (relation, subject, reference) or its mirror image.
    relation, subject, reference = key[1], key[2], key[3]
    if swap:
        relation, subject, reference = _INVERSE[relation], reference, subject
    text = f"a photo of {with_article(subject)} {relation} {with_article(reference)}"
    return PromptItem(text, _meta(tag, [_inc(reference), _inc(subject, position=[relation, 0])], text))


# --------------------------------------------------------------------------- candidate spaces


def _space(tag: str) -> tuple[int, Callable[[int], tuple | None]]:
    """Index range and decoder (index -> canonical key, None for unused indices) for one tag."""
    C, K, N, NK = COCO_CLASSES, COLORS, len(COCO_CLASSES), len(COLORS)
    if tag == "single_object":
        return N, lambda i: (tag, C[i])
    if tag == "counting":
        return N * len(TRAIN_COUNTS), lambda i: (tag, C[i // len(TRAIN_COUNTS)], TRAIN_COUNTS[i % len(TRAIN_COUNTS)])
    if tag == "colors":
        return N * NK, lambda i: (tag, C[i // NK], K[i % NK])
    if tag == "two_object":
        return N * N, lambda i: (tag, *sorted((C[i // N], C[i % N]))) if i // N < i % N else None
    if tag == "position":

        def position(i: int) -> tuple | None:
            r, rest = divmod(i, N * N)
            a, b = divmod(rest, N)
            return (tag, _CANONICAL_RELATIONS[r], C[a], C[b]) if a != b else None

        return 2 * N * N, position

    def color_attr(i: int) -> tuple | None:
        s, t = divmod(i, N * NK)
        (a, ca), (b, cb) = divmod(s, NK), divmod(t, NK)
        if s >= t or a == b or ca == cb:
            return None
        return (tag, *sorted(((C[a], K[ca]), (C[b], K[cb]))))

    return (N * NK) ** 2, color_attr


def _space_total(tag: str) -> int:
    """How many distinct canonical keys a tag can produce."""
    n, k = len(COCO_CLASSES), len(COLORS)
    return {
        "single_object": n,
        "counting": n * len(TRAIN_COUNTS),
        "colors": n * k,
        "two_object": n * (n - 1) // 2,
        "position": n * (n - 1) * len(_CANONICAL_RELATIONS),
        "color_attr": n * k * (n - 1) * (k - 1) // 2,
    }[tag]


def _in_space(key: tuple) -> bool:
    """Whether the generator could produce this canonical key (so excluding it removes a candidate)."""
    classes, colors, tag = _CLASS_SET, _COLOR_SET, key[0]
    try:
        if tag == "single_object":
            return len(key) == 2 and key[1] in classes
        if tag == "counting":
            return len(key) == 3 and key[1] in classes and key[2] in TRAIN_COUNTS
        if tag == "colors":
            return len(key) == 3 and key[1] in classes and key[2] in colors
        if tag == "two_object":
            return len(key) == 3 and key[1] in classes and key[2] in classes and key[1] != key[2]
        if tag == "position":
            return (len(key) == 4 and key[1] in _CANONICAL_RELATIONS and key[2] in classes
                    and key[3] in classes and key[2] != key[3])
        if tag == "color_attr":
            (a, ca), (b, cb) = key[1], key[2]
            return len(key) == 3 and {a, b} <= classes and {ca, cb} <= colors and a != b and ca != cb
    except (TypeError, ValueError):
        return False
    return False


def _draw(rng: random.Random, tag: str, k: int, skip: set[tuple]) -> list[tuple]:
    """k distinct keys of one tag, uniformly at random, via a lazy Fisher-Yates walk over its index range."""
    size, decode = _space(tag)
    out: list[tuple] = []
    moved: dict[int, int] = {}
    for i in range(size):
        if len(out) == k:
            break
        j = rng.randrange(i, size)
        chosen = moved.get(j, j)
        moved[j] = moved.pop(i, i)
        key = decode(chosen)
        if key is not None and key not in skip:
            out.append(key)
    if len(out) != k:
        raise RuntimeError(f"internal error: found {len(out)} of {k} {tag} prompts that capacity said exist")
    return out


def generate_geneval_prompts(
    n: int,
    *,
    seed: int,
    exclude: Iterable[PromptItem] = (),
    tags: Mapping[str, float] | None = None,
) -> list[PromptItem]:
    """n distinct GenEval-phrased prompts (tags drawn by weight, equal by default), none equivalent to `exclude`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    weights = dict.fromkeys(TAGS, 1.0) if tags is None else dict(tags)
    unknown = sorted(set(weights) - set(TAGS))
    if unknown:
        raise ValueError(f"unknown GenEval tags {unknown}; allowed: {list(TAGS)}")
    bad = {t: w for t, w in weights.items() if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0}
    if bad or not any(w > 0 for w in weights.values()):
        raise ValueError(f"tag weights must be numbers >= 0 with at least one > 0, got {weights}")

    excluded = {key for key in map(canonical_key, exclude) if _in_space(key)}
    capacity = {t: _space_total(t) - sum(1 for k in excluded if k[0] == t) for t in TAGS if weights.get(t, 0) > 0}
    available = sum(capacity.values())
    if n > available:
        raise ValueError(
            f"asked for {n} GenEval prompts but only {available} distinct ones exist for tags "
            f"{sorted(capacity)} after excluding {len(excluded)} prompts; lower n or allow more tags"
        )

    rng = random.Random(seed)
    live = [t for t in TAGS if capacity.get(t, 0) > 0]
    counts = dict.fromkeys(TAGS, 0)
    sequence: list[str] = []
    for _ in range(n):
        tag = rng.choices(live, weights=[weights[t] for t in live])[0]
        counts[tag] += 1
        sequence.append(tag)
        if counts[tag] == capacity[tag]:
            live.remove(tag)
    drawn = {t: iter(_draw(rng, t, counts[t], excluded)) for t in TAGS if counts[t]}
    return [_render(next(drawn[t]), swap=rng.random() < 0.5) for t in sequence]


def refuse_test_overlap(train: Sequence[PromptItem], test: Sequence[PromptItem], *, test_name: str) -> None:
    """Raise ValueError if any training prompt is (equivalent to) a test prompt."""
    test_keys = {canonical_key(t) for t in test}
    overlap = [t for t in train if canonical_key(t) in test_keys]
    if overlap:
        raise ValueError(
            f"{len(overlap)} of the training prompts are GenEval test prompts ({test_name}), "
            f"e.g. {overlap[0].prompt!r}; training on the test set is refused"
        )
