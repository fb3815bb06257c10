"""Timing and memory helpers shared by the benchmarks."""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

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
    """Bytes: CUDA max_memory_allocated (reset -> current allocation); CPU peak RSS of this process (reset -> current
    RSS, on Linux, so that peak_memory() - peak_memory(reset=True) is the growth above what the process held then,
    not above an older high-water mark such as one left by building the model)."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if not status.exists():  # not Linux: ru_maxrss, which cannot be reset
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if reset:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB
