"""Reading a job config: YAML (with `1e-4` read as a float) and `--set dotted.key=value` overrides, validated into a
JobConfig, every problem reported as one line naming the dotted field, the bad value and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from cluster.config import RETIRED_KEYS, ConfigError, JobConfig


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.2), as users write learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\.inf|\.nan)$", re.X),
    list("-+0123456789."),
)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"{where}{loc}: not valid YAML ({problem})"]) from None


def apply_override(data: dict, override: str) -> None:
    """Apply one `--set dotted.key=value` to the raw config mapping; the value is read as YAML."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
        raise ConfigError([f"--set {override!r}: expected dotted.key=value, e.g. --set learner.lr=1e-4"])
    value = _parse_yaml(raw, f"--set {key}") if raw.strip() else ""
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError([f"--set {key}: {'.'.join(parts[:i + 1])} is a value, not a section"])
        node = child
    node[parts[-1]] = value


def load_config(path: Union[str, Path], overrides: Iterable[str] = ()) -> JobConfig:
    """Read a YAML job config, apply `--set` overrides, validate. Raises ConfigError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the config file ({e.strerror})"]) from None
    data = _parse_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections, not {type(data).__name__}"])
    for o in overrides:
        apply_override(data, o)
    return validate_config(data, source=str(path))


def validate_config(data: dict, source: str | None = None) -> JobConfig:
    """Validate a raw mapping into a JobConfig, converting every problem into one line."""
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError([_describe(err) for err in e.errors()], source) from None
    except ConfigError as e:
        raise ConfigError(e.problems, source) from None


def _describe(err: dict) -> str:
    loc = [str(x) for x in err["loc"]]
    field = ".".join(loc) or "(top level)"
    kind = err["type"]
    if kind == "missing":
        return f"{field}: required, missing"
    if kind == "extra_forbidden":
        if field in RETIRED_KEYS:
            return f"{field}: {RETIRED_KEYS[field]}"
        allowed = _allowed_keys(err["loc"][:-1])
        hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
        return f"{field}: unknown key{hint}"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{field} = {shown}: {err['msg']}"


def _allowed_keys(loc: tuple) -> list[str]:
    """The field names of the section at `loc`, for 'unknown key' messages."""
    model: Any = JobConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _section_type(field.annotation)
        if model is None:
            return []
    return list(model.model_fields)


def _section_type(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            found = _section_type(arg)
            if found is not None:
                return found
    return None
