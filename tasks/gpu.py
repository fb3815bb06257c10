"""GPU discipline: model work holds slots of the Prefect global concurrency limit `gpu` while it runs.

Create the limit once per server with as many slots as the machine (or pool) has GPUs:
`prefect gcl create gpu --limit 8` (infra/serve.py does it for you). Two GPU stages then never share a GPU: a stage
waits for a free slot. Without the limit (a local run with no server), slots are not enforced.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.concurrency.sync import concurrency

GPU_LIMIT = "gpu"


@contextmanager
def gpu_slot(occupy: int = 1) -> Iterator[None]:
    """Hold `occupy` slots of the `gpu` limit for the duration of the block (waits when none are free)."""
    with concurrency(GPU_LIMIT, occupy=occupy, strict=False):
        yield
