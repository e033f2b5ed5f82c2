"""What every benchmark case shares, under the runner (``run.py``) and under pytest alike: the
device, the dtype and sizes of the run, its results, and one measurement of a case.

A measurement (``Bench.measure``): warm-up runs (compiling, initializing libraries), the peak
memory of one run on top of its inputs (``fastclip.measure.peak_memory_bytes``), then the time of
runs back to back (``fastclip.measure.timings``: median, p20, p80; a probe run, then as many as
fill ``FILL_MS``, at most ``max_runs``), then TFLOP/s. An out-of-memory or other error is
recorded in the case's row, and the next case runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import platform
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from results import Results

from fastclip import costs
from fastclip.kernels.blocks import default_block_bytes
from fastclip.measure import peak_memory_bytes, timings

try:
    from fastclip.kernels.launch import interpreting
except ImportError:  # no Triton on this platform: the pytest cases' PyTorch paths still run

    def interpreting() -> bool:
        return False


MIB, GIB = 2**20, 2**30
FILL_MS = 400.0  # the timed runs of a case fill about this long
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
cpu_only = pytest.mark.skipif(CUDA, reason="the CPU comparison; the GPU cases cover a CUDA machine")


@dataclass(frozen=True)
class Case:
    """One case of a pytest grid: an op by a provider in a mode at a size."""

    op: str
    provider: str
    mode: str
    N: int
    D: int
    extra: tuple = ()  # further sizes, as (name, value) pairs: top-k's k, the projection's D_out

    def __str__(self) -> str:
        extra = "".join(f"-{name}{value}" for name, value in self.extra)
        return f"{self.op}-D{self.D}{extra}-N{self.N}-{self.mode}-{self.provider}"

    @property
    def more(self) -> dict[str, int]:
        return dict(self.extra)


def grid(op: str, providers, modes, batches, widths, extra: Sequence[tuple] = ((),)) -> list[Case]:
    """Every case of an op, shapes in increasing size, the providers and modes of one shape one
    after another."""
    return [
        Case(op, provider, mode, n, dim, more)
        for dim in widths
        for more in extra
        for n in batches
        for mode in modes
        for provider in providers
    ]


@dataclass
class Bench:
    """Where and how cases run, and the results they add to."""

    device: torch.device
    dtype: torch.dtype  # the features' dtype
    results: Results
    model: costs.Device  # the constants fastclip.costs predicts with
    scale: str = "full"  # the sizes the case files pick: "full", "tiny" or "interpreted"
    max_runs: int = 10  # timed runs of a case, at most
    block_bytes: int | None = None  # the losses' bounded buffer; None: the library's default
    width: int | None = None  # every feature width, where set (the interpreter's, narrow)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def buffer_bytes(self) -> int:
        return self.block_bytes or default_block_bytes(self.device)

    @property
    def autotune(self) -> bool:
        """Whether fastclip's kernels autotune (else each launches its first fitting config)."""
        return not interpreting() and os.environ.get("FASTCLIP_AUTOTUNE", "1") != "0"

    def pick(self, sizes: dict[str, Any]) -> Any:
        """The case file's sizes for this run's scale."""
        return sizes[self.scale]

    def D(self, D: int) -> int:
        """A feature width at this run's scale."""
        return self.width or D

    def add(self, section: str, row: dict) -> dict:
        return self.results.add(section, row)

    def timed(
        self,
        fn: Callable,
        warmup: bool = True,
        runs: int | None = None,
        between: Callable | None = None,
    ) -> dict:
        """``fn``'s times (``FILL_MS``, at most ``runs`` or ``max_runs`` runs) as row fields."""
        runs = runs or self.max_runs
        timing = timings(fn, self.device, runs, int(warmup and runs > 1), FILL_MS, between)
        return dataclasses.asdict(timing)

    def peak_mib(self, fn: Callable) -> float | None:
        """Peak memory of one run of ``fn`` on top of what is allocated (None under Triton's
        interpreter, whose CPU runs a profiler would only slow)."""
        if self.device.type != "cuda" and interpreting():
            return None
        return peak_memory_bytes(fn, self.device) / MIB

    @contextlib.contextmanager
    def case(self, row: dict) -> Iterator[None]:
        """Measure into ``row``: an out-of-memory or other error is recorded there."""
        try:
            yield
        except torch.OutOfMemoryError:
            row["oom"] = True
        except Exception as error:  # noqa: BLE001 - recorded, the next case may still run
            traceback.print_exc()
            row["error"] = f"{type(error).__name__}: {error}"[:500]
        self.results.save()

    def measure(
        self,
        row: dict,
        fn: Callable,
        flops: float | None = None,
        warmup: bool = True,
        runs: int | None = None,
        rivals: Sequence[Callable] = (),
    ) -> dict:
        """Fill ``row`` with ``fn``'s peak memory, time and TFLOP/s (``flops`` per run).
        ``rivals``, the other providers of the case, are warmed up too and run untimed before
        each timed run."""
        with self.case(row):
            for run in (*rivals, fn) if warmup else ():
                run()
            row["peak_mib"] = self.peak_mib(fn)

            def alternate() -> None:
                for run in rivals:
                    run()

            row.update(self.timed(fn, False, runs, alternate if rivals else None))
            if flops:
                row["tflops"] = flops / row["ms"] / 1e9
        settle(self.device)
        return row


def settle(device: torch.device) -> None:
    """Wait for the device and return cached memory, so the next case starts from the same state."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def features(n: int, dim: int, device: torch.device, seed: int) -> torch.Tensor:
    """(n, dim) fp32 rows of unit norm."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=gen, device=device), dim=-1)


def mode_step(
    forward: Callable[[], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    mode: str,
    grad: torch.Tensor | None = None,
) -> Callable[[], Any]:
    """What a mode times (``results`` names them): "eval" the forward without gradients,
    "forward" the forward recording the graph, "backward" the gradients of ``inputs`` (for the
    output's gradient ``grad``; None for a scalar) from the graph of the first call's forward
    (the warm-up's), "full" both."""
    if mode == "eval":
        return torch.no_grad()(forward)
    if mode == "forward":
        return forward
    if mode == "full":
        return lambda: torch.autograd.grad(forward(), inputs, grad)
    graph: list[torch.Tensor] = []

    def backward():
        graph[:] = graph or [forward()]
        return torch.autograd.grad(graph[0], inputs, grad, retain_graph=True)

    return backward


def capture(step: Callable[[], Any]) -> Callable[[], None]:
    """``step`` captured in a CUDA graph, as a training loop with static inputs may capture it:
    warm-up runs on a side stream first (lazy initialization, the allocator's pools, any
    autotuning), then one capture. Returns the graph's replay, which launches everything at
    once: no host work per kernel."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def record(benchmark, measure: Callable[[], dict]) -> None:
    """One case under pytest-benchmark: ``measure`` (what the runner calls too) times the case's
    runs itself, in one pytest-benchmark round, and returns the row that becomes the case's
    ``extra_info``: pytest-benchmark's own columns are the whole measurement's time."""
    row = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(row)
    if row.get("oom"):
        pytest.skip(f"{row['provider']} ran out of memory")
    if "error" in row:
        pytest.fail(row["error"])


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def facts(device: torch.device) -> dict:
    """The run's GPU (or CPU), library versions and date."""
    found = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "cuda": torch.version.cuda,
        "gpu": None,
        "cpu": platform.processor() or platform.machine(),
        "interpreter": interpreting(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        found.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=props.total_memory / GIB,
            l2_mib=getattr(props, "L2_cache_size", 0) / MIB or None,
        )
        from triton.runtime import driver  # a GPU run has Triton, wherever others lack it

        props = driver.active.utils.get_device_properties(device.index or 0)
        keys = ("sm_clock_rate", "mem_clock_rate", "mem_bus_width", "max_shared_mem")
        found.update({key: props.get(key) for key in keys})
    return found
