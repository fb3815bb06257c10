"""What a user reads in the Prefect UI after the session's smoke build and training, read back through the client:
the artifacts have the columns and rows they are designed to have, and the Logs tab has one summary line per stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtsplus.cli import local_api
from qtsplus.dataset_card import COUNT_COLUMNS
from qtsplus.shards import load_manifest
from schemas import OPTION_KEYS

pytestmark = pytest.mark.slow
STAGES = ("captions", "vscq1", "vscq2", "vqa")


@pytest.fixture(scope="module")
def client(smoke):
    """A Prefect client on the session's local API (restarted if it went idle: the database is the same)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _, env, _ = smoke
    url = local_api.ensure(Path(env["PREFECT_HOME"]))
    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as c:
        yield c


def latest_table(client, key: str) -> list[dict]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                  sort=ArtifactSort.CREATED_DESC, limit=1)
    assert found, f"no artifact {key!r}"
    data = found[0].data
    return json.loads(data) if isinstance(data, str) else data


def test_counts_artifact_has_one_row_per_stage_with_unambiguous_columns(smoke, client) -> None:
    data, _, _ = smoke
    rows = latest_table(client, "build-dataset-counts")
    assert [r["stage"] for r in rows] == list(STAGES)
    for row in rows:
        assert set(COUNT_COLUMNS) <= set(row)
        manifest = load_manifest(data, row["stage"])
        assert (row["read"], row["rejected"]) == (manifest.read, manifest.rejected)
        for split, n in manifest.rows_per_split.items():
            assert row[f"split {split}"] == n
    vscq2 = rows[2]
    kept = vscq2["split train_kept"] + vscq2["split eval_kept"]
    assert vscq2["passed on"] == kept < vscq2["read"]  # the screened-out questions are not passed on
    stats = load_manifest(data, "vscq2").stats
    assert vscq2["teacher correct %"] == round(100 * stats["correct"] / (stats["correct"] + stats["wrong"]), 1)
    assert all(r["teacher correct %"] == "" for r in rows if r["stage"] != "vscq2")


def test_sample_questions_fit_a_page_with_the_answer_first(client) -> None:
    rows = latest_table(client, "build-dataset-sample-questions")
    assert rows and list(rows[0])[:3] == ["answer", "type", "question"]
    assert all(k in rows[0] for k in OPTION_KEYS)
    for row in rows:
        assert row["answer"] in OPTION_KEYS
        assert len(row["question"]) <= 60 and all(len(row[k]) <= 30 for k in OPTION_KEYS)


def test_each_stage_logs_one_summary_line(smoke, client) -> None:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    data, _, _ = smoke
    runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=50)
    run = next(r for r in runs if r.parameters.get("config", {}).get("out") == str(data.resolve()))
    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), limit=200)
    lines = [log.message for log in logs if log.level == 20]
    for stage in STAGES:
        manifest = load_manifest(data, stage)
        summary = [m for m in lines if m.startswith(f"{stage}: read {manifest.read}, kept {manifest.kept}, "
                                                    f"rejected {manifest.rejected}; ")]
        assert len(summary) == 1, (stage, lines)


def test_training_metrics_table_lists_each_step_once(trained, client) -> None:
    rows = latest_table(client, "train-selector-metrics")
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # TRAIN_STEPS: 12 steps, the last one listed once


def test_progress_artifacts_are_keyed_per_stage(client) -> None:
    """Keyed artifacts are what the Artifacts page lists: one progress artifact per stage, at 100% after the build."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, ArtifactFilterType

    for stage in STAGES:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"progress-{stage}"]), type=ArtifactFilterType(any_=["progress"])))
        assert found and all(a.data == 100.0 for a in found), stage
