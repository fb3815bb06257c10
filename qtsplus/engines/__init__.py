"""Model engines: one contract, two backends (transformers for CPU/tests/small runs, vLLM for GPU throughput).

An engine is loaded once and answers three kinds of request over batches of prompts: JSON constrained by a schema,
a multiple-choice distribution over single-token options, and free text. Outputs are a deterministic function of the
inputs (model, revision, prompts, params including seeds), whatever the batch size.
"""

from __future__ import annotations

import json
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from qtsplus.video import VideoClip

LOAD_LOG_ENV = "QTSPLUS_ENGINE_LOAD_LOG"
NO_PROGRESS_ENV = "QTSPLUS_NO_PROGRESS"
ENGINE_PYTHON_ENV = "QTSPLUS_ENGINE_PYTHON"  # the engine environment's interpreter, for stages with backend="vllm"


@dataclass(frozen=True)
class EngineConfig:
    model_id: str  # hub id, local path, or "tiny/qwen3" / "tiny/qwen2.5-vl" (built offline, random weights)
    revision: str | None = None
    backend: Literal["transformers", "vllm", "null"] = "transformers"  # null: no model, synthetic outputs (dry runs)
    dtype: str = "auto"  # auto -> bf16 on GPU, fp32 on CPU
    device: str = "auto"
    batch_size: int = 8
    trust_remote_code: bool = False
    max_model_len: int = 32768
    gpu_memory_utilization: float = 0.85  # vllm only (on the CPU: the share of system RAM vLLM may take)
    tensor_parallel_size: int = 1  # vllm only: GPUs one model is sharded over
    kv_cache_gib: float | None = None  # vllm only: KV cache size; None: what gpu_memory_utilization leaves
    enforce_eager: bool = False  # vllm only: no CUDA graphs / compilation (starts faster, decodes slower)
    # The interpreter of the engine environment the stage worker runs under (docs/vllm.md), e.g.
    # /opt/venvs/engine/bin/python; None: $QTSPLUS_ENGINE_PYTHON for backend="vllm", else this interpreter.
    python: str | None = None


@dataclass(frozen=True)
class GenerationParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    max_new_tokens: int = 512
    seed: int = 0


@dataclass
class Prompt:
    user: str
    system: str | None = None
    video: VideoClip | None = None
    seed: int = 0  # per-request seed (mixed into GenerationParams.seed) for reproducible sampling


@dataclass
class JsonResult:
    value: Any  # the parsed JSON (a dict for an object schema), None when it did not parse
    text: str
    error: (
        str | None
    )  # set when the output did not parse (e.g. it ran out of max_new_tokens on an unbounded schema)


@dataclass
class ChoiceResult:
    choice: str
    probs: dict[str, float]  # over the given options, sum to 1


class MissingExtraError(ImportError):
    """An optional dependency (a pip extra of qtsplus) is needed for what was asked."""


class Engine(ABC):
    model_id: str
    revision: str  # resolved: commit hash, or the config hash for tiny models
    closed: bool = False

    @abstractmethod
    def generate_json(
        self, prompts: Sequence[Prompt], schema: dict, params: GenerationParams
    ) -> list[JsonResult]:
        """One JSON value per prompt, decoded under the schema's grammar; never raises on a bad output."""

    @abstractmethod
    def choose(self, prompts: Sequence[Prompt], options: Sequence[str]) -> list[ChoiceResult]:
        """Distribution over single-token options at the first answer position (one forward pass)."""

    @abstractmethod
    def generate_text(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[str]:
        """Free text per prompt, up to the end-of-turn token or max_new_tokens."""

    @abstractmethod
    def close(self) -> None:
        """Release the model; the engine cannot be used afterwards."""


def load_engine(cfg: EngineConfig) -> Engine:
    """A fresh engine for ``cfg``; the vLLM backend imports vllm only here."""
    if cfg.backend == "transformers":
        from qtsplus.engines.transformers_engine import TransformersEngine

        return TransformersEngine(cfg)
    if cfg.backend == "vllm":
        from qtsplus.engines.vllm_engine import VllmEngine

        return VllmEngine(cfg)
    if cfg.backend == "null":
        from qtsplus.engines.null_engine import NullEngine

        return NullEngine(cfg)
    raise ValueError(f"unknown engine backend {cfg.backend!r}; expected 'transformers', 'vllm' or 'null'")


def engine_python(cfg: EngineConfig) -> str | None:
    """The interpreter a stage worker for ``cfg`` runs under: ``cfg.python``, else $QTSPLUS_ENGINE_PYTHON when the
    backend is vLLM (which lives in its own environment, without Prefect), else None (this interpreter)."""
    if cfg.python:
        return cfg.python
    if cfg.backend == "vllm":
        return os.environ.get(ENGINE_PYTHON_ENV) or None
    return None


_ENGINES: dict[EngineConfig, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(cfg: EngineConfig) -> Engine:
    """The process-wide engine for ``cfg``: loaded on first use, shared afterwards (reloaded if it was closed)."""
    with _ENGINES_LOCK:
        engine = _ENGINES.get(cfg)
        if engine is None or engine.closed:
            engine = _ENGINES[cfg] = load_engine(cfg)
        return engine


def record_load(model_id: str, revision: str, backend: str) -> None:
    """Append one JSON line per model load to $QTSPLUS_ENGINE_LOAD_LOG (when set), so tests can count loads."""
    path = os.environ.get(LOAD_LOG_ENV)
    if not path:
        return
    line = json.dumps({"model_id": model_id, "revision": revision, "backend": backend, "pid": os.getpid()})
    with open(path, "a", encoding="utf-8") as f:  # one short write in append mode: lines do not interleave
        f.write(line + "\n")


__all__ = [
    "ChoiceResult",
    "Engine",
    "EngineConfig",
    "GenerationParams",
    "JsonResult",
    "MissingExtraError",
    "Prompt",
    "engine_python",
    "get_engine",
    "load_engine",
    "record_load",
]
