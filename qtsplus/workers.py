"""A process per model stage: the model is loaded once, in its own process, and only if some chunk needs it.

The flow opens `stage_worker(name)` around a stage. Tasks of that stage call `run_in_stage_worker(name, fn, ...)`:
the first call spawns one worker process (which then loads the model lazily, through `qtsplus.engines.get_engine`,
and keeps it for every later chunk); a stage whose tasks are all cached never spawns it, so never loads a model.
Leaving the context shuts the process down, which is the only reliable way to give GPU memory back.

The worker dies with its parent (PR_SET_PDEATHSIG on Linux), so a killed run leaves no orphan writing shards.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


class StageWorker:
    """One lazily spawned worker process that runs a stage's chunk functions one at a time."""

    def __init__(self, name: str):
        self.name = name
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self.spawned = 0

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent
                )
                self.spawned += 1
            executor = self._executor
        try:
            return executor.submit(fn, *args, **kwargs).result()
        except BrokenProcessPool:
            # the process died (OOM, a CUDA fault): drop it so a retry starts a fresh one
            with self._lock:
                if self._executor is executor:
                    self._executor = None
            executor.shutdown(wait=False, cancel_futures=True)
            raise

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)


_ACTIVE: dict[str, StageWorker] = {}


@contextmanager
def stage_worker(name: str) -> Iterator[StageWorker]:
    """Scope of a stage's worker process."""
    if name in _ACTIVE:
        raise RuntimeError(f"stage worker {name!r} is already open")
    worker = _ACTIVE[name] = StageWorker(name)
    try:
        yield worker
    finally:
        del _ACTIVE[name]
        worker.close()


def run_in_stage_worker(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` in the stage's worker process; without an open stage scope, run it in a temporary one."""
    worker = _ACTIVE.get(name)
    if worker is not None:
        return worker.run(fn, *args, **kwargs)
    with stage_worker(name) as temporary:
        return temporary.run(fn, *args, **kwargs)
