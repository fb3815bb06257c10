"""Prefect tasks of build-dataset: thin, cached wrappers around the library's stage functions.

Cache keys are content fingerprints, never run ids: the chunk's input fingerprint (raw bytes for ingest, the previous
stage's output files for the others) + the stage's configuration + prompt version + schema version + a hash of the
code the stage runs + the output folder. Cache records and results live in `<out>/.cache/prefect`, so deleting the
dataset folder forgets its cache. A cached result whose files are gone or changed size is recomputed.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem

import qtsplus.engines
from qtsplus import ingest
from qtsplus.fingerprint import code_version, fingerprint
from qtsplus.prompts import MCQ, VQA, VSCQ1
from qtsplus.shards import ChunkResult, chunk_files_intact
from qtsplus.stages.teacher import TeacherConfig, run_vqa_chunk, run_vscq2_chunk
from qtsplus.stages.vscq1 import Vscq1Config, run_vscq1_chunk
from qtsplus.workers import run_in_stage_worker
from schemas import SCHEMA_VERSION
from tasks.chunks import run_verified

TRANSIENT_ERRORS = (OSError, TimeoutError, ConnectionError, BrokenProcessPool)
_ENGINE_MODULES = tuple(
    ["qtsplus.engines", "qtsplus.tiny"] + [f"qtsplus.engines.{m.name}" for m in pkgutil.iter_modules(qtsplus.engines.__path__)]
)
_IO_MODULES = ("schemas.records", "qtsplus.shards", "qtsplus.fingerprint")
CODE = {
    "ingest": ("qtsplus.ingest", "qtsplus.video", *_IO_MODULES),
    "vscq1": ("qtsplus.stages.vscq1", "qtsplus.stages.common", "qtsplus.prompts", "schemas.generation",
              *_IO_MODULES, *_ENGINE_MODULES),
    "teacher": ("qtsplus.stages.teacher", "qtsplus.stages.common", "qtsplus.prompts", "qtsplus.video",
                *_IO_MODULES, *_ENGINE_MODULES),
}


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what a retry can fix: I/O hiccups and a worker process that died."""
    try:
        state.result()
    except TRANSIENT_ERRORS:
        return True
    except BaseException:  # noqa: BLE001 - any other failure is permanent: report it, don't retry
        return False
    return False


def _key(name: str, *parts: Any) -> str:
    return fingerprint(name, SCHEMA_VERSION, *parts)


def ingest_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    return _key("ingest", code_version(*CODE["ingest"]), p["spec"], p["cfg"], p["video_root"], p["out"])


def vscq1_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    cfg: Vscq1Config = p["cfg"]
    return _key("vscq1", code_version(*CODE["vscq1"]), VSCQ1.version, p["prev"].output_fingerprint, cfg, p["out"])


def vscq2_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    cfg: TeacherConfig = p["cfg"]
    return _key("vscq2", code_version(*CODE["teacher"]), MCQ.version, p["prev"].output_fingerprint,
                cfg.engine, cfg.video, cfg.group_size, p["video_root"], p["out"])


def vqa_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    cfg: TeacherConfig = p["cfg"]
    kept = [(f.path, f.sha256) for f in p["prev"].files if f.split.endswith("_kept")]
    return _key("vqa", code_version(*CODE["teacher"]), VQA.version, kept,
                cfg.engine, cfg.video, cfg.vqa_generation, cfg.group_size, p["video_root"], p["out"])


_TASK_OPTIONS = dict(persist_result=True, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=is_transient)


@task(name="scan-captions", **_TASK_OPTIONS)
def scan_captions(path: str, chunk_size: int) -> list[ingest.ChunkSpec]:
    """Cut the caption file into chunks (cheap, never cached: it is how changes to the input are seen)."""
    return ingest.scan_input(Path(path), chunk_size)


@task(name="ingest-chunk", task_run_name="captions-{spec.chunk:05d}", **_TASK_OPTIONS)
def ingest_chunk(out: str, input: str, spec: ingest.ChunkSpec, cfg: ingest.IngestConfig, video_root: str) -> ChunkResult:
    return ingest.ingest_chunk(Path(input), spec, cfg, Path(video_root), Path(out))


@task(name="vscq1-chunk", task_run_name="vscq1-{prev.chunk:05d}", **_TASK_OPTIONS)
def vscq1_chunk(out: str, prev: ChunkResult, cfg: Vscq1Config) -> ChunkResult:
    files = prev.files_for("train", "eval")
    return run_in_stage_worker("vscq1", run_vscq1_chunk, Path(out), prev.chunk, files, cfg, prev.output_fingerprint)


@task(name="vscq2-chunk", task_run_name="vscq2-{prev.chunk:05d}", **_TASK_OPTIONS)
def vscq2_chunk(out: str, prev: ChunkResult, cfg: TeacherConfig, video_root: str) -> ChunkResult:
    files = prev.files_for("train", "eval")
    return run_in_stage_worker("vscq2", run_vscq2_chunk, Path(out), prev.chunk, files, cfg, Path(video_root),
                               prev.output_fingerprint)


@task(name="vqa-chunk", task_run_name="vqa-{prev.chunk:05d}", **_TASK_OPTIONS)
def vqa_chunk(out: str, prev: ChunkResult, cfg: TeacherConfig, video_root: str) -> ChunkResult:
    files = prev.files_for("train_kept", "eval_kept")
    return run_in_stage_worker("vqa", run_vqa_chunk, Path(out), prev.chunk, files, cfg, Path(video_root),
                               prev.output_fingerprint)


KEY_FUNCTIONS: dict[str, Callable[[TaskRunContext, dict[str, Any]], str]] = {
    "ingest-chunk": ingest_key, "vscq1-chunk": vscq1_key, "vscq2-chunk": vscq2_key, "vqa-chunk": vqa_key,
}


def result_storage(out: Path) -> LocalFileSystem:
    """A storage block for `<out>/.cache/prefect/results` (Prefect wants result storage saved server-side)."""
    path = out / ".cache" / "prefect" / "results"
    block = LocalFileSystem(basepath=str(path))
    block.save(f"qtsplus-results-{fingerprint(str(path))[:16]}", overwrite=True)
    return block


def cached(chunk_task: Any, out: Path) -> Any:
    """The task with its content-keyed cache (keys and results) stored under `<out>/.cache/prefect`."""
    policy = CacheKeyFnPolicy(cache_key_fn=KEY_FUNCTIONS[chunk_task.name]).configure(
        key_storage=out / ".cache" / "prefect" / "keys"
    )
    return chunk_task.with_options(cache_policy=policy, result_storage=result_storage(out))


@dataclass
class StageRun:
    """The results of one stage's chunk tasks and how each one ended (Completed, Cached, ...)."""

    stage: str
    results: list[ChunkResult] = field(default_factory=list)
    states: dict[int, str] = field(default_factory=dict)


def run_chunk_tasks(stage: str, chunk_task: Any, out: Path, calls: list[dict[str, Any]], progress: bool = True) -> StageRun:
    """Submit one cached task per chunk, wait for all, and recompute any cached result whose files are gone."""
    results, states = run_verified(cached(chunk_task, out), calls, lambda r: chunk_files_intact(out, r), stage, progress)
    return StageRun(stage, results, {r.chunk: states[i] for i, r in enumerate(results)})
