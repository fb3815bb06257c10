"""evaluate: the smoke chain build -> train -> evaluate from the CLI, and what its outputs must satisfy."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from qtsplus.evaluation.harness import ordered_methods
from qtsplus.evaluation.metrics import rouge_l
from qtsplus.shards import load_manifest
from tests.conftest import run_cli

pytestmark = pytest.mark.slow
OUTPUTS = ["predictions.parquet", "metrics.json", "report.md", "accuracy_vs_tokens.png", "latency_vs_frames.png",
           "latency.json", "eval-config.json", "run-report.json"]


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory) -> tuple[Path, Path, list[dict], dict]:
    data, run, env = trained
    out = tmp_path_factory.mktemp("eval") / "report"
    run_cli(["evaluate", "--data", str(data), "--checkpoint", str(run / "final"), "--out", str(out),
             "--preset", "smoke"], env)
    rows = pq.read_table(out / "predictions.parquet").to_pylist()
    return data, out, rows, env


def test_chain_writes_every_output_with_real_plots(evaluated) -> None:
    _, out, rows, _ = evaluated
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    for png in ("accuracy_vs_tokens.png", "latency_vs_frames.png"):
        image = np.asarray(Image.open(out / png).convert("L"))
        assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 5, png  # drawn, not blank
    methods = {r["method"] for r in rows}
    assert methods == {"teacher", "no_selection", "qtsplus", "uniform_frames", "random_tokens"}
    report = (out / "report.md").read_text()
    assert "![accuracy vs tokens](accuracy_vs_tokens.png)" in report and "TokDense" in report
    sweep = json.loads((out / "latency.json").read_text())
    full = {r["frames"]: r["video_tokens_kept"] for r in sweep if r["method"] == "no_selection"}
    assert list(full.values()) == sorted(full.values()) and len(set(full.values())) == len(full)  # grows with frames


def test_metrics_equal_a_recomputation_from_predictions(evaluated) -> None:
    _, out, rows, _ = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    by = defaultdict(list)
    for r in rows:
        by[(r["method"], r["task"])].append(r)
    for method, m in metrics.items():
        mcq, vqa = by[(method, "mcq")], by[(method, "vqa")]
        acc = sum(r["correct"] for r in mcq) / len(mcq)
        kept = sum(r["video_tokens_kept"] for r in mcq) / len(mcq)
        assert m["accuracy"] == pytest.approx(acc) and m["video_tokens_kept"] == pytest.approx(kept)
        assert m["tokdense"] == pytest.approx(acc / kept)
        assert m["rouge_l"] == pytest.approx(sum(rouge_l(r["prediction"], r["reference"]) for r in vqa) / len(vqa))
        for qtype, value in m["accuracy_by_type"].items():
            group = [r["correct"] for r in mcq if r["question_type"] == qtype]
            assert value == pytest.approx(sum(group) / len(group))
        for r in mcq:
            assert r["correct"] == (r["prediction"] == r["reference"])
            probs = r["option_probs"]
            assert r["prediction"] == max(probs, key=probs.get) and sum(probs.values()) == pytest.approx(1.0)


def test_comparators_get_and_report_the_budget_qtsplus_kept(evaluated) -> None:
    _, _, rows, _ = evaluated
    kept = {(r["task"], r["question_id"]): r["video_tokens_kept"] for r in rows if r["method"] == "qtsplus"}
    assert kept and all(0 < v for v in kept.values())
    for r in rows:
        if r["method"] in ("uniform_frames", "random_tokens"):
            assert r["budget"] == kept[(r["task"], r["question_id"])]
            assert r["video_tokens_kept"] <= r["budget"]
            if r["method"] == "random_tokens":
                assert r["video_tokens_kept"] == r["budget"]
        if r["method"] in ("teacher", "no_selection"):
            assert r["budget"] is None and r["video_tokens_kept"] == r["video_tokens_in"]
        assert r["lm_tokens"] > r["video_tokens_kept"]


def test_selection_off_matches_the_teacher_exactly(evaluated) -> None:
    data, _, rows, _ = evaluated
    screened = {}
    for f in load_manifest(data, "vscq2").files:
        if f.split == "eval_kept":
            for q in pq.read_table(data / f.path).to_pylist():
                screened[q["question_id"]] = q
    for method in ("teacher", "no_selection"):
        mcq = [r for r in rows if r["method"] == method and r["task"] == "mcq"]
        assert {r["question_id"] for r in mcq} == set(screened)
        for r in mcq:
            assert r["prediction"] == screened[r["question_id"]]["teacher_answer"]
            for k, p in r["option_probs"].items():
                assert p == pytest.approx(screened[r["question_id"]]["teacher_probs"][k], abs=1e-5)
    teacher = {(r["task"], r["question_id"]): r["prediction"] for r in rows if r["method"] == "teacher"}
    off = {(r["task"], r["question_id"]): r["prediction"] for r in rows if r["method"] == "no_selection"}
    assert teacher == off  # the `selector` variant leaves the LM untouched: selection off is the teacher


def test_identical_rerun_is_cached(evaluated) -> None:
    data, out, rows, env = evaluated
    checkpoint = json.loads((out / "eval-config.json").read_text())["checkpoint"]
    run_cli(["evaluate", "--data", str(data), "--checkpoint", checkpoint, "--out", str(out), "--preset", "smoke"], env)
    assert json.loads((out / "run-report.json").read_text())["state"] == "Cached"
    assert pq.read_table(out / "predictions.parquet").to_pylist() == rows


def test_methods_are_ordered_and_checked() -> None:
    assert ordered_methods(["teacher", "random_tokens", "qtsplus"]) == ["qtsplus", "teacher", "random_tokens"]
    with pytest.raises(ValueError, match="unknown methods"):
        ordered_methods(["qtsplus", "magic"])
    assert rouge_l("a man rides a bike", "a man rides a red bike") == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))
    assert rouge_l("", "x") == 0.0


def test_flexselect_and_vqtoken_plug_into_the_harness_at_equal_budgets(evaluated, tmp_path: Path) -> None:
    from qtsplus.evaluation.config import EvalConfig
    from qtsplus.evaluation.evaluate import evaluate_checkpoint, read_predictions

    data, out, _, _ = evaluated
    checkpoint = json.loads((out / "eval-config.json").read_text())["checkpoint"]
    cfg = EvalConfig.preset("smoke", data=str(data), checkpoint=checkpoint, out=str(tmp_path / "r"), max_vqa=2,
                            methods=["qtsplus", "flexselect", "vqtoken"], latency_frames=[],
                            method_options={"flexselect": {"reference_layer": 1}})  # the tiny LM has 2 layers
    summary = evaluate_checkpoint(cfg, progress=False)
    assert set(summary.tokdense) == {"qtsplus", "flexselect", "vqtoken"}
    rows = read_predictions(tmp_path / "r")
    kept = {(r.task, r.question_id): r.video_tokens_kept for r in rows if r.method == "qtsplus"}
    for r in rows:
        if r.method != "qtsplus":
            assert r.budget == kept[(r.task, r.question_id)] and r.video_tokens_kept == r.budget
