"""Prefect tasks of evaluate: a cached wrapper around `qtsplus.evaluation.evaluate.evaluate_checkpoint`.

Cache key: the checkpoint's files (sha256 of weights and config) + the eval data's manifests + what the evaluation
depends on (`qtsplus.evaluation.evaluate.depends_on`: the eval config, which names the report folder, and the
fingerprint of the code it reaches).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from qtsplus.atomic import write_text_atomic
from qtsplus.evaluation.config import EvalConfig
from qtsplus.evaluation.evaluate import PREDICTIONS, EvalSummary, depends_on, evaluate_checkpoint
from qtsplus.fingerprint import file_sha256, fingerprint
from qtsplus.shards import manifest_digests
from tasks.common import cached, is_transient
from tasks.gpu import gpu_slot


@task(name="checkpoint-fingerprint", cache_policy=NO_CACHE)
def checkpoint_fingerprint(checkpoint: str) -> str:
    """sha256 over the checkpoint's weight and config files."""
    root = Path(checkpoint)
    if not root.is_dir():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint folder (train-selector exports RUN/final)")
    files = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".json"))
    if not any(p.suffix == ".safetensors" for p in files):
        raise FileNotFoundError(f"{checkpoint}: no .safetensors weights")
    return fingerprint([(p.name, file_sha256(p)) for p in files])


@task(name="eval-data-fingerprint", cache_policy=NO_CACHE)
def eval_data_fingerprint(data: str) -> str:
    return fingerprint(list(manifest_digests(Path(data)).values()))


def eval_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    return fingerprint("evaluate", depends_on(p["cfg"]), p["checkpoint_fp"], p["data_fp"])


@task(name="evaluate-run", persist_result=True, retries=1, retry_delay_seconds=5, retry_condition_fn=is_transient)
def evaluate_run(cfg: EvalConfig, checkpoint_fp: str, data_fp: str) -> EvalSummary:
    with gpu_slot():
        return evaluate_checkpoint(cfg, progress=False)


def cached_evaluate_run(out: Path) -> Any:
    return cached(evaluate_run, out, eval_key)


def report_intact(summary: EvalSummary) -> bool:
    path = Path(summary.out) / PREDICTIONS
    return path.is_file() and file_sha256(path) == summary.predictions_sha256


@task(name="publish-evaluation", cache_policy=NO_CACHE)
def publish_evaluation(summary: EvalSummary, cfg: EvalConfig, state: str) -> None:
    """run-report.json (with what the evaluation depends on) and artifacts: accuracy / tokens / TokDense per method,
    the report with its plots inlined."""
    out = Path(summary.out)
    report = {"state": state} | summary.model_dump() | {"depends_on": depends_on(cfg)}
    write_text_atomic(out / "run-report.json", json.dumps(report, indent=2) + "\n")
    rows = [{"method": m, "accuracy": summary.accuracy.get(m), "visual tokens kept": summary.tokens_kept.get(m),
             "TokDense": summary.tokdense.get(m)} for m in summary.methods]
    create_table_artifact(key="evaluate-methods", table=rows, description=f"Methods compared ({state})")
    report = (out / "report.md").read_text()
    for png in sorted(out.glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode()
        report = report.replace(f"]({png.name})", f"](data:image/png;base64,{data})")
    create_markdown_artifact(key="evaluate-report", markdown=report, description="Evaluation report")
