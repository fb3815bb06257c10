"""Named presets and `--set key=value` overrides, for every typed config (build, train, evaluate, features, ...).

`config_from_preset(cls, presets, name, fields)` gives a complete config from a preset table; `apply_overrides` sets
dotted keys (`vscq1.generation.temperature=0.5`) with validation, so the CLI and deployments share one definition.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def config_from_preset(cls: type[M], presets: dict[str, dict[str, Any]], name: str, fields: dict[str, Any]) -> M:
    """`presets[name]` (deep-copied) updated with the fields that are not None, validated as `cls`."""
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(sorted(presets))}")
    data = json.loads(json.dumps(presets[name], default=_plain))
    data.update({k: v for k, v in fields.items() if v is not None})
    return cls.model_validate(data)


def _plain(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise TypeError(type(obj))


def apply_overrides(config: M, assignments: list[str]) -> M:
    """Set dotted keys from `key=value` strings; values parse as JSON when they can, else stay strings.

    A key must name an existing setting, except inside a free-form dict setting (e.g. TrainConfig.method_options,
    TrainConfig.selector, EvalConfig.method_options), where new keys (and sections) are added."""
    data = config.model_dump(mode="json")
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        parts = key.strip().split(".")
        free = _free_form_depth(type(config), parts)  # parts[:free] lead into a free-form dict
        for depth, part in enumerate(parts[:-1], start=1):
            if free is not None and depth > free and part not in node:
                node[part] = {}
            if not isinstance(node.get(part), dict):
                raise ValueError(f"override {key!r}: {part!r} is not a section")
            node = node[part]
        if parts[-1] not in node and free is None:
            raise ValueError(f"override {key!r}: no such setting")
        if value is None and isinstance(node.get(parts[-1]), str):
            value = raw  # "null" for a string setting is the word, not JSON null (e.g. backend=null)
        node[parts[-1]] = value
    return type(config).model_validate(data)


def _free_form_depth(cls: type, parts: list[str]) -> int | None:
    """How many leading parts of a dotted key lead to a setting typed as a plain dict (free-form keys), if any."""
    for depth, part in enumerate(parts[:-1], start=1):
        fields = getattr(cls, "model_fields", None)
        if fields is not None:
            if part not in fields:
                return None
            annotation = fields[part].annotation
        elif dataclasses.is_dataclass(cls):
            by_name = {f.name: f for f in dataclasses.fields(cls)}
            if part not in by_name:
                return None
            annotation = typing.get_type_hints(cls).get(part, by_name[part].type)
        else:
            return None
        options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (
            annotation,)
        if any(option is dict or typing.get_origin(option) is dict for option in options):
            return depth
        cls = next((o for o in options if isinstance(o, type) and o is not type(None)), None)
        if cls is None:
            return None
    return None
