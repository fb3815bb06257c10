"""Prefect tasks of train-selector: a cached wrapper around `qtsplus.training.launch.run_training`.

Cache key: the dataset's manifests (VSCQ2 and QTS-VQA, which name every shard's sha256) + what the run depends on
(`qtsplus.training.launch.depends_on`: the config less the launcher's port and restart count, the base model and its
resolved revision, the fingerprint of the code it reaches) + the run folder. A cached result whose final weights are gone or changed is recomputed.
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
from qtsplus.fingerprint import file_sha256, fingerprint
from qtsplus.shards import manifest_digests
from qtsplus.training.config import TrainConfig
from qtsplus.training.curves import plot_curves
from qtsplus.training.launch import TrainResult, depends_on, read_metrics, run_training
from tasks.common import cached, is_transient
from tasks.gpu import gpu_slot


@task(name="dataset-fingerprint", cache_policy=NO_CACHE)
def dataset_fingerprint(data: str) -> str:
    """sha256 over the manifests of the stages training reads (their files' sha256 included)."""
    return fingerprint(list(manifest_digests(Path(data)).values()))


def training_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    cfg: TrainConfig = p["cfg"]
    return fingerprint("train-selector", depends_on(cfg), p["dataset_fp"], str(Path(cfg.out).resolve()))


@task(name="train-selector-run", persist_result=True, retries=1, retry_delay_seconds=5, retry_condition_fn=is_transient)
def train_run(cfg: TrainConfig, dataset_fp: str) -> TrainResult:
    """Run the training (deepspeed launcher subprocess; resumes from the newest checkpoint), holding its GPU slots."""
    with gpu_slot(occupy=(cfg.launcher.num_gpus or 1) * cfg.launcher.num_nodes):
        return run_training(cfg)


def cached_train_run(out: Path) -> Any:
    return cached(train_run, out, training_key)


def final_intact(result: TrainResult) -> bool:
    weights = sorted(Path(result.final).glob("*.safetensors"))
    return bool(weights) and file_sha256(weights[0]) == result.weights_sha256


@task(name="publish-training", cache_policy=NO_CACHE)
def publish_training(result: TrainResult, cfg: TrainConfig, state: str) -> str:
    """curves.png and run-report.json next to the run, and artifacts: the curves, the last metrics."""
    run = Path(result.out)
    report = {"state": state} | result.model_dump() | {"depends_on": depends_on(cfg)}
    write_text_atomic(run / "run-report.json", json.dumps(report, indent=2) + "\n")
    metrics = read_metrics(run)
    png = plot_curves(metrics, run / "curves.png", f"{cfg.method} ({cfg.variant}) on {cfg.base_model}")
    steps = [m for m in metrics if "step" in m]
    every = max(1, len(steps) // 20)
    table = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in m.items()
              if k in ("step", "loss", "lm_loss", "budget_loss", "rho", "n", "kept_fraction", "lr")}
             for m in steps[::every] + (steps[-1:] if (len(steps) - 1) % every else [])]
    create_table_artifact(key="train-selector-metrics", table=table, description=f"Training metrics of {run}")
    image = base64.b64encode(png.read_bytes()).decode()
    create_markdown_artifact(
        key="train-selector-curves",
        markdown=f"# Training curves\n\n![curves](data:image/png;base64,{image})\n\n"
                 f"{result.steps} steps, final loss {result.final_loss:.4f}, checkpoint `{result.final}`\n",
        description="Loss and budget curves",
    )
    return str(png)
