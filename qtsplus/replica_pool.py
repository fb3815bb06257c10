"""Replica pools: a model stage's chunks spread over N replicas of its model, each loaded once (docs/scale_out.md).

A pool has `size` replicas: local worker processes (`qtsplus.workers.WorkerProcess`, each pinned to its own GPUs with
CUDA_VISIBLE_DEVICES) or, with a Ray address, Ray actors placed across a cluster (`qtsplus.ray_replicas`). A call
takes whichever replica is free (waiting while none is), starts it on first use (so a stage whose chunks are all
cached starts nothing and loads nothing), and gives it back afterwards. A replica that dies (out of memory, a CUDA
fault, kill -9) makes its call raise BrokenProcessPool, which the caller retries (Prefect does: a transient error);
the dead replica is replaced by a fresh one the next time it is taken. While a replica lives it can hold slots of a
concurrency limit (`hold`: the flows pass `tasks.gpu.gpu_slot`, `occupy` = the stage's tensor-parallel size).
"""

from __future__ import annotations

import contextvars
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol, TypeVar

from qtsplus.replicas import ReplicaConfig, StageNeeds, plan_devices, visible_gpus
from qtsplus.workers import WorkerProcess, describe_process, stage_scope

T = TypeVar("T")
log = logging.getLogger(__name__)

Hold = Callable[[int], AbstractContextManager[Any]]  # occupy -> a context that holds that many slots


def engine_needs(engine: Any) -> StageNeeds:
    """The needs of a stage that runs `engine` (an EngineConfig): an explicit device (cpu, cuda:N) or the null
    backend is left alone (no GPU planning); auto/cuda replicas get tensor_parallel_size GPUs each (vLLM)."""
    from qtsplus.engines import engine_python

    tp = engine.tensor_parallel_size if engine.backend == "vllm" else 1
    return StageNeeds(engine_python(engine), tp, engine.backend != "null" and engine.device in ("auto", "cuda"))


