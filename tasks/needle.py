"""Prefect tasks of build-needle: a cached wrapper per chunk of videos around `qtsplus.needle.build_chunk`, and the
tasks that close the run (manifests, card, artifacts).

A chunk's cache key is content only: what every chunk depends on (`qtsplus.needle.depends_on`: the configuration
less the output folder, the fingerprint of the code it reaches) + the chunk's span + the schema version + the output
folder. A cached result whose shards or frames are gone is recomputed ("Recomputed").
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from pydantic import BaseModel

from qtsplus.atomic import write_text_atomic
from qtsplus.dataset_card import counts_table, sample_questions
from qtsplus.fingerprint import fingerprint
from qtsplus.needle import (
    NeedleChunk,
    NeedleChunkResult,
    NeedleConfig,
    build_chunk,
    chunk_intact,
    depends_on,
    write_card,
)
from qtsplus.needle import finalize as finalize_stages
from schemas import SCHEMA_VERSION
from tasks.chunks import run_verified
from tasks.common import TASK_OPTIONS, cached, run_cached


def needle_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    return fingerprint("needle-chunk", SCHEMA_VERSION, depends_on(p["cfg"]), p["chunk"], p["out"])


@task(name="needle-chunk", task_run_name="needle-{chunk.chunk:05d}", **TASK_OPTIONS)
def needle_chunk(out: str, cfg: NeedleConfig, chunk: NeedleChunk) -> NeedleChunkResult:
    return build_chunk(cfg, chunk, Path(out))


@dataclass
class NeedleRun:
    results: list[NeedleChunkResult] = field(default_factory=list)
    states: dict[int, str] = field(default_factory=dict)


def run_needle_chunks(out: Path, cfg: NeedleConfig, chunks: list[NeedleChunk], progress: bool = True) -> NeedleRun:
    """One cached task per chunk; a cached result whose files are gone is recomputed."""
    calls = [dict(out=str(out), cfg=cfg, chunk=c) for c in chunks]
    results, states = run_verified(cached(needle_chunk, out, needle_key), calls,
                                   lambda r: chunk_intact(out, cfg, r), "needle", progress)
    return NeedleRun(results, {r.chunk: states[i] for i, r in enumerate(results)})


class NeedleSummary(BaseModel):
    """What a build-needle run returns (and writes to <out>/run-report.json)."""

    out: str
    videos: dict[str, int]
    rows: dict[str, dict[str, int]]
    tokens_per_video: int
    states: dict[int, str]


@task(name="publish-needle", cache_policy=NO_CACHE)
def publish_needle(out: Path, cfg: NeedleConfig, run: NeedleRun) -> NeedleSummary:
    """Manifests of every stage, the dataset card, the run report and the Prefect artifacts."""
    manifests = finalize_stages(out, cfg, run.results)
    write_card(out, cfg, manifests)
    videos = Counter(r.split for r in run.results for _ in r.videos)
    summary = NeedleSummary(out=str(out), videos=dict(videos), rows={m.stage: m.rows_per_split for m in manifests},
                            tokens_per_video=cfg.tokens, states=run.states)
    report = summary.model_dump(mode="json") | {"depends_on": depends_on(cfg),
                                                "finished_at": datetime.now(timezone.utc).isoformat()}
    write_text_atomic(out / "run-report.json", json.dumps(report, indent=2) + "\n")
    create_table_artifact(key="build-needle-counts", table=counts_table(manifests),
                          description=f"Rows per stage in {out}")
    vscq1 = next(m for m in manifests if m.stage == "vscq1")
    create_table_artifact(key="build-needle-sample-questions", table=sample_questions(out, vscq1, n=10),
                          description="First needle questions")
    create_markdown_artifact(key="build-needle-card", markdown=(out / "README.md").read_text(),
                             description="Needle dataset card")
    return summary


def host_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    from qtsplus.needle.vision import depends_on as host_depends_on

    return fingerprint("needle-host", host_depends_on(p["data"], p["teaching"]), p["out"])


@task(name="needle-host", **TASK_OPTIONS)
def needle_host(out: str, data: NeedleConfig, teaching: Any, progress: bool = True) -> str:
    """The host with its vision tower taught (qtsplus.needle.vision.teach_vision)."""
    from qtsplus.needle.vision import teach_vision

    return str(teach_vision(data, teaching, Path(out), progress))


def run_needle_host(out: Path, data: NeedleConfig, teaching: Any, progress: bool = True) -> tuple[str, str]:
    """(host folder, state): cached on the scenes, the teaching config, the untrained host and the code; recomputed
    when the folder's weights are gone."""
    from qtsplus.needle.vision import RECORD

    kwargs = dict(out=str(out), data=data, teaching=teaching, progress=progress)
    return run_cached(cached(needle_host, out.parent, host_key), kwargs,
                      lambda r: (Path(r) / "model.safetensors").is_file() and (Path(r) / RECORD).is_file())
