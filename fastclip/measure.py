"""Wall-clock time and peak memory of a function, on CUDA or on the CPU (shared by the demo and
the benchmarks)."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

# What torch's profiler writes to the process's stderr from C++ as it starts and stops, and when
# the measured function frees a block allocated before it started: no news about the function.
PROFILER_CHATTER = ("profiler_start", "profiler_stop", "Memory block of unknown size")


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


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak memory that ``fn()`` adds on top of what was allocated before it ran: the most
    tensor memory that was live at once, counting only what ``fn`` allocated.

    CUDA: the caching allocator's peak. CPU: torch's profiler records every allocation and free
    of the CPU allocator; the largest running sum of them, in time order.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with (
        _without_profiler_chatter(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    # The profiler's raw allocation stream: "[memory]" events of +bytes (allocated) and -bytes
    # (freed), in time order.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _without_profiler_chatter() -> Iterator[None]:
    """Hold what the process writes to its stderr (file descriptor 2, where C++ logs) meanwhile,
    then pass it on less the profiler's own lines (``PROFILER_CHATTER``): warnings and errors of
    the measured function still reach the user, after it ran."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to quieten
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            kept = [line for line in lines if not any(c in line for c in PROFILER_CHATTER)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
