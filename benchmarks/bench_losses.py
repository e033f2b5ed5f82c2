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
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from common import DEVICE, PROVIDERS, cpu_only, measure, needs_cuda

from fastclip import clip_loss, siglip_loss
from fastclip.measure import synchronize
from fastclip.reference import clip_loss_reference, siglip_loss_reference

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
    """One case: ``loss`` by ``provider`` on (n, dim) features, forward or forward+backward."""
    loss_fn = _loss_fn(loss, provider)
    inputs = _inputs(loss, n, dim, dtype, DEVICE)

    def run() -> None:
        value = loss_fn(*inputs)
        if mode == "forward+backward":
            torch.autograd.grad(value, inputs)
        synchronize(DEVICE)

    info = {"op": loss, "provider": provider, "mode": mode, "N": n, "D": dim}
    info["dtype"] = str(dtype).removeprefix("torch.")
    flops = LOSSES[loss].passes[MODES.index(mode)] * 2 * n * n * dim
    measure(benchmark, oom_log, info, run, inputs, flops, rounds, warmup)


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


@cpu_only
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("provider", ["fastclip-torch", "eager"])
def test_cpu(benchmark, oom_log, loss, provider):
    _measure(benchmark, oom_log, loss, provider, "forward+backward", 4096, 512, torch.float32, 2)
