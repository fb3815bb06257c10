"""Configuration of a build-dataset run: one typed model, with named presets.

`BuildConfig.preset(name, **overrides)` gives a complete config; `apply_overrides` sets dotted keys
(`vscq1.generation.temperature=0.5`) with validation, so the CLI and deployments share one definition.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from qtsplus.engines import EngineConfig, GenerationParams
from qtsplus.ingest import IngestConfig
from qtsplus.stages.teacher import TeacherConfig
from qtsplus.stages.vscq1 import Vscq1Config
from qtsplus.video import SamplingConfig

M = TypeVar("M", bound=BaseModel)
REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"


class BuildConfig(BaseModel):
    """Everything a build-dataset run depends on."""

    input: str = Field(description="caption file: ShareGPTVideo JSONL, or {video_id, video, caption} JSONL/Parquet")
    video_root: str = Field(description="folder that every video path in the input is relative to")
    out: str = Field(description="dataset folder: <out>/<stage>/<split>-<chunk>.parquet")
    ingest: IngestConfig = IngestConfig()
    vscq1: Vscq1Config
    teacher: TeacherConfig

    @classmethod
    def preset(cls, name: str, **fields: Any) -> BuildConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
        data = json.loads(json.dumps(PRESETS[name], default=_plain))
        data.update({k: v for k, v in fields.items() if v is not None})
        missing = [k for k in ("input", "video_root", "out") if k not in data]
        if missing:
            raise ValueError(f"preset {name!r} needs {', '.join('--' + m.replace('_', '-') for m in missing)}")
        return cls.model_validate(data)


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


def _paper(teacher_model: str) -> dict:
    return {
        "ingest": IngestConfig(chunk_size=1000, eval_fraction=0.005),
        "vscq1": Vscq1Config(
            engine=EngineConfig(model_id="Qwen/Qwen3-235B-A22B-Instruct-2507", backend="vllm", batch_size=256,
                                max_model_len=8192, tensor_parallel_size=8),
            n_questions=3,
        ),
        "teacher": TeacherConfig(
            engine=EngineConfig(model_id=teacher_model, backend="vllm", batch_size=64, max_model_len=32768),
            video=SamplingConfig(fps=1.0, max_frames=40, max_pixels=360 * 420),
        ),
    }


PRESETS: dict[str, dict] = {
    # Shipped captions and videos, tiny random-weight models built offline: proves the mechanics in minutes on a CPU.
    "smoke": {
        "input": str(EXAMPLES / "captions.jsonl"),
        "video_root": str(EXAMPLES / "videos"),
        "ingest": IngestConfig(chunk_size=4, eval_fraction=0.25, split_salt="smoke-3"),  # 2 of 5 videos in eval
        "vscq1": Vscq1Config(
            engine=EngineConfig(model_id="tiny/qwen3", batch_size=8),
            generation=GenerationParams(temperature=1.0, top_p=1.0, max_new_tokens=4096, seed=0),
            n_questions=2,
            max_field_chars=24,
        ),
        "teacher": TeacherConfig(
            engine=EngineConfig(model_id="tiny/qwen2.5-vl", batch_size=8),
            video=SamplingConfig(fps=1.0, min_frames=2, max_frames=4, min_pixels=56 * 56, max_pixels=112 * 112),
            vqa_generation=GenerationParams(temperature=1.0, max_new_tokens=24, seed=0),
            group_size=8,
        ),
    },
    # One GPU: Qwen3-8B writes the questions, Qwen2.5-VL-3B screens and answers (the paper's 3B teacher).
    "single-gpu": {
        "ingest": IngestConfig(chunk_size=1000, eval_fraction=0.005),
        "vscq1": Vscq1Config(engine=EngineConfig(model_id="Qwen/Qwen3-8B", backend="vllm", batch_size=256,
                                                 max_model_len=8192)),
        "teacher": TeacherConfig(
            engine=EngineConfig(model_id="Qwen/Qwen2.5-VL-3B-Instruct", backend="vllm", batch_size=64),
            video=SamplingConfig(fps=1.0, max_frames=40, max_pixels=360 * 420),
        ),
    },
    # The paper's setup (Sec. 4.1): Qwen3-235B text teacher, Qwen2.5-VL-3B or -7B video teacher.
    "paper-3b": _paper("Qwen/Qwen2.5-VL-3B-Instruct"),
    "paper-7b": _paper("Qwen/Qwen2.5-VL-7B-Instruct"),
}
