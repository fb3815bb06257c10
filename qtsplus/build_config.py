"""Configuration of a build-dataset run: one typed model, with named presets (`BuildConfig.preset(name, ...)`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from qtsplus.engines import EngineConfig, GenerationParams
from qtsplus.ingest import IngestConfig
from qtsplus.paths import EXAMPLES
from qtsplus.presets import config_from_preset
from qtsplus.replicas import ReplicaConfig
from qtsplus.stages.teacher import TeacherConfig
from qtsplus.stages.vscq1 import Vscq1Config
from qtsplus.video import SamplingConfig


class BuildConfig(BaseModel):
    """Everything a build-dataset run depends on."""

    input: str = Field(description="caption file: ShareGPTVideo JSONL, or {video_id, video, caption} JSONL/Parquet")
    video_root: str = Field(description="folder that every video path in the input is relative to")
    out: str = Field(description="dataset folder: OUT/STAGE/SPLIT-CHUNK.parquet")
    ingest: IngestConfig = IngestConfig()
    vscq1: Vscq1Config
    teacher: TeacherConfig
    # how many replicas each model stage runs, and where (local processes or Ray actors): speed only, so it is in no
    # stage's depends_on (cache keys, provenance); docs/scale_out.md
    replicas: ReplicaConfig = ReplicaConfig()

    @classmethod
    def preset(cls, name: str, **fields: Any) -> BuildConfig:
        missing = [k for k in ("input", "video_root", "out") if fields.get(k) is None and k not in PRESETS.get(name, {})]
        if name in PRESETS and missing:
            raise ValueError(f"preset {name!r} needs {', '.join('--' + m.replace('_', '-') for m in missing)}")
        return config_from_preset(cls, PRESETS, name, fields)


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
