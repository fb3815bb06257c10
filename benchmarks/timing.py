"""Timing and memory helpers shared by the benchmarks."""

from __future__ import annotations

import resource
import statistics
import time

import torch


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device, reset: bool = False) -> int:
    """Bytes: CUDA max_memory_allocated (reset -> current allocation); CPU peak RSS of this process."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
