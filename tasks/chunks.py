"""The loop every chunked stage shares: submit one cached task per chunk, show progress, recompute bad cache hits;
and the replica pool a model stage's chunk tasks run on (docs/scale_out.md)."""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel
from tqdm.auto import tqdm

from qtsplus.replica_pool import ReplicaPool, replica_pool
from qtsplus.replicas import ReplicaConfig, StageNeeds
from qtsplus.workers import run_on_replica
from tasks.common import recompute_if_invalid
from tasks.gpu import gpu_limit_size, gpu_slot

R = TypeVar("R", bound=BaseModel)


@contextmanager
def model_stage(stage: str, replicas: ReplicaConfig, needs: StageNeeds) -> Iterator[ReplicaPool]:
    """Open the stage's replica pool (in the flow: each replica holds `needs.tensor_parallel` slots of the `gpu`
    limit while it lives, and the pool is no larger than that limit can hold at once)."""
    limit = gpu_limit_size()
    with replica_pool(stage, replicas, needs, hold=lambda n: gpu_slot(occupy=n), max_slots=limit) as pool:
        log = get_run_logger()
        log.info(f"stage {stage}: {pool.size} {pool.backend} replica(s), started when a chunk needs one")
        asked = replicas.count_for(stage)
        if asked is not None and pool.size < asked:
            log.warning(f"stage {stage}: {asked} replicas asked, {pool.size} run: each holds {needs.tensor_parallel} "
                        f"slot(s) of the `gpu` limit, which has {limit}")
        yield pool


def on_replica(stage: str, fn: Callable[..., R], *args: Any) -> R:
    """`fn(*args)` (a chunk function) on a free replica of the stage; the result records which replica computed it
    (its `replica` field, outside every fingerprint: the shards are the same whichever replica wrote them)."""
    result, where = run_on_replica(stage, fn, *args)
    return result.model_copy(update={"replica": where})


def replica_of(result: Any) -> str:
    return (getattr(result, "replica", None) or {}).get("replica", "")


def run_verified(runnable: Any, calls: list[dict[str, Any]], verify: Callable[[Any], bool], label: str,
                 progress: bool = True, concurrency: int | None = None) -> tuple[list[Any], dict[int, str]]:
    """Results in call order, and each call's final state (Completed, Cached, or Recomputed when a result's files
    failed `verify` and the task ran again with its cache refreshed). Progress (chunks done, and per replica) goes
    to a bar, the run's log and a UI artifact.

    `concurrency`: threads for this stage's tasks (a model stage: twice its replicas, so each replica has its next
    chunk waiting while Prefect records the last); None: the flow's task runner."""
    if concurrency is None:
        return _run_verified(runnable.submit, runnable, calls, verify, label, progress)
    with ThreadPoolTaskRunner(max_workers=concurrency) as runner:
        return _run_verified(lambda **kw: runner.submit(runnable, kw), runnable, calls, verify, label, progress)


def _run_verified(submit: Callable[..., Any], runnable: Any, calls: list[dict[str, Any]],
                  verify: Callable[[Any], bool], label: str, progress: bool) -> tuple[list[Any], dict[int, str]]:
    futures = {submit(**kwargs): i for i, kwargs in enumerate(calls)}
    by_index: dict[int, Any] = {}
    states: dict[int, str] = {}
    per_replica: Counter[str] = Counter()
    log = get_run_logger()
    bar = tqdm(total=len(calls), desc=f"{label:>8}", unit="chunk", disable=not progress or not sys.stderr.isatty())
    key = "progress-" + re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")  # keyed: listed on the Artifacts page
    ui = create_progress_artifact(progress=0.0, key=key, description=f"{label}: chunks done (%)") if calls else None
    for future in as_completed(list(futures)):
        i = futures[future]
        by_index[i], states[i] = recompute_if_invalid(runnable, calls[i], future.result(), future.state.name, verify)
        replica = replica_of(by_index[i])
        if replica and states[i] != "Cached":
            per_replica[replica] += 1
            done = ", ".join(f"{r} {n}" for r, n in sorted(per_replica.items()))
            bar.set_postfix_str(done, refresh=False)
            log.info(f"{label}: chunk {getattr(by_index[i], 'chunk', i)} {states[i]} on {replica} "
                     f"({len(states)}/{len(calls)} done; per replica: {done})")
        bar.update(1)
        if ui is not None:
            done = "; ".join(f"{r}: {n}" for r, n in sorted(per_replica.items()))
            update_progress_artifact(ui, progress=100.0 * len(states) / len(calls),
                                     description=f"{label}: chunks done (%)" + (f"; computed by {done}" if done else ""))
    bar.close()
    return [by_index[i] for i in range(len(calls))], states
