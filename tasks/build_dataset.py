"""Prefect tasks of build-dataset: thin, cached wrappers around the library's stage functions.

A chunk task's cache key is content only: the chunk's input fingerprint (raw bytes for ingest, the previous stage's
output files for the others) + what the stage declares it depends on (`depends_on` in its library module: config,
prompt version, model, the fingerprint of the code it reaches) + the schema version + the output folder. The same
`depends_on` is the stage manifest's provenance (tasks/publish.py), so the two cannot drift.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from qtsplus import ingest
from qtsplus.fingerprint import fingerprint
from qtsplus.shards import ChunkResult, chunk_files_intact
from qtsplus.stages import teacher, vscq1
from qtsplus.stages.teacher import TeacherConfig, run_vqa_chunk, run_vscq2_chunk
from qtsplus.stages.vscq1 import Vscq1Config, run_vscq1_chunk
from schemas import SCHEMA_VERSION
from tasks.chunks import on_replica, run_verified
from tasks.common import TASK_OPTIONS, StageRun, cached


def ingest_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    return fingerprint("ingest", SCHEMA_VERSION, ingest.depends_on(p["cfg"], p["video_root"]), p["spec"], p["out"])


def vscq1_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    return fingerprint("vscq1", SCHEMA_VERSION, vscq1.depends_on(p["cfg"]), p["prev"].output_fingerprint, p["out"])


def vscq2_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    return fingerprint("vscq2", SCHEMA_VERSION, teacher.depends_on_vscq2(p["cfg"], p["video_root"]),
                       p["prev"].output_fingerprint, p["out"])


def vqa_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    kept = [(f.path, f.sha256) for f in p["prev"].files if f.split.endswith("_kept")]
    return fingerprint("vqa", SCHEMA_VERSION, teacher.depends_on_vqa(p["cfg"], p["video_root"]), kept, p["out"])


@task(name="scan-captions", **TASK_OPTIONS)
def scan_captions(path: str, chunk_size: int) -> list[ingest.ChunkSpec]:
    """Cut the caption file into chunks (cheap, never cached: it is how changes to the input are seen)."""
    return ingest.scan_input(Path(path), chunk_size)


@task(name="ingest-chunk", task_run_name="captions-{spec.chunk:05d}", **TASK_OPTIONS)
def ingest_chunk(out: str, input: str, spec: ingest.ChunkSpec, cfg: ingest.IngestConfig, video_root: str) -> ChunkResult:
    return ingest.ingest_chunk(Path(input), spec, cfg, Path(video_root), Path(out))


@task(name="vscq1-chunk", task_run_name="vscq1-{prev.chunk:05d}", **TASK_OPTIONS)
def vscq1_chunk(out: str, prev: ChunkResult, cfg: Vscq1Config) -> ChunkResult:
    files = prev.files_for("train", "eval")
    return on_replica("vscq1", run_vscq1_chunk, Path(out), prev.chunk, files, cfg, prev.output_fingerprint)


@task(name="vscq2-chunk", task_run_name="vscq2-{prev.chunk:05d}", **TASK_OPTIONS)
def vscq2_chunk(out: str, prev: ChunkResult, cfg: TeacherConfig, video_root: str) -> ChunkResult:
    files = prev.files_for("train", "eval")
    return on_replica("vscq2", run_vscq2_chunk, Path(out), prev.chunk, files, cfg, Path(video_root),
                      prev.output_fingerprint)


@task(name="vqa-chunk", task_run_name="vqa-{prev.chunk:05d}", **TASK_OPTIONS)
def vqa_chunk(out: str, prev: ChunkResult, cfg: TeacherConfig, video_root: str) -> ChunkResult:
    files = prev.files_for("train_kept", "eval_kept")
    return on_replica("vqa", run_vqa_chunk, Path(out), prev.chunk, files, cfg, Path(video_root),
                      prev.output_fingerprint)


KEY_FUNCTIONS: dict[str, Callable[[TaskRunContext, dict[str, Any]], str]] = {
    "ingest-chunk": ingest_key, "vscq1-chunk": vscq1_key, "vscq2-chunk": vscq2_key, "vqa-chunk": vqa_key,
}


def run_chunk_tasks(stage: str, chunk_task: Any, out: Path, calls: list[dict[str, Any]], progress: bool = True,
                    concurrency: int | None = None) -> StageRun:
    """Submit one cached task per chunk, wait for all, and recompute any cached result whose files are gone;
    `concurrency`: this stage's task threads (a model stage: from its replica pool; None: the flow's runner)."""
    runnable = cached(chunk_task, out, KEY_FUNCTIONS[chunk_task.name])
    start = time.perf_counter()
    results, states = run_verified(runnable, calls, lambda r: chunk_files_intact(out, r), stage, progress, concurrency)
    return StageRun(stage, results, {r.chunk: states[i] for i, r in enumerate(results)}, time.perf_counter() - start)
