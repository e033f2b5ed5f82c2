"""Wall-clock time and peak memory of a function, on CUDA or on the CPU (shared by the demo and
the benchmarks)."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 1
) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs, synchronizing around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak memory that ``fn()`` adds on top of what was allocated before it ran.

    CUDA: the caching allocator's peak. CPU: the process's resident set, sampled every 0.2 ms
    from a background thread (Linux only; None elsewhere).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not os.path.exists("/proc/self/statm"):
        return None
    base = peak = _rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak, _rss_bytes()) - base