class Replica(Protocol):
    """One replica of a stage's model: started lazily by its pool, runs one call at a time."""

    id: str

    @property
    def alive(self) -> bool: ...

    def start(self) -> dict[str, str]:
        """Start it; where it runs (host, pid, devices). Raises BrokenProcessPool if it died while starting."""

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one call; BrokenProcessPool when the replica died."""

    def stop(self) -> None: ...


class LocalReplica:
    """A replica in a local worker process, pinned to `devices` (CUDA_VISIBLE_DEVICES) when given; `threads`: its
    CPU threads (OMP_NUM_THREADS, which PyTorch follows), when several replicas share the CPU."""

    def __init__(self, rid: str, python: str | None = None, devices: Sequence[str] | None = None,
                 threads: int | None = None):
        self.id = rid
        self.devices = None if devices is None else list(devices)
        env = {} if devices is None else {"CUDA_VISIBLE_DEVICES": ",".join(devices)}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        self._process = WorkerProcess(rid, python, env)

    @property
    def alive(self) -> bool:
        return self._process.alive

    def start(self) -> dict[str, str]:
        return self._process.run(describe_process)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._process.run(fn, *args, **kwargs)

    def stop(self) -> None:
        self._process.close()


class _SlotHolder:
    """Holds `hold(occupy)` for as long as a replica lives, in a thread of its own: a context manager is entered and
    left in one thread (Prefect's concurrency slots also renew their lease from it), while replicas start in task
    threads and stop in the flow's. The thread runs in the context the pool was opened in (the flow run's)."""

    def __init__(self, hold: Hold, occupy: int, context: contextvars.Context, label: str):
        self._hold, self._occupy, self._label = hold, occupy, label
        self._ready, self._stop = threading.Event(), threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=context.copy().run, args=(self._main,), name=f"slots-{label}",
                                        daemon=True)

    def _main(self) -> None:
        try:
            with self._hold(self._occupy):
                self._ready.set()
                self._stop.wait()
        except BaseException as e:  # noqa: BLE001 - handed to the replica's starter, or logged if it came later
            if self._ready.is_set():
                log.error("replica %s: its slots were lost while it ran: %r", self._label, e)
            else:
                self._error = e
        finally:
            self._ready.set()

    def acquire(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def release(self) -> None:
        self._stop.set()
        self._thread.join()


class ReplicaPool:
    """A stage's replicas; `call` runs a function on whichever is free (see the module docstring)."""

    def __init__(self, name: str, replicas: Sequence[Replica], backend: str = "local", hold: Hold | None = None,
                 occupy: int = 1):
        if not replicas:
            raise ValueError(f"stage {name}: a pool needs at least one replica")
        self.name = name
        self.backend = backend
        self.occupy = occupy
        self._replicas = list(replicas)
        self._hold = hold
        self._context = contextvars.copy_context()
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(self._replicas)):
            self._free.put(i)
        self._lock = threading.Lock()
        self._slots: dict[int, _SlotHolder] = {}
        self._where: list[dict[str, str]] = [{} for _ in self._replicas]
        self._pids: list[list[str]] = [[] for _ in self._replicas]
        self._chunks = [0] * len(self._replicas)
        self.started = 0  # replica starts, replacements included
        self.replaced = 0  # replicas that died and were dropped (a fresh one starts when next needed)
        self._closed = False

    @property
    def size(self) -> int:
        return len(self._replicas)

    @property
    def spawned(self) -> int:
        return self.started

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, dict[str, str]]:
        """`fn(*args, **kwargs)` on a free replica: (its result, where it ran: replica id, host, pid, devices)."""
        i = self._free.get()
        try:
            if self._closed:
                raise RuntimeError(f"the replica pool of stage {self.name} is closed")
            replica = self._replicas[i]
            if not replica.alive:
                self._start(i)
            try:
                value = replica.run(fn, *args, **kwargs)
            except BrokenProcessPool:
                self._retire(i)
                raise
            with self._lock:
                self._chunks[i] += 1
            return value, dict(self._where[i])
        finally:
            self._free.put(i)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on a free replica."""
        return self.call(fn, *args, **kwargs)[0]

    def _start(self, i: int) -> None:
        replica = self._replicas[i]
        holder = None
        if self._hold is not None:
            holder = _SlotHolder(self._hold, self.occupy, self._context, replica.id)
            holder.acquire()
        try:
            where = replica.start()
        except BaseException:
            if holder is not None:
                holder.release()
            raise
        with self._lock:
            if holder is not None:
                self._slots[i] = holder
            self._where[i] = {"replica": replica.id} | where
            self._pids[i].append(where.get("pid", ""))
            self.started += 1
        log.info("stage %s: replica %s started (%s)", self.name, replica.id,
                 ", ".join(f"{k} {v}" for k, v in where.items() if v))

    def _retire(self, i: int) -> None:
        """Drop a replica that died: stop what is left of it and give its slots back."""
        replica = self._replicas[i]
        log.warning("stage %s: replica %s died; a fresh one replaces it when next needed", self.name, replica.id)
        replica.stop()
        with self._lock:
            holder = self._slots.pop(i, None)
            self.replaced += 1
        if holder is not None:
            holder.release()

    def close(self) -> None:
        """Stop every replica (in parallel: a model's teardown takes a while) and give their slots back."""
        self._closed = True
        running = [r for r in self._replicas if r.alive]
        if running:
            with ThreadPoolExecutor(len(running)) as ex:
                list(ex.map(lambda r: r.stop(), running))
        with self._lock:
            holders, self._slots = list(self._slots.values()), {}
        for holder in holders:
            holder.release()

    def stats(self) -> dict[str, Any]:
        """What the pool did: backend, size, starts, replacements, and per replica its chunks, pids and place."""
        with self._lock:
            return {
                "backend": self.backend, "size": self.size, "occupy": self.occupy, "started": self.started,
                "replaced": self.replaced,
                "replicas": [
                    {"replica": r.id, "chunks": self._chunks[i], "pids": [p for p in self._pids[i] if p]}
                    | {k: v for k, v in self._where[i].items() if k not in ("replica", "pid")}
                    for i, r in enumerate(self._replicas)
                ],
            }


def cpu_share(replicas: int) -> int | None:
    """CPU threads per replica when `replicas` CPU replicas share this machine (each PyTorch process would otherwise
    start a thread per core, and they would fight over the cores); None: one replica, or OMP_NUM_THREADS is set."""
    if replicas < 2 or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // replicas)


@contextmanager
def replica_pool(stage: str, cfg: ReplicaConfig, needs: StageNeeds | None = None, hold: Hold | None = None,
                 max_slots: int | None = None) -> Iterator[ReplicaPool]:
    """The stage's pool while the block runs (tasks reach it through `qtsplus.workers.run_on_replica(stage, ...)`):
    Ray actors when `cfg.ray_address` is set, else local processes; closed, and every replica stopped, on exit."""
    needs = needs or StageNeeds()
    if cfg.ray_address:
        from qtsplus.ray_replicas import ray_replicas

        replicas: list[Replica] = list(ray_replicas(stage, cfg, needs, max_slots))
        backend = "ray"
    else:
        devices = plan_devices(stage, cfg, needs, visible_gpus() if needs.gpu else [], max_slots)
        threads = cpu_share(len(devices)) if devices[0] is None else None
        replicas = [LocalReplica(f"{stage}-{i}", needs.python, d, threads) for i, d in enumerate(devices)]
        backend = "local"
    pool = ReplicaPool(stage, replicas, backend, hold, occupy=needs.tensor_parallel)
    with stage_scope(stage, pool):
        yield pool
