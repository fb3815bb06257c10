"""Prefect tasks of train-selector: a cached wrapper around `qtsplus.training.launch.run_training`.

Cache key: the dataset's manifests (VSCQ2 and QTS-VQA, which name every shard's sha256) + the training config
(less the launcher's port and restart count) + the base model id and resolved revision + the code of the training
and selector modules + the run folder. A cached result whose final weights are gone or changed is recomputed.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.context import TaskRunContext

from qtsplus.fingerprint import code_version, file_sha256, fingerprint
from qtsplus.shards import manifest_digests, write_text_atomic
from qtsplus.tiny import resolve_model
from qtsplus.training.config import TrainConfig
from qtsplus.training.curves import plot_curves
from qtsplus.training.launch import TrainResult, read_metrics, run_training
from tasks.build_dataset import is_transient, result_storage
from tasks.gpu import gpu_slot

TRAINING_CODE = (
    "qtsplus.training.config", "qtsplus.training.data", "qtsplus.training.model", "qtsplus.training.loop",
    "qtsplus.training.launch", "qtsplus.selectors.qtsplus.config", "qtsplus.selectors.qtsplus.selector", "qtsplus.selectors.qtsplus.losses",
    "qtsplus.host.model", "qtsplus.host.splice", "qtsplus.layers", "qtsplus.engines.chat", "qtsplus.video", "qtsplus.prompts", "qtsplus.tiny",
    "qtsplus.selectors.base", "qtsplus.selectors.flexselect", "qtsplus.selectors.vqtoken",
)


@task(name="dataset-fingerprint", cache_policy=NO_CACHE)
def dataset_fingerprint(data: str) -> str:
    """sha256 over the manifests of the stages training reads (their files' sha256 included)."""
    return fingerprint(list(manifest_digests(Path(data)).values()))


def training_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    cfg: TrainConfig = p["cfg"]
    relevant = cfg.model_dump(mode="json")
    relevant["launcher"] = {k: v for k, v in relevant["launcher"].items() if k not in ("master_port", "max_restarts")}
    _, revision = resolve_model(cfg.base_model, cfg.base_revision)
    return fingerprint("train-selector", code_version(*TRAINING_CODE), relevant, p["dataset_fp"],
                       cfg.base_model, revision, str(Path(cfg.out).resolve()))


@task(name="train-selector-run", persist_result=True, retries=1, retry_delay_seconds=5, retry_condition_fn=is_transient)
def train_run(cfg: TrainConfig, dataset_fp: str) -> TrainResult:
    """Run the training (deepspeed launcher subprocess; resumes from the newest checkpoint), holding its GPU slots."""
    with gpu_slot(occupy=(cfg.launcher.num_gpus or 1) * cfg.launcher.num_nodes):
        return run_training(cfg)


def cached_train_run(out: Path) -> Any:
    policy = CacheKeyFnPolicy(cache_key_fn=training_key).configure(key_storage=out / ".cache" / "prefect" / "keys")
    return train_run.with_options(cache_policy=policy, result_storage=result_storage(out))


def final_intact(result: TrainResult) -> bool:
    weights = sorted(Path(result.final).glob("*.safetensors"))
    return bool(weights) and file_sha256(weights[0]) == result.weights_sha256


@task(name="publish-training", cache_policy=NO_CACHE)
def publish_training(result: TrainResult, cfg: TrainConfig, state: str) -> str:
    """curves.png and run-report.json next to the run, and artifacts: the curves, the last metrics."""
    run = Path(result.out)
    write_text_atomic(run / "run-report.json", json.dumps({"state": state} | result.model_dump(), indent=2) + "\n")
    metrics = read_metrics(run)
    png = plot_curves(metrics, run / "curves.png", f"{cfg.method} ({cfg.variant}) on {cfg.base_model}")
    steps = [m for m in metrics if "step" in m]
    every = max(1, len(steps) // 20)
    table = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in m.items()
              if k in ("step", "loss", "lm_loss", "budget_loss", "rho", "n", "kept_fraction", "lr")}
             for m in steps[::every] + steps[-1:]]
    create_table_artifact(key="train-selector-metrics", table=table, description=f"Training metrics of {run}")
    image = base64.b64encode(png.read_bytes()).decode()
    create_markdown_artifact(
        key="train-selector-curves",
        markdown=f"# Training curves\n\n![curves](data:image/png;base64,{image})\n\n"
                 f"{result.steps} steps, final loss {result.final_loss:.4f}, checkpoint `{result.final}`\n",
        description="Loss and budget curves",
    )
    return str(png)
