"""GPU discipline: model work holds slots of the Prefect global concurrency limit `gpu` while it runs.

Create the limit once per server with as many slots as the machine (or pool) has GPUs:
`prefect gcl create gpu --limit 8` (`qtsplus serve` does it for you). Two GPU stages then never share a GPU: a stage
waits for a free slot, and logs how many slots it holds and for how long. Without the limit there is nothing to
honour (a CLI run's local API, or a server nobody set up for GPUs): the slots are skipped quietly (a DEBUG line), not
with Prefect's warning once per stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_run_logger

GPU_LIMIT = "gpu"


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The run logger inside a flow or task run (its lines reach the UI), else this module's logger."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() or TaskRunContext.get():
        return get_run_logger()
    return logging.getLogger(__name__)


def gpu_limit_size() -> int | None:
    """Slots of the server's `gpu` limit, or None when the API has no such limit."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(GPU_LIMIT).limit
        except ObjectNotFound:
            return None


@contextmanager
def gpu_slot(occupy: int = 1) -> Iterator[None]:
    """Hold `occupy` slots of the `gpu` limit for the duration of the block (waits when none are free)."""
    log = _logger()
    size = gpu_limit_size()
    if size is None:
        log.debug(f"no `{GPU_LIMIT}` concurrency limit on this API: GPU slots are not enforced "
                  f"(create one with `prefect gcl create {GPU_LIMIT} --limit <number of GPUs>`)")
        yield
        return
    if occupy > size:
        raise ValueError(f"this stage needs {occupy} `{GPU_LIMIT}` slots but the limit has {size}: it would wait "
                         f"forever (raise it with `prefect gcl update {GPU_LIMIT} --limit {occupy}`)")
    waited = time.monotonic()
    with concurrency(GPU_LIMIT, occupy=occupy, strict=True):
        held = time.monotonic()
        log.info(f"holding {occupy} of {size} `{GPU_LIMIT}` slot(s) (waited {held - waited:.1f} s)")
        try:
            yield
        finally:
            log.info(f"released {occupy} `{GPU_LIMIT}` slot(s) after {time.monotonic() - held:.1f} s")
