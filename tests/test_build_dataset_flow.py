"""build-dataset end to end through the CLI, in real subprocesses, with real Prefect, Parquet and tiny models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from qtsplus.shards import load_manifest
from schemas import Caption, VQAAnswer, VSCQ1Question, VSCQ2Question, arrow_schema
from tests.conftest import EXAMPLES, REPO, run_cli, write_bad_corpus

pytestmark = pytest.mark.slow
RECORDS = {"captions": Caption, "vscq1": VSCQ1Question, "vscq2": VSCQ2Question, "vqa": VQAAnswer}


def report(out: Path) -> dict:
    return json.loads((out / "run-report.json").read_text())


def states(out: Path, stage: str) -> list[str]:
    return [s for _, s in sorted(report(out)["states"][stage].items(), key=lambda kv: int(kv[0]))]


def rows_by_file(out: Path) -> dict[str, list[dict]]:
    """Every final shard's rows, by relative path."""
    return {str(p.relative_to(out)): pq.read_table(p).to_pylist() for p in sorted(out.glob("*/*.parquet"))}


def loads(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_smoke_writes_every_stage_loadable_with_declared_features(smoke) -> None:
    out, _, log = smoke
    assert loads(log) == 3  # one model load per model stage run: vscq1, vscq2, vqa
    for stage, record in RECORDS.items():
        manifest = load_manifest(out, stage)
        assert manifest.read == manifest.kept + manifest.rejected
        data_splits = sorted({f.split for f in manifest.files if f.split != "rejects"})
        assert data_splits, stage
        for split in data_splits:
            ds = datasets.load_dataset("parquet", data_files=str(out / stage / f"{split}-*.parquet"), split="train")
            assert ds.features == datasets.Features.from_arrow_schema(arrow_schema(record))
            assert len(ds) == manifest.rows_per_split[split]
        for f in manifest.files:
            assert pq.read_metadata(out / f.path).num_rows == f.rows
        assert manifest.provenance["code_version"]
    m1, m2 = load_manifest(out, "vscq1"), load_manifest(out, "vscq2")
    assert m2.read == sum(v for k, v in m1.rows_per_split.items() if k != "rejects")
    assert load_manifest(out, "vqa").read == m2.rows_per_split.get("train_kept", 0) + m2.rows_per_split.get("eval_kept", 0)
    assert m1.provenance["prompt_version"].startswith("vscq1-v1+")
    assert m2.provenance["resolved_models"][0].startswith("tiny/qwen2.5-vl@")
    train = {r["video"] for f in out.glob("captions/train-*.parquet") for r in pq.read_table(f).to_pylist()}
    evals = {r["video"] for f in out.glob("captions/eval-*.parquet") for r in pq.read_table(f).to_pylist()}
    assert train and evals and not train & evals
    card = (out / "README.md").read_text()
    assert "Answer-key distribution" in card and "split train_kept" in card


def test_identical_rerun_is_cached_loads_no_model_and_changes_nothing(smoke) -> None:
    out, env, log = smoke
    before = rows_by_file(out)
    shas = {f.path: f.sha256 for stage in RECORDS for f in load_manifest(out, stage).files}
    n = loads(log)
    run_cli(["build-dataset", "--out", str(out), "--preset", "smoke"], env)
    assert loads(log) == n
    for stage in RECORDS:
        assert set(states(out, stage)) == {"Cached"}, stage
    assert rows_by_file(out) == before
    assert {f.path: f.sha256 for stage in RECORDS for f in load_manifest(out, stage).files} == shas


def test_killed_in_stage_two_then_resumed_equals_uninterrupted(smoke, tmp_path: Path) -> None:
    reference, env, _ = smoke
    out = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, "-m", "qtsplus.cli", "build-dataset", "--out", str(out), "--preset", "smoke"],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while not list(out.glob("vscq2/*-0000[0-9].parquet")):
        assert proc.poll() is None, "the run ended before stage 2 started"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = {p.name.rsplit("-", 1)[1] for p in out.glob("vscq2/*.parquet")}
    assert len(done_at_kill) < 3, "stage 2 had already finished: the kill was not in the middle"
    assert not (out / "vscq2" / "manifest.json").exists() and not (out / "vqa").exists()
    for p in out.rglob("*.parquet"):  # anything under a final name is a complete file
        pq.read_table(p)

    run_cli(["build-dataset", "--out", str(out), "--preset", "smoke"], env)
    assert set(states(out, "captions")) == set(states(out, "vscq1")) == {"Cached"}
    recomputed = [s for s in states(out, "vscq2") if s != "Cached"]
    assert len(recomputed) <= 3 - len(done_at_kill) + 1  # at most the chunk that was in flight, plus the rest
    assert rows_by_file(out) == rows_by_file(reference)
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]


def test_teacher_change_recomputes_two_and_three_and_appends_compute_only_new_chunks(prefect_env, tmp_path: Path) -> None:
    captions = tmp_path / "captions.jsonl"
    lines = (EXAMPLES / "captions.jsonl").read_text().splitlines(keepends=True)
    captions.write_text("".join(lines[:8]))
    out = tmp_path / "ds"
    base = ["build-dataset", "--out", str(out), "--preset", "smoke", "--input", str(captions)]
    run_cli(base, prefect_env)
    assert set(states(out, "vqa")) == {"Completed"}

    run_cli([*base, "--set", "teacher.video.fps=2.0"], prefect_env)
    assert set(states(out, "captions")) == set(states(out, "vscq1")) == {"Cached"}
    assert set(states(out, "vscq2")) == set(states(out, "vqa")) == {"Completed"}

    captions.write_text("".join(lines))  # 4 more captions: one new chunk
    run_cli([*base, "--set", "teacher.video.fps=2.0"], prefect_env)
    for stage in RECORDS:
        assert states(out, stage) == ["Cached", "Cached", "Completed"], stage
    assert load_manifest(out, "captions").read == 12


def test_bad_input_corpus_completes_with_every_row_accounted(prefect_env, tmp_path: Path) -> None:
    path, videos, expected = write_bad_corpus(tmp_path)
    out = tmp_path / "ds"
    run_cli(["build-dataset", "--out", str(out), "--preset", "smoke", "--input", str(path), "--video-root", str(videos)],
            prefect_env)
    captions = load_manifest(out, "captions")
    assert (captions.read, captions.kept, captions.rejected) == (len(expected) + 2, 2, len(expected))
    assert sum(captions.reasons.values()) == len(expected)
    assert set(captions.reasons) == set(expected.values())
    for stage in RECORDS:
        m = load_manifest(out, stage)
        assert m.kept + m.rejected == m.read, stage
        assert "video_decode_error" not in m.reasons, stage  # corrupt videos are rejected once, at ingest
    rejects = datasets.load_dataset("parquet", data_files=str(out / "captions" / "rejects-*.parquet"), split="train")
    assert len(rejects) == len(expected) and all(r["reason"] and r["detail"] for r in rejects)
