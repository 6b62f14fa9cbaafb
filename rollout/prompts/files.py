"""Prompt files (GenEval-style JSONL, plain text, one prompt a line) and the built-in demo prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rollout.prompts.groups import PromptItem


class PromptFileError(ValueError):
    """A prompt file is missing, unreadable or malformed; the message names the file and line."""


def _read_text(path: str | Path) -> tuple[Path, str]:
    """Read a UTF-8 file, turning every failure into a PromptFileError that names the path."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise PromptFileError(f"{p}: prompt file not found") from None
    except IsADirectoryError:
        raise PromptFileError(f"{p}: is a directory, expected a prompt file") from None
    except OSError as e:
        raise PromptFileError(f"{p}: cannot read prompt file ({e.strerror or e})") from None
    try:
        return p, data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PromptFileError(f"{p}:{line}: not UTF-8 text (bad byte at offset {e.start})") from None


def _check_objects(where: str, key: str, value: Any) -> None:
    """Check an include/exclude list: objects with a string 'class' and an integer 'count' >= 1."""
    allowed = f"'{key}' must be a list of objects like {{\"class\": \"dog\", \"count\": 1}}"
    if not isinstance(value, list):
        raise PromptFileError(f"{where}: {allowed}, got {type(value).__name__}")
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise PromptFileError(f"{where}: {key}[{i}] is {type(entry).__name__}; {allowed}")
        cls = entry.get("class")
        if not isinstance(cls, str) or not cls.strip():
            raise PromptFileError(f"{where}: {key}[{i}] needs a non-empty string 'class', got {cls!r}")
        count = entry.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise PromptFileError(f"{where}: {key}[{i}] needs an integer 'count' >= 1, got {count!r}")


def read_geneval_jsonl(path: str | Path) -> list[PromptItem]:
    """Read GenEval-style JSONL (one object per line with a 'prompt'), keeping each object as metadata."""
    p, text = _read_text(path)
    items: list[PromptItem] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                                  f"JSON object with a 'prompt', e.g. {{\"prompt\": \"a photo of a dog\"}}") from None
        if not isinstance(obj, dict):
            raise PromptFileError(
                f"{where}: expected a JSON object with a 'prompt' string, got {type(obj).__name__}"
            )
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
        tag = obj.get("tag")
        if tag is not None and not isinstance(tag, str):
            raise PromptFileError(f"{where}: 'tag' must be a string when present, got {tag!r}")
        for key in ("include", "exclude"):
            if key in obj:
                _check_objects(where, key, obj[key])
        items.append(PromptItem(prompt=prompt, metadata=obj, where=where))
    if not items:
        raise PromptFileError(f"{p}: no prompts found; expected one JSON object with a 'prompt' per line")
    return items


def read_text_prompts(path: str | Path) -> list[PromptItem]:
    """Read one prompt per line, skipping blank lines and stripping surrounding whitespace."""
    p, text = _read_text(path)
    items = [PromptItem(prompt=line.strip(), where=f"{p}:{lineno}")
             for lineno, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not items:
        raise PromptFileError(f"{p}: no prompts found; expected one prompt per non-blank line")
    return items


_BUILTIN_COLORS = ("red", "green", "blue", "yellow")
_BUILTIN_SHAPES = ("square", "circle", "triangle", "star")
_BUILTIN_COUNTS = {1: "one", 2: "two"}


def builtin_prompts() -> list[PromptItem]:
    """A fixed set of 32 simple colour x shape x count prompts for the CPU demo (no files needed)."""
    items = []
    for count, word in _BUILTIN_COUNTS.items():
        for color in _BUILTIN_COLORS:
            for shape in _BUILTIN_SHAPES:
                text = f"a photo of a {color} {shape}" if count == 1 else f"a photo of {word} {color} {shape}s"
                meta = {"tag": "shapes", "count": count, "color": color, "shape": shape}
                items.append(PromptItem(prompt=text, metadata=meta))
    return items
