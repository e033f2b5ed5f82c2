"""Time and peak memory of a function, on CUDA or on the CPU: the one timer of the demo and the
benchmarks.

Times are read on the device's timeline (CUDA events; the host's clock on a CPU) around runs
issued back to back, and summarized the same way everywhere: the median with p20 and p80.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

# What torch's profiler writes to the process's stderr from C++ as it starts and stops, and when
# the measured function frees a block allocated before it started: no news about the function.
PROFILER_CHATTER = ("profiler_start", "profiler_stop", "Memory block of unknown size")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Milliseconds of a function's runs: the median, p20 and p80, and how many runs."""

    ms: float
    p20: float
    p80: float
    runs: int


def summarize(times: list[float]) -> Timing:
    """The median, p20 and p80 of ``times`` (milliseconds)."""
    if len(times) == 1:
        return Timing(times[0], times[0], times[0], 1)
    p20, _, _, p80 = statistics.quantiles(times, n=5, method="inclusive")
    return Timing(statistics.median(times), p20, p80, len(times))


class Clock:
    """Points on the device's timeline: CUDA events, or the host's clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.points: list = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append(event)
        else:
            self.points.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Milliseconds between consecutive marks (waits for the device)."""
        pairs = zip(self.points, self.points[1:], strict=False)
        if self.device.type == "cuda":
            synchronize(self.device)
            return [a.elapsed_time(b) for a, b in pairs]
        return [(b - a) * 1e3 for a, b in pairs]


def timings(
    fn: Callable[[], Any],
    device: torch.device,
    max_runs: int = 10,
    warmup: int = 1,
    fill_ms: float | None = None,
    between: Callable[[], Any] | None = None,
) -> Timing:
    """``fn()`` timed after ``warmup`` untimed runs: a probe run, then the others back to back,
    ``max_runs`` in all, or with ``fill_ms`` as many as fill that long (at least 2, unless
    ``max_runs`` is 1). ``between``, when given, runs untimed before each timed run (another
    provider of the same case, so that none is timed in the state another left behind)."""
    for _ in range(warmup):
        fn()
    clock, runs, done = Clock(device), max_runs, 0
    while done < runs:
        if between is not None:
            between()
        clock.mark()
        fn()
        clock.mark()
        done += 1
        if done == 1 and fill_ms is not None and max_runs > 1:
            more = int(fill_ms / max(clock.intervals()[0], 1e-3))
            runs = 1 + max(1, min(max_runs - 1, more))
    return summarize(clock.intervals()[::2])


def time_ms(
    fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 1
) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs (``timings``)."""
    return timings(fn, device, max_runs=repeats, warmup=warmup).ms


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
