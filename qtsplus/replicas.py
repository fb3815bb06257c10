"""How many model replicas a stage runs, and on which GPUs: the configuration and the plan (docs/scale_out.md).

`ReplicaConfig` is the one place replica settings live (BuildConfig.replicas, FeatureConfig.replicas). It is kept out
of every stage's `depends_on` (cache keys, provenance): replicas change how fast a stage runs, never what it writes,
so a build with 8 replicas reuses the cache of a build with 1 and writes the same bytes. The pools themselves are in
`qtsplus.replica_pool` (local processes) and `qtsplus.ray_replicas` (Ray actors); this module has no process code, so
configs that embed it do not pull that code into any stage's code fingerprint.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, PositiveInt

log = logging.getLogger(__name__)


class ReplicaConfig(BaseModel):
    """How many replicas each model stage runs, and where. Not part of any cache key or provenance."""

    count: PositiveInt | None = Field(
        None, description="replicas per model stage; None: the visible GPUs (a Ray cluster's GPUs) divided by the "
                          "stage's tensor-parallel size, 1 without GPUs")
    per_stage: dict[str, PositiveInt] = Field(
        default_factory=dict, description="replicas of named stages (vscq1, vscq2, vqa, features), over `count`")
    ray_address: str | None = Field(
        None, description="None: local processes. Else the Ray cluster whose actors host the replicas: 'auto' (this "
                          "machine is a node), 'ray://head:10001' (Ray Client), 'head:6379'")
    ray_runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="the actors' Ray runtime_env (pip, env_vars, container, py_executable, "
                                          "...); this process's QTSPLUS_* variables are added to env_vars")
    ray_num_cpus: float = Field(1.0, ge=0, description="CPUs each actor reserves")
    ray_num_gpus: float | None = Field(
        None, ge=0, description="GPUs each actor reserves; None: the stage's tensor-parallel size when the cluster "
                                "has GPUs and the stage uses them, else 0")
    ray_start_timeout_s: float = Field(900.0, gt=0, description="how long a replica may wait for Ray to place it")

    def count_for(self, stage: str) -> int | None:
        return self.per_stage.get(stage, self.count)


@dataclass(frozen=True)
class StageNeeds:
    """What one replica of a stage needs: its interpreter, how many GPUs, and whether it uses GPUs at all."""

    python: str | None = None  # the worker's interpreter (the engine environment's); None: this one
    tensor_parallel: int = 1  # GPUs one replica spans
    gpu: bool = True  # uses the GPUs when there are some (False: CPU-only, or no model)


def visible_gpus() -> list[str]:
    """This process's GPUs, as CUDA_VISIBLE_DEVICES names them (all of torch's when it is unset)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        found = []
        for d in (d.strip() for d in listed.split(",")):
            if not d or d.startswith("-"):
                break  # CUDA ignores everything from the first invalid entry on
            found.append(d)
        return found
    if "torch" not in sys.modules and not Path("/proc/driver/nvidia").exists():
        return []  # no NVIDIA driver: no GPU to count, and no 2 s torch import for a stage that may be all cached
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


def plan_devices(stage: str, cfg: ReplicaConfig, needs: StageNeeds, gpus: Sequence[str],
                 max_slots: int | None = None) -> list[list[str] | None]:
    """Each local replica's GPUs (None: not pinned, e.g. on a CPU machine): the configured count, or as many
    replicas as `gpus` hold groups of `tensor_parallel`; capped so the replicas' slots fit in `max_slots`."""
    tp = needs.tensor_parallel
    gpus = list(gpus) if needs.gpu else []
    asked = cfg.count_for(stage)
    count = asked if asked is not None else max(1, len(gpus) // tp)
    count = cap_to_slots(stage, count, tp, max_slots)
    if not gpus:
        return [None] * count
    if count * tp > len(gpus):
        if asked is None:  # fewer GPUs than one replica wants: one unpinned replica, as without a pool
            return [None]
        raise ValueError(f"stage {stage}: {count} replicas x {tp} GPUs need {count * tp} GPUs, but "
                         f"{len(gpus)} are visible ({','.join(gpus)}); lower replicas.count")
    return [gpus[i * tp:(i + 1) * tp] for i in range(count)]


def cap_to_slots(stage: str, count: int, occupy: int, max_slots: int | None) -> int:
    """At most as many replicas as `max_slots` (the `gpu` limit's size) can hold at once: a replica that waits for a
    slot its siblings hold until the stage ends would wait forever."""
    if max_slots is None or count * occupy <= max_slots:
        return count
    capped = max(1, max_slots // occupy)
    log.warning("stage %s: %d replicas x %d slots exceed the `gpu` limit of %d: running %d", stage, count, occupy,
                max_slots, capped)
    return capped
