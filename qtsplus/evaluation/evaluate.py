"""Evaluate a checkpoint: predictions.parquet, metrics.json, latency.json, plots and report.md in `cfg.out`."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from qtsplus.atomic import write_text_atomic
from qtsplus.evaluation.config import EvalConfig
from qtsplus.evaluation.harness import Harness, latency_sweep, run_predictions
from qtsplus.evaluation.metrics import summarize
from qtsplus.evaluation.report import (
    plot_accuracy_vs_budget,
    plot_accuracy_vs_tokens,
    plot_latency_sweep,
    render_report,
)
from qtsplus.fingerprint import code_fingerprint, file_sha256
from schemas import EvalPrediction, to_table

PREDICTIONS = "predictions.parquet"


class EvalSummary(BaseModel):
    """What an evaluate run produced (small: what the Prefect task caches)."""

    out: str
    methods: list[str]
    accuracy: dict[str, float]
    tokens_kept: dict[str, float]
    tokdense: dict[str, float]
    predictions_sha256: str
    files: list[str]


def depends_on(cfg: EvalConfig) -> dict[str, Any]:
    """What an evaluation's report depends on besides the checkpoint's and the data's files: the cache key of the
    evaluate task and the provenance in its run report."""
    return {"config": cfg.model_dump(mode="json"), "code_version": code_fingerprint(evaluate_checkpoint)}


def read_predictions(out: Path) -> list[EvalPrediction]:
    return [EvalPrediction.model_validate(r) for r in pq.read_table(out / PREDICTIONS).to_pylist()]


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate_checkpoint(cfg: EvalConfig, progress: bool = True) -> EvalSummary:
    """Run every method on the held-out splits and write the report."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    harness = Harness(cfg)
    bars: dict[str, tqdm] = {}

    def tick(label: str, i: int, n: int) -> None:
        if not progress:
            return
        bar = bars.setdefault(label, tqdm(total=n, desc=label, unit="sample", leave=False))
        bar.update(1)

    predictions = run_predictions(harness, tick)
    for bar in bars.values():
        bar.close()
    tmp = out / f".tmp-{PREDICTIONS}"
    pq.write_table(to_table(EvalPrediction, predictions), tmp, compression="zstd")
    tmp.replace(out / PREDICTIONS)

    metrics = summarize(predictions)
    for m in metrics.values():  # the process's peak (GPU allocations on CUDA): an upper bound per method
        m["peak_memory_mib"] = _peak_memory_mib(harness.engine.device)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    sweep = []
    questions = harness.mcq_questions()
    if cfg.latency_frames and questions:
        sweep = latency_sweep(harness, questions[0], cfg.latency_frames, cfg.latency_max_new_tokens)
        write_text_atomic(out / "latency.json", json.dumps(sweep, indent=2) + "\n")
    plots = {"accuracy": plot_accuracy_vs_tokens(metrics, out / "accuracy_vs_tokens.png").name}
    if cfg.budgets and (by_budget := plot_accuracy_vs_budget(metrics, out / "accuracy_vs_budget.png")):
        plots["budget"] = by_budget.name
    if sweep:
        plots["latency"] = plot_latency_sweep(sweep, out / "latency_vs_frames.png").name
    info = {"checkpoint": cfg.checkpoint, "data": cfg.data, "mcq_split": cfg.mcq_split, "vqa_split": cfg.vqa_split,
            "selector": harness.own_method, "budget": cfg.budget, "fresh_weights": sorted(harness.fresh_weights)}
    write_text_atomic(out / "report.md", render_report(metrics, sweep, plots, info))
    write_text_atomic(out / "eval-config.json", cfg.model_dump_json(indent=2) + "\n")
    files = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    return EvalSummary(
        out=str(out), methods=list(metrics),
        accuracy={k: m["accuracy"] for k, m in metrics.items() if "accuracy" in m},
        tokens_kept={k: m["video_tokens_kept"] for k, m in metrics.items() if "video_tokens_kept" in m},
        tokdense={k: m["tokdense"] for k, m in metrics.items() if "tokdense" in m},
        predictions_sha256=file_sha256(out / PREDICTIONS), files=files,
    )
