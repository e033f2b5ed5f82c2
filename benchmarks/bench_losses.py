"""Speed and memory of the fused losses against eager PyTorch and torch.compile.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/render.py bench.json

Losses: "clip" (InfoNCE, ``clip_loss``) and "siglip" (``siglip_loss``). Providers: "fastclip" (the
loss with ``backend="triton"``), "eager" (its reference in ``fastclip.reference``, in the input
dtype) and "compile" (``torch.compile`` of that reference with torch's default automatic dynamic
shapes: compiled for the first shape, then once more for all others). Modes:
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
from dataclasses import dataclass
from importlib import metadata

import pytest
import torch
import torch.nn.functional as F

from fastclip import clip_loss, siglip_loss
from fastclip.measure import peak_memory_bytes, synchronize
from fastclip.reference import clip_loss_reference, siglip_loss_reference

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

PROVIDERS = ("fastclip", "eager", "compile")
MODES = ("forward", "forward+backward")
WIDTHS = (512, 768)


@dataclass(frozen=True)
class Loss:
    fused: Callable  # the public fastclip function (takes backend=...)
    reference: Callable  # its eager reference: the "eager" provider, compiled for "compile"
    batches: tuple[int, ...]  # N of the GPU grid
    scale: float  # the logit scale (exponentiated) and bias the models start from
    bias: float | None
    # FLOPs are counted per algorithm, not per provider, in matmul passes of 2*N*N*D: a forward
    # is 1 (S = s X Y^T). Forward+backward: 4 for InfoNCE, the floor for a loss that does not
    # store S (forward; recompute S, G Y, G^T X; the kernel does 5, eager 3 storing S) and 3 for
    # SigLIP (S, G Y, G^T X; the kernel does 4). Every provider is credited the same count, so
    # TFLOP/s compare exactly as the times do.
    passes: tuple[int, int]


LOSSES = {
    "clip": Loss(clip_loss, clip_loss_reference, (4096, 16384, 32768, 65536), 1 / 0.07, None,
                 (1, 4)),
    "siglip": Loss(siglip_loss, siglip_loss_reference, (16384, 32768, 65536, 131072), 10.0, -10.0,
                   (1, 3)),
}  # fmt: skip
# Timed runs per GPU case, after one warm-up run and one memory run. Budget (see gpu_check.sh):
# the grid cases run for about a minute in all; compilation and autotuning dominate.
ROUNDS = 3

# The compiled references, compiled on their first call (then once more, with dynamic shapes).
_COMPILED: dict[str, Callable] = {}


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


def _loss_fn(loss: str, provider: str) -> Callable:
    spec = LOSSES[loss]
    if provider == "fastclip":
        return functools.partial(spec.fused, backend="triton")
    if provider == "fastclip-torch":
        return functools.partial(spec.fused, backend="torch")
    if provider == "eager":
        return spec.reference
    if loss not in _COMPILED:
        _COMPILED[loss] = torch.compile(spec.reference)
    return _COMPILED[loss]


def _inputs(loss: str, n: int, dim: int, dtype: torch.dtype, device: torch.device) -> list:
    """Unit-norm image and text features (n, dim), the logit scale and bias (None for CLIP);
    every tensor requires grad."""
    spec = LOSSES[loss]
    gen = torch.Generator(device=device).manual_seed(0)
    features = [
        F.normalize(torch.randn(n, dim, generator=gen, device=device), dim=-1).to(dtype)
        for _ in range(2)
    ]
    params = [torch.tensor(spec.scale, device=device)]
    if spec.bias is not None:
        params.append(torch.tensor(spec.bias, device=device))
    return [t.requires_grad_() for t in (*features, *params)]


def _measure(
    benchmark,
    oom_log: list[dict],
    loss: str,
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
    info = {"loss": loss, "provider": provider, "mode": mode, "N": n, "D": dim}
    info["dtype"] = str(dtype).removeprefix("torch.")
    info.update(_environment())
    if provider == "fastclip":
        info["autotune"] = os.environ.get("FASTCLIP_AUTOTUNE", "1") != "0"
    benchmark.extra_info.update(info)

    loss_fn = _loss_fn(loss, provider)
    inputs = _inputs(loss, n, dim, dtype, device)

    def run() -> None:
        value = loss_fn(*inputs)
        if mode == "forward+backward":
            torch.autograd.grad(value, inputs)
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
    flops = LOSSES[loss].passes[MODES.index(mode)] * 2 * n * n * dim
    benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12


GRID = [
    (loss, dim, n, mode, provider)
    for loss, spec in LOSSES.items()
    for dim in WIDTHS
    for n in spec.batches
    for mode in MODES
    for provider in PROVIDERS
]  # the providers and modes of one shape run one after another, shapes in increasing size


@needs_cuda
@pytest.mark.parametrize(
    "loss, dim, n, mode, provider",
    GRID,
    ids=[f"{c[0]}-D{c[1]}-N{c[2]}-{c[3]}-{c[4]}" for c in GRID],
)
def test_gpu(benchmark, oom_log, loss, dim, n, mode, provider):
    _measure(benchmark, oom_log, loss, provider, mode, n, dim, torch.bfloat16, ROUNDS)


@needs_cuda
def test_gpu_large_batch(benchmark, oom_log):
    """InfoNCE at N = 2^20, D = 512, bf16, forward+backward, fused only (target: <= 8 s, <= 5 GB).

    The autotuner keys batch sizes past 64K to one bucket: a forward+backward at N = 65536 tunes
    it in seconds, and the large case then runs the tuned kernels without a search of its own.
    """
    warm = _inputs("clip", 65536, 512, torch.bfloat16, torch.device("cuda"))
    torch.autograd.grad(clip_loss(*warm, backend="triton"), warm)
    del warm
    # Compiled and tuned by the warm-up above: no warm-up run of its own (each run takes seconds).
    _measure(benchmark, oom_log, "clip", "fastclip", "forward+backward", 2**20, 512,
             torch.bfloat16, 1, warmup=False)  # fmt: skip


@pytest.mark.skipif(CUDA, reason="the CPU comparison; the GPU cases cover a CUDA machine")
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("provider", ["fastclip-torch", "eager"])
def test_cpu(benchmark, oom_log, loss, provider):
    _measure(benchmark, oom_log, loss, provider, "forward+backward", 4096, 512, torch.float32, 2)
