"""What every benchmark shares: the device, the environment stamp, and one timed case."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from importlib import metadata

import pytest
import torch

from fastclip.measure import peak_memory_bytes

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
cpu_only = pytest.mark.skipif(CUDA, reason="the CPU comparison; the GPU cases cover a CUDA machine")
PROVIDERS = ("fastclip", "eager", "compile")


@functools.cache
def environment() -> dict[str, str | None]:
    """GPU name and library versions, stamped on every result."""
    try:
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton_version = None
    return {
        "gpu": torch.cuda.get_device_name() if CUDA else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
    }


def measure(
    benchmark,
    oom_log: list[dict],
    info: dict,
    run: Callable[[], None],
    inputs: Sequence[torch.Tensor],
    flops: float,
    rounds: int,
    warmup: bool = True,
    rivals: Sequence[Callable[[], None]] = (),
) -> None:
    """Time ``rounds`` runs of ``run`` (which synchronizes the device) and fill ``extra_info``.

    ``info`` names the case: op, provider, mode, N, D, dtype (the render script's columns). The
    warm-up run compiles, autotunes and initializes libraries; a memory run follows, so that none
    of their allocations count. Out of memory: recorded in ``oom_log``, the case skipped.
    ``rivals``, the other providers' runs of the same case, are warmed up too and run (untimed)
    before each timed round: the providers alternate, so that none is timed in a state another
    left behind (a CPU's caches, its thread pool, the allocator), whichever test runs first.
    """
    info = {**info, **environment()}
    if info["provider"].startswith("fastclip") and info["provider"] != "fastclip-torch":
        info["autotune"] = os.environ.get("FASTCLIP_AUTOTUNE", "1") != "0"
    benchmark.extra_info.update(info)
    try:
        if warmup:
            for fn in (*rivals, run):
                fn()
        peak = peak_memory_bytes(run, DEVICE)
    except torch.OutOfMemoryError:
        oom_log.append({**info, "oom": True})
        pytest.skip(f"{info['provider']} ran out of memory ({info})")
    benchmark.extra_info["peak_mib"] = None if peak is None else peak / 2**20
    benchmark.extra_info["input_mib"] = sum(t.nbytes for t in inputs) / 2**20

    def alternate() -> None:  # pytest-benchmark reads a value returned here as arguments
        for fn in rivals:
            fn()

    setup = alternate if rivals else None
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12
