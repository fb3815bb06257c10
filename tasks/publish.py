"""Tasks that close a stage (manifest) and a run (dataset card, run report, Prefect artifacts)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from qtsplus.config import BuildConfig
from qtsplus.dataset_card import counts_table, render_card, sample_questions
from qtsplus.fingerprint import canonical, code_version
from qtsplus.prompts import MCQ, VQA, VSCQ1
from qtsplus.shards import StageManifest, finalize_stage, load_manifest, write_text_atomic
from schemas import Caption, Record, VQAAnswer, VSCQ1Question, VSCQ2Question
from tasks.build_dataset import CODE, StageRun

RECORDS: dict[str, type[Record]] = {"captions": Caption, "vscq1": VSCQ1Question, "vscq2": VSCQ2Question, "vqa": VQAAnswer}


def provenance(stage: str, config: BuildConfig) -> dict:
    """What a stage's output depends on, for its manifest."""
    if stage == "captions":
        return {"input": config.input, "video_root": config.video_root, "ingest": canonical(config.ingest),
                "code_version": code_version(*CODE["ingest"])}
    if stage == "vscq1":
        c = config.vscq1
        return {"model_id": c.engine.model_id, "revision": c.engine.revision, "backend": c.engine.backend,
                "prompt_version": VSCQ1.version, "parameters": canonical(c.generation) | {
                    "n_questions": c.n_questions, "max_field_chars": c.max_field_chars, "shuffle_seed": c.shuffle_seed},
                "code_version": code_version(*CODE["vscq1"])}
    t = config.teacher
    common = {"model_id": t.engine.model_id, "revision": t.engine.revision, "backend": t.engine.backend,
              "video_sampling": canonical(t.video), "code_version": code_version(*CODE["teacher"])}
    if stage == "vscq2":
        return common | {"prompt_version": MCQ.version, "parameters": {"scoring": "option-letter probabilities"}}
    return common | {"prompt_version": VQA.version, "parameters": canonical(t.vqa_generation)}


@task(name="finalize-stage", cache_policy=NO_CACHE)
def finalize(out: Path, run: StageRun, config: BuildConfig) -> StageManifest:
    """Write the stage's manifest (files, rows, sha256, provenance) and drop files no chunk references."""
    return finalize_stage(out, run.stage, RECORDS[run.stage], run.results, provenance(run.stage, config))


class BuildSummary(BaseModel):
    """What a build-dataset run returns: where, how much, and which chunks were computed or cached."""

    out: str
    rows: dict[str, dict[str, int]]
    read: dict[str, int]
    rejected: dict[str, int]
    states: dict[str, dict[int, str]]


@task(name="publish-build", cache_policy=NO_CACHE)
def publish_build(out: Path, runs: list[StageRun], config: BuildConfig) -> BuildSummary:
    """Dataset card, run report, and the Prefect artifacts (counts per stage and filter, sample questions)."""
    manifests = [load_manifest(out, run.stage) for run in runs]
    card = render_card(out, manifests)
    write_text_atomic(out / "README.md", card)
    summary = BuildSummary(
        out=str(out),
        rows={m.stage: m.rows_per_split for m in manifests},
        read={m.stage: m.read for m in manifests},
        rejected={m.stage: m.rejected for m in manifests},
        states={run.stage: run.states for run in runs},
    )
    report = summary.model_dump(mode="json") | {"finished_at": datetime.now(timezone.utc).isoformat()}
    write_text_atomic(out / "run-report.json", json.dumps(report, indent=2) + "\n")
    create_table_artifact(key="build-dataset-counts", table=counts_table(manifests),
                          description=f"Rows per stage and filter in {out}")
    vscq1 = next((m for m in manifests if m.stage == "vscq1"), None)
    if vscq1 is not None:
        create_table_artifact(key="build-dataset-sample-questions", table=sample_questions(out, vscq1, n=10),
                              description="First questions of QTS-VSCQ1")
    create_markdown_artifact(key="build-dataset-card", markdown=card, description="Dataset card")
    return summary
