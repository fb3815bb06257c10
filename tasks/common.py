"""What every cached task shares: retry rules, content-keyed caching under the output folder, and reusing a cached
result only while the files it names are intact.

Cache keys are content fingerprints, never run ids: `cached(task, out, key)` stores the keys and results under
`<out>/.cache/prefect`, so deleting an output folder forgets its cache. `run_cached` runs such a task and, when the
result it returns (cached or not) fails its check (files gone or changed), runs it again with the cache refreshed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem

from qtsplus.fingerprint import fingerprint
from qtsplus.shards import ChunkResult

T = TypeVar("T")
TRANSIENT_ERRORS = (OSError, TimeoutError, ConnectionError, BrokenProcessPool)
KeyFunction = Callable[[TaskRunContext, dict[str, Any]], str]


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what a retry can fix: I/O hiccups and a worker process that died."""
    try:
        state.result()
    except TRANSIENT_ERRORS:
        return True
    except BaseException:  # noqa: BLE001 - any other failure is permanent: report it, don't retry
        return False
    return False


TASK_OPTIONS: dict[str, Any] = dict(persist_result=True, retries=2, retry_delay_seconds=[2, 10],
                                    retry_condition_fn=is_transient)


def result_storage(out: Path) -> LocalFileSystem:
    """A storage block for `<out>/.cache/prefect/results` (Prefect wants result storage saved server-side), saved once
    per process and API: every stage of a run shares it, and each save is several API calls."""
    return _saved_storage(str(out / ".cache" / "prefect" / "results"), os.environ.get("PREFECT_API_URL"))


@functools.cache
def _saved_storage(path: str, api: str | None) -> LocalFileSystem:
    block = LocalFileSystem(basepath=path)
    block.save(f"qtsplus-results-{fingerprint(path)[:16]}", overwrite=True)
    return block


def cached(task: Any, out: Path, key: KeyFunction) -> Any:
    """`task` with its content-keyed cache (keys and results) stored under `<out>/.cache/prefect`."""
    policy = CacheKeyFnPolicy(cache_key_fn=key).configure(key_storage=out / ".cache" / "prefect" / "keys")
    return task.with_options(cache_policy=policy, result_storage=result_storage(out))


def recompute_if_invalid(runnable: Any, kwargs: dict[str, Any], result: T, state: str,
                         intact: Callable[[T], bool]) -> tuple[T, str]:
    """The result of a finished (or cached) run of `runnable(**kwargs)`, unless `intact(result)` says its files are
    gone or changed: then the task runs again with its cache refreshed, and the state is "Recomputed"."""
    if intact(result):
        return result, state
    return runnable.with_options(refresh_cache=True).submit(**kwargs).result(), "Recomputed"


def run_cached(runnable: Any, kwargs: dict[str, Any], intact: Callable[[T], bool]) -> tuple[T, str]:
    """Run one cached task and return (result, final state name: Completed, Cached or Recomputed)."""
    state = runnable(**kwargs, return_state=True)
    return recompute_if_invalid(runnable, kwargs, state.result(), state.name, intact)


@dataclass
class StageRun:
    """The results of one stage's chunk tasks and how each one ended (Completed, Cached, Recomputed)."""

    stage: str
    results: list[ChunkResult] = field(default_factory=list)
    states: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the stage's chunk tasks
