"""Speed and memory of the fused InfoNCE loss against eager PyTorch and torch.compile.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/render.py bench.json

Providers: "fastclip" (``clip_loss(..., backend="triton")``), "eager" (``clip_loss_reference`` in
the input dtype) and "compile" (``torch.compile`` of that reference, once per shape). Modes:
"forward" (the forward half of a training step: the inputs require grad, so the autograd graph is
recorded) and "forward+backward" (the gradients of the features and of the logit scale). Each case
records its median time, the peak memory it adds on top of its inputs and a TFLOP/s figure in
``extra_info``; a provider that runs out of memory is recorded as such (see conftest.py).

Without a CUDA device the GPU cases skip and one small CPU case compares the chunked PyTorch path
("fastclip-torch") with eager.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from importlib import metadata

import pytest
import torch
import torch.nn.functional as F

from fastclip import clip_loss
from fastclip.measure import peak_memory_bytes, synchronize
from fastclip.reference import clip_loss_reference

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

PROVIDERS = ("fastclip", "eager", "compile")
MODES = ("forward", "forward+backward")
BATCHES = (4096, 16384, 32768, 65536)
WIDTHS = (512, 768)
# Timed runs per GPU case, after one warm-up run and one memory run. Budget (see gpu_check.sh):
# the 48 grid cases run for well under a minute in all; compilation and autotuning dominate.
ROUNDS = 5
# FLOPs are counted per algorithm, not per provider, in matmul passes of 2*N*N*D: a forward is 1
# (S = s X Y^T); forward+backward is 4, the floor for a loss that does not store S (forward,
# recompute S, G Y and G^T X). Eager stores S and does 3, the fused kernel does 5; crediting every
# provider with the same 4 makes TFLOP/s compare exactly as the times do.
PASSES = {"forward": 1, "forward+backward": 4}

# One compiled reference per (N, D, dtype), compiled on its first call.
_COMPILED: dict[tuple[int, int, torch.dtype], Callable] = {}


@functools.cache
def _environment() -> dict[str, str | None]:
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


def _loss_fn(provider: str, n: int, dim: int, dtype: torch.dtype) -> Callable:
    if provider == "fastclip":
        return functools.partial(clip_loss, backend="triton")
    if provider == "fastclip-torch":
        return functools.partial(clip_loss, backend="torch")
    if provider == "eager":
        return clip_loss_reference
    if (n, dim, dtype) not in _COMPILED:
        # Dynamo keeps 8 compiled versions of a function (over all torch.compile wrappers of it),
        # then silently runs it eagerly; the grid needs one per shape, with room to spare.
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 2 * len(BATCHES) * len(WIDTHS))
        _COMPILED[n, dim, dtype] = torch.compile(clip_loss_reference, dynamic=False)
    return _COMPILED[n, dim, dtype]


def _inputs(n: int, dim: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Unit-norm image and text features (n, dim) and CLIP's logit scale, all requiring grad."""
    gen = torch.Generator(device=device).manual_seed(0)
    features = [
        F.normalize(torch.randn(n, dim, generator=gen, device=device), dim=-1).to(dtype)
        for _ in range(2)
    ]
    scale = torch.tensor(1 / 0.07, device=device)
    return [t.requires_grad_() for t in (*features, scale)]


def _measure(
    benchmark,
    oom_log: list[dict],
    provider: str,
    mode: str,
    n: int,
    dim: int,
    dtype: torch.dtype,
    rounds: int,
    warmup: bool = True,
) -> None:
    """Time ``rounds`` runs of one case with pytest-benchmark and fill its ``extra_info``.

    The warm-up run compiles, autotunes and initializes libraries; the memory run follows it, so
    that none of their allocations count. Out of memory: recorded in ``oom_log``, case skipped.
    """
    device = torch.device("cuda" if CUDA else "cpu")
    info = {"provider": provider, "mode": mode, "N": n, "D": dim, "dtype": str(dtype)[6:]}
    info.update(_environment())
    if provider == "fastclip":
        info["autotune"] = os.environ.get("FASTCLIP_AUTOTUNE", "1") != "0"
    benchmark.extra_info.update(info)

    loss_fn = _loss_fn(provider, n, dim, dtype)
    inputs = _inputs(n, dim, dtype, device)

    def run() -> None:
        loss = loss_fn(*inputs)
        if mode == "forward+backward":
            torch.autograd.grad(loss, inputs)
        synchronize(device)

    try:
        if warmup:
            run()
        peak = peak_memory_bytes(run, device)
    except torch.OutOfMemoryError:
        peak = None
    if peak is None:
        oom_log.append({**info, "oom": True})
        pytest.skip(f"{provider} ran out of memory ({mode}, N={n}, D={dim})")

    benchmark.extra_info["peak_mib"] = peak / 2**20
    benchmark.extra_info["input_mib"] = sum(t.nbytes for t in inputs) / 2**20
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    flops = PASSES[mode] * 2 * n * n * dim
    benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12


@needs_cuda
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("dim", WIDTHS)
def test_gpu(benchmark, oom_log, provider, mode, n, dim):
    # The parameter nearest the function varies slowest: the providers and modes of one shape run
    # one after another, and the shapes in increasing size.
    _measure(benchmark, oom_log, provider, mode, n, dim, torch.bfloat16, ROUNDS)


@needs_cuda
def test_gpu_large_batch(benchmark, oom_log):
    """N = 2^20, D = 512, bf16, forward+backward, fused kernel only (target: <= 8 s, <= 5 GB).

    The autotuner keys batch sizes past 64K to one bucket: a forward+backward at N = 65536 tunes
    it in seconds, and the large case then runs the tuned kernels without a search of its own.
    """
    warm = _inputs(65536, 512, torch.bfloat16, torch.device("cuda"))
    torch.autograd.grad(clip_loss(*warm, backend="triton"), warm)
    del warm
    _measure(benchmark, oom_log, "fastclip", "forward+backward", 2**20, 512, torch.bfloat16, 1)


@pytest.mark.skipif(CUDA, reason="the CPU comparison; the GPU cases cover a CUDA machine")
@pytest.mark.parametrize("provider", ["fastclip-torch", "eager"])
def test_cpu(benchmark, oom_log, provider):
    _measure(benchmark, oom_log, provider, "forward+backward", 4096, 512, torch.float32, 2)
