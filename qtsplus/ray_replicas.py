"""Replicas as Ray actors: a stage's model replicas placed by Ray across a cluster (docs/scale_out.md).

Prefect stays the orchestrator (tasks, caching, retries, the UI); Ray only hosts the replicas. Each replica is one
actor reserving `num_gpus` (the stage's tensor-parallel size on a GPU cluster; Ray sets its CUDA_VISIBLE_DEVICES) and
`num_cpus`; it loads the model on its first chunk and keeps it. Actors are started lazily by the pool (a cached stage
starts none) and killed when the stage ends; a dead actor (its node lost, out of memory, kill -9) raises
BrokenProcessPool, so the chunk is retried on another replica and a fresh actor replaces it.

Every node must have qtsplus and the engine's dependencies installed (one image), or get them through the actors'
`runtime_env` (`ReplicaConfig.ray_runtime_env`: pip packages, a container, env_vars). Shards are written by the actors
to the output folder, which must be the same shared path on every node. This process's QTSPLUS_* variables (the load
log, progress settings, the engine interpreter) are passed to the actors. With `EngineConfig.python` set, an actor
runs the stage's calls in a worker process under that interpreter (which must exist on every node).

Ray is an optional extra (`pip install -e ".[ray]"`), imported only here and only when a Ray address is configured.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from qtsplus.engines import MissingExtraError
from qtsplus.replicas import ReplicaConfig, StageNeeds, cap_to_slots
from qtsplus.workers import WorkerProcess, describe_process

T = TypeVar("T")
log = logging.getLogger(__name__)
NAMESPACE = "qtsplus"
_CONNECT = threading.Lock()
_ACTOR_CLASS: Any = None


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise MissingExtraError('replicas.ray_address needs Ray: pip install -e ".[ray]"') from e
    return ray


def connect(address: str) -> Any:
    """This process as a driver of the cluster at `address` (once per process); returns the `ray` module."""
    ray = import_ray()
    with _CONNECT:
        if not ray.is_initialized():
            log.info("connecting to the Ray cluster at %s", address)
            ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
    return ray


def cluster_gpus(ray: Any) -> int:
    return int(ray.cluster_resources().get("GPU", 0))


class ReplicaHost:
    """The body of a replica actor: runs a stage's calls in the actor's process, or (``python``) in a worker process
    under that interpreter on the actor's node, which sees the actor's GPUs."""

    def __init__(self, rid: str, python: str | None):
        self._worker = WorkerProcess(rid, python) if python else None

    def describe(self) -> dict[str, str]:
        import ray

        return describe_process() | {"node_ip": ray.util.get_node_ip_address()}

    def run(self, fn: Callable[..., T], args: tuple, kwargs: dict[str, Any]) -> T:
        if self._worker is not None:
            return self._worker.run(fn, *args, **kwargs)
        return fn(*args, **kwargs)


def _actor_class(ray: Any) -> Any:
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        _ACTOR_CLASS = ray.remote(ReplicaHost)
    return _ACTOR_CLASS


def forwarded_env() -> dict[str, str]:
    """The variables every actor gets from this process: QTSPLUS_* (load log, progress, engine interpreter)."""
    return {k: v for k, v in os.environ.items() if k.startswith("QTSPLUS_")}


class RayReplica:
    """One replica as a Ray actor, created on `start` and killed on `stop`."""

    def __init__(self, rid: str, cfg: ReplicaConfig, needs: StageNeeds):
        self.id = rid
        self._cfg = cfg
        self._needs = needs
        self._actor: Any = None

    @property
    def alive(self) -> bool:
        return self._actor is not None

    def _resources(self, ray: Any) -> tuple[float, float]:
        gpus = self._cfg.ray_num_gpus
        if gpus is None:
            gpus = float(self._needs.tensor_parallel) if self._needs.gpu and cluster_gpus(ray) else 0.0
        return self._cfg.ray_num_cpus, gpus

    def start(self) -> dict[str, str]:
        assert self._cfg.ray_address is not None
        ray = connect(self._cfg.ray_address)
        from ray.exceptions import GetTimeoutError, RayActorError

        runtime_env = dict(self._cfg.ray_runtime_env)
        runtime_env["env_vars"] = forwarded_env() | dict(runtime_env.get("env_vars") or {})
        num_cpus, num_gpus = self._resources(ray)
        self._actor = _actor_class(ray).options(
            num_cpus=num_cpus, num_gpus=num_gpus, runtime_env=runtime_env, max_restarts=0, max_concurrency=1,
        ).remote(self.id, self._needs.python)
        try:
            where = ray.get(self._actor.describe.remote(), timeout=self._cfg.ray_start_timeout_s)
        except GetTimeoutError as e:
            self.stop()
            raise RuntimeError(
                f"replica {self.id}: Ray did not place an actor with {num_gpus:g} GPUs and {num_cpus:g} CPUs within "
                f"{self._cfg.ray_start_timeout_s:g} s (cluster: {ray.cluster_resources()}, free: "
                f"{ray.available_resources()}); lower replicas.count or ray_num_gpus/ray_num_cpus") from e
        except RayActorError as e:
            self.stop()
            raise BrokenProcessPool(f"replica {self.id}: the Ray actor died while starting: {e}") from e
        return where

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        ray = import_ray()
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(self._actor.run.remote(fn, args, kwargs))
        except RayActorError as e:
            raise BrokenProcessPool(f"replica {self.id}: the Ray actor died: {e}") from e
        except RayTaskError as e:
            cause = e.cause
            if isinstance(cause, BaseException):
                raise cause from e  # the function's own exception (a retryable one stays retryable)
            raise

    def stop(self) -> None:
        actor, self._actor = self._actor, None
        if actor is not None:
            import_ray().kill(actor, no_restart=True)


def ray_replicas(stage: str, cfg: ReplicaConfig, needs: StageNeeds, max_slots: int | None = None) -> list[RayReplica]:
    """The stage's replicas as (not yet started) actors: the configured count, or as many as the cluster has groups
    of `tensor_parallel` GPUs (which needs a connection now), 1 on a cluster without GPUs."""
    count = cfg.count_for(stage)
    if count is None:
        gpus = cluster_gpus(connect(cfg.ray_address or "auto")) if needs.gpu else 0
        count = max(1, gpus // needs.tensor_parallel)
    count = cap_to_slots(stage, count, needs.tensor_parallel, max_slots)
    return [RayReplica(f"{stage}-{i}", cfg, needs) for i in range(count)]
