"""Tasks that close a stage (manifest) and a run (dataset card, run report, Prefect artifacts)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from qtsplus import ingest
from qtsplus.atomic import write_text_atomic
from qtsplus.build_config import BuildConfig
from qtsplus.dataset_card import COUNT_COLUMNS, counts_table, reasons_table, render_card, sample_questions
from qtsplus.shards import StageManifest, finalize_stage, load_manifest
from qtsplus.stages import teacher, vscq1
from schemas import Caption, Record, VQAAnswer, VSCQ1Question, VSCQ2Question
from tasks.common import StageRun

RECORDS: dict[str, type[Record]] = {"captions": Caption, "vscq1": VSCQ1Question, "vscq2": VSCQ2Question, "vqa": VQAAnswer}


def provenance(stage: str, config: BuildConfig) -> dict:
    """What a stage's output depends on, for its manifest: the same `depends_on` its chunk tasks' cache keys hash."""
    video_root = str(Path(config.video_root).resolve())
    if stage == "captions":
        return {"input": config.input} | ingest.depends_on(config.ingest, video_root)
    if stage == "vscq1":
        return vscq1.depends_on(config.vscq1)
    if stage == "vscq2":
        return teacher.depends_on_vscq2(config.teacher, video_root)
    return teacher.depends_on_vqa(config.teacher, video_root)


@task(name="finalize-stage", cache_policy=NO_CACHE)
def finalize(out: Path, run: StageRun, config: BuildConfig) -> StageManifest:
    """Write the stage's manifest (files, rows, sha256, provenance) and drop files no chunk references; log the stage's
    summary line (what the run's Logs tab shows for it)."""
    manifest = finalize_stage(out, run.stage, RECORDS[run.stage], run.results, provenance(run.stage, config))
    cached = sum(state == "Cached" for state in run.states.values())
    get_run_logger().info(f"{run.stage}: read {manifest.read}, kept {manifest.kept}, rejected {manifest.rejected}; "
                          f"{len(run.states)} chunks ({cached} cached) in {run.seconds:.1f} s")
    return manifest


class BuildSummary(BaseModel):
    """What a build-dataset run returns: where, how much, and which chunks were computed or cached."""

    out: str
    rows: dict[str, dict[str, int]]
    read: dict[str, int]
    rejected: dict[str, int]
    states: dict[str, dict[int, str]]
    replicas: dict[str, dict] = {}  # per model stage: its pool (size, starts, chunks per replica), who computed each chunk


@task(name="publish-build", cache_policy=NO_CACHE)
def publish_build(out: Path, runs: list[StageRun], config: BuildConfig,
                  pools: dict[str, dict] | None = None) -> BuildSummary:
    """Dataset card, run report, and the Prefect artifacts (counts per stage and filter, sample questions, which
    replica computed each chunk). `pools`: each model stage's replica pool statistics."""
    manifests = [load_manifest(out, run.stage) for run in runs]
    card = render_card(out, manifests)
    write_text_atomic(out / "README.md", card)
    summary = BuildSummary(
        out=str(out),
        rows={m.stage: m.rows_per_split for m in manifests},
        read={m.stage: m.read for m in manifests},
        rejected={m.stage: m.rejected for m in manifests},
        states={run.stage: run.states for run in runs},
        replicas={run.stage: {"pool": (pools or {}).get(run.stage, {}),
                              "computed_by": {r.chunk: r.replica for r in run.results}}
                  for run in runs if run.stage in (pools or {})},
    )
    report = summary.model_dump(mode="json") | {"finished_at": datetime.now(timezone.utc).isoformat()}
    write_text_atomic(out / "run-report.json", json.dumps(report, indent=2) + "\n")
    columns = "; ".join(f"{k}: {v}" for k, v in COUNT_COLUMNS.items())
    create_table_artifact(key="build-dataset-counts", table=counts_table(manifests),
                          description=f"One row per stage of {out}. {columns}; split columns: rows written per split")
    create_table_artifact(key="build-dataset-rejects", table=reasons_table(manifests),
                          description="Rejected input rows per stage and reason (each has a record in the stage's "
                                      "rejects split)")
    vscq1 = next((m for m in manifests if m.stage == "vscq1"), None)
    if vscq1 is not None:
        create_table_artifact(key="build-dataset-sample-questions", table=sample_questions(out, vscq1, n=10),
                              description="First questions of QTS-VSCQ1")
    create_table_artifact(key="build-dataset-replicas", table=[
        {"stage": run.stage, "chunk": r.chunk, "state": run.states[r.chunk]}
        | {k: r.replica.get(k, "") for k in ("replica", "host", "pid", "devices")}
        for run in runs if run.stage in (pools or {}) for r in run.results
    ], description="Which model replica computed each chunk (Cached: the replica of the run that computed it)")
    create_markdown_artifact(key="build-dataset-card", markdown=card, description="Dataset card")
    return summary
