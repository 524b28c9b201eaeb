"""YAML presets, dotted `--set` overrides, and the messages that name a bad key."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.base import ConfigError, Section
from pipeline.config.pipeline import PipelineConfig


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            keys.extend(_known_keys(annotation, prefix + name + "."))
    return keys


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, _known_keys(PipelineConfig), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown config key '{key}'{hint}"


_YAML_NULLS = {"null", "Null", "NULL", "~"}


def _parse_value(key: str, text: str, annotation: Any) -> Any:
    """Parse an override value as YAML, except that a text field keeps the text as typed.

    Plain YAML would turn `registry.version=2` into the int 2, `registry.version=2024-05-01`
    into a date, a template starting with `#` into None (a comment) and `data.source=*.csv`
    into a parse error (an alias); all four are meant as strings.
    """
    text = text.strip()
    if not text:
        return None
    takes_text = annotation is str or str in get_args(annotation)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if takes_text:
            return text
        raise ConfigError(f"config key '{key}': cannot parse {text!r} ({getattr(e, 'problem', None) or e})") from None
    if takes_text and not isinstance(value, (str, list, dict)) and text not in _YAML_NULLS:
        return text
    return value


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML (so 3, 0.5, true, [a, b] work)."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key=value, e.g. train.lr=3e-4")
    key, _, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    model: type[BaseModel] = PipelineConfig
    node = raw
    for depth, part in enumerate(parts):
        if part not in model.model_fields:
            raise ConfigError(_unknown_key_message(key))
        annotation = model.model_fields[part].annotation
        last = depth == len(parts) - 1
        if last:
            node[part] = _parse_value(key, text, annotation)
        else:
            if not (isinstance(annotation, type) and issubclass(annotation, Section)):
                raise ConfigError(_unknown_key_message(key))
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{'.'.join(parts[: depth + 1])}' must be a mapping")
            model = annotation


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"] if p != "__root__")
        if item["type"] == "extra_forbidden":
            lines.append(_unknown_key_message(key))
        else:
            value = item.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            lines.append(f"config key '{key or '<root>'}': {item['msg']}{shown}")
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(raw: dict[str, Any], overrides: list[str] = ()) -> PipelineConfig:
    raw = json.loads(json.dumps(raw or {}))  # deep copy; overrides must not touch the caller's dict
    for override in overrides:
        apply_override(raw, override)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> PipelineConfig:
    """Load a YAML preset (or the embedded defaults when `path` is None) and apply dotted overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, train:, ...)")
    return build_config(raw, overrides)


def describe_fields(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every leaf field: the reference docs of the config."""
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            rows.extend(describe_fields(annotation, prefix + name + "."))
        else:
            rows.append((prefix + name, repr(field.default), field.description or ""))
    return rows
