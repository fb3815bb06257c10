"""The loop every chunked stage shares: submit one cached task per chunk, show progress, recompute bad cache hits."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from tqdm.auto import tqdm

from tasks.common import recompute_if_invalid


def run_verified(runnable: Any, calls: list[dict[str, Any]], verify: Callable[[Any], bool], label: str,
                 progress: bool = True) -> tuple[list[Any], dict[int, str]]:
    """Results in call order, and each call's final state (Completed, Cached, or Recomputed when a result's files
    failed `verify` and the task ran again with its cache refreshed). Progress goes to a bar and a UI artifact."""
    futures = {runnable.submit(**kwargs): i for i, kwargs in enumerate(calls)}
    by_index: dict[int, Any] = {}
    states: dict[int, str] = {}
    bar = tqdm(total=len(calls), desc=f"{label:>8}", unit="chunk", disable=not progress or not sys.stderr.isatty())
    ui = create_progress_artifact(progress=0.0, description=f"{label}: chunks done (%)") if calls else None
    for future in as_completed(list(futures)):
        i = futures[future]
        by_index[i], states[i] = recompute_if_invalid(runnable, calls[i], future.result(), future.state.name, verify)
        bar.update(1)
        if ui is not None:
            update_progress_artifact(ui, progress=100.0 * len(states) / len(calls))
    bar.close()
    return [by_index[i] for i in range(len(calls))], states
