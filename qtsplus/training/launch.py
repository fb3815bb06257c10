"""Start a training run with the deepspeed launcher (so multi-GPU and multi-node work unchanged), restart it after a
crash (each restart resumes from the newest checkpoint), and summarise what it produced."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from qtsplus.atomic import write_text_atomic
from qtsplus.fingerprint import code_fingerprint, file_sha256, fingerprint
from qtsplus.tiny import resolve_model
from qtsplus.training.config import TrainConfig
from qtsplus.training.loop import CHECKPOINTS, METRICS, newest_checkpoint


class TrainingFailed(RuntimeError):
    """The run kept failing after its restarts."""


class TrainResult(BaseModel):
    """What a finished run left behind (small: what the Prefect task caches)."""

    out: str
    final: str
    steps: int
    final_loss: float
    weights_sha256: str
    restarts: int


def depends_on(cfg: TrainConfig) -> dict[str, Any]:
    """What a training run's result depends on besides its dataset: the config (less where the launcher listens and
    how often it may restart), the base model and its resolved revision, the code it runs. The cache key of the
    train-selector task and the provenance in the run's report."""
    config = cfg.model_dump(mode="json")
    config["launcher"] = {k: v for k, v in config["launcher"].items() if k not in ("master_port", "max_restarts")}
    path, revision = resolve_model(cfg.base_model, cfg.base_revision)
    if revision is None and Path(path).is_dir():  # a local checkpoint (e.g. a host trained by variant base): its weights
        revision = fingerprint([(p.name, file_sha256(p)) for p in sorted(Path(path).glob("*.safetensors"))])
    return {"config": config, "base_model": cfg.base_model, "base_revision": revision,
            "code_version": code_fingerprint(run_training)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(cfg: TrainConfig, config_path: Path) -> list[str]:
    """`deepspeed [...] --module qtsplus.training.loop --config ...` (the launcher run as a module of this Python)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    ls = cfg.launcher
    if ls.num_gpus is not None:
        cmd += ["--num_gpus", str(ls.num_gpus)]
    elif not _cuda_available():
        cmd += ["--num_gpus", "1"]
    if ls.num_nodes != 1:
        cmd += ["--num_nodes", str(ls.num_nodes)]
    if ls.hostfile:
        cmd += ["--hostfile", ls.hostfile]
    cmd += ["--master_port", str(ls.master_port or free_port())]
    return cmd + ["--module", "qtsplus.training.loop", "--config", str(config_path)]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    if not _cuda_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator: real DeepSpeed without a GPU
    return env


def read_metrics(run: Path) -> list[dict]:
    path = run / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


RUN_KEY = "run-key.txt"


def start_over_if_other_run(run: Path, cfg: TrainConfig) -> None:
    """Checkpoints in `run` are resumed only by the run that wrote them: same config and base model (code edits
    aside, so a fix can resume a crashed run). Another run's checkpoints and metrics are removed, with a message,
    rather than resumed under a different schedule or data."""
    key = fingerprint({k: v for k, v in depends_on(cfg).items() if k != "code_version"})
    marker = run / RUN_KEY
    if newest_checkpoint(run) is not None and (not marker.is_file() or marker.read_text().strip() != key):
        print(f"{run} holds checkpoints of another training run (config or base model differ): starting over")
        shutil.rmtree(run / CHECKPOINTS)
        (run / METRICS).unlink(missing_ok=True)
    write_text_atomic(marker, key + "\n")


def run_training(cfg: TrainConfig, log: Path | None = None) -> TrainResult:
    """Run (or finish) the training described by `cfg` in `cfg.out`; restart after crashes; return its summary."""
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    start_over_if_other_run(run, cfg)
    config_path = write_text_atomic(run / "train-config.json", cfg.model_dump_json(indent=2) + "\n")
    log = log or run / "train.log"
    restarts = 0
    while True:
        before = newest_checkpoint(run)
        with open(log, "a") as handle:
            code = subprocess.run(launcher_command(cfg, config_path), env=launch_env(), stdout=handle,
                                  stderr=subprocess.STDOUT).returncode
        if code == 0:
            break
        progressed = newest_checkpoint(run) != before
        if not progressed or restarts >= cfg.launcher.max_restarts:  # no progress: a restart would fail the same way
            tail = log.read_text()[-4000:]
            raise TrainingFailed(f"training failed (exit {code}, {restarts} restarts, checkpoint "
                                 f"{'advanced' if progressed else 'did not advance'}); last output:\n{tail}")
        restarts += 1
        print(f"training exited with {code}; restart {restarts} resumes from step {newest_checkpoint(run)}")
    final = run / "final"
    steps = [m for m in read_metrics(run) if "step" in m]
    weights = sorted(final.glob("*.safetensors"))
    if not steps or not weights:
        raise TrainingFailed(f"{run}: the run ended without metrics or a final checkpoint")
    return TrainResult(out=str(run), final=str(final), steps=steps[-1]["step"], final_loss=steps[-1]["loss"],
                       weights_sha256=file_sha256(weights[0]), restarts=restarts)
