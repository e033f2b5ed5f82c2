"""Speed and memory of the fused normalized projection against eager PyTorch and torch.compile.

    pytest benchmarks/bench_projection.py --benchmark-only --benchmark-json=bench.json

y = normalize(x W^T + b) row-wise for x (N, D_in), W (D_out, D_in), b (D_out,), bf16: the end
of a CLIP tower. Providers: "fastclip" (``normalized_linear`` with ``backend="triton"``), "eager"
(``normalized_linear_reference``, F.normalize(F.linear(...)) in the input dtype) and "compile"
(``torch.compile`` of that reference with automatic dynamic shapes). Modes: "forward" (x, W and b
require grad, so the graph is recorded) and "forward+backward" (their gradients for a fixed
dL/dy). Targets at N = 32768, 768 -> 512: >= 1.3x eager, >= 1.0x torch.compile.

TFLOP/s count 2 N D_in D_out per matmul pass: 1 pass for a forward, 3 for forward+backward (y,
dx, dW), the same count for every provider. "D" is recorded as "D_in→D_out".

Without a CUDA device the GPU cases skip and one small CPU case compares the PyTorch path
("fastclip-torch") with eager.
"""

from __future__ import annotations

import functools

import pytest
import torch
from common import DEVICE, PROVIDERS, cpu_only, measure, needs_cuda

from fastclip.measure import synchronize
from fastclip.projection import normalized_linear
from fastclip.reference import normalized_linear_reference

MODES = ("forward", "forward+backward")
PASSES = {"forward": 1, "forward+backward": 3}
SHAPES = ((768, 512), (1024, 768))  # (D_in, D_out): ViT-B/16's and ViT-L/14's image projections
BATCHES = (8192, 32768, 131072)
# Timed runs per GPU case, after a warm-up run and a memory run: each takes milliseconds at most.
ROUNDS = 10

GRID = [
    (n_in, n_out, n, mode, provider)
    for n_in, n_out in SHAPES
    for n in BATCHES
    for mode in MODES
    for provider in PROVIDERS
]  # the providers and modes of one shape run one after another, shapes in increasing size


@functools.cache
def _compiled():
    return torch.compile(normalized_linear_reference)


def _fn(provider: str):
    if provider == "fastclip":
        return functools.partial(normalized_linear, backend="triton")
    if provider == "fastclip-torch":
        return functools.partial(normalized_linear, backend="torch")
    if provider == "eager":
        return normalized_linear_reference
    return _compiled()


def _runner(provider, mode, n, n_in, n_out, dtype):
    """(run, inputs): x (n, n_in) through W (n_out, n_in) and b by ``provider``, synchronized."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(n, n_in, generator=gen, device=DEVICE).to(dtype)
    weight = (torch.randn(n_out, n_in, generator=gen, device=DEVICE) / n_in**0.5).to(dtype)
    bias = (0.1 * torch.randn(n_out, generator=gen, device=DEVICE)).to(dtype)
    grad = torch.randn(n, n_out, generator=gen, device=DEVICE).to(dtype)  # dL/dy
    inputs = [t.requires_grad_() for t in (x, weight, bias)]
    fn = _fn(provider)

    def run() -> None:
        y = fn(*inputs)
        if mode == "forward+backward":
            torch.autograd.grad(y, inputs, grad)
        synchronize(DEVICE)

    return run, (*inputs, grad)


def _case(benchmark, oom_log, provider, mode, n, n_in, n_out, dtype, rounds, rivals=()):
    """One case by ``provider``, alternating with ``rivals`` (see ``common.measure``)."""
    run, inputs = _runner(provider, mode, n, n_in, n_out, dtype)
    others = [_runner(p, mode, n, n_in, n_out, dtype)[0] for p in rivals]
    info = {"op": "projection", "provider": provider, "mode": mode, "N": n}
    info.update({"D": f"{n_in}→{n_out}", "D_in": n_in, "D_out": n_out})
    info["dtype"] = str(dtype).removeprefix("torch.")
    flops = PASSES[mode] * 2 * n * n_in * n_out
    measure(benchmark, oom_log, info, run, inputs, flops, rounds, rivals=others)


@needs_cuda
@pytest.mark.parametrize(
    "n_in, n_out, n, mode, provider",
    GRID,
    ids=[f"projection-{c[0]}to{c[1]}-N{c[2]}-{c[3]}-{c[4]}" for c in GRID],
)
def test_projection_gpu(benchmark, oom_log, n_in, n_out, n, mode, provider):
    _case(benchmark, oom_log, provider, mode, n, n_in, n_out, torch.bfloat16, ROUNDS)


CPU_PROVIDERS = ("fastclip-torch", "eager")


@cpu_only
@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_projection_cpu(benchmark, oom_log, provider):
    rivals = [p for p in CPU_PROVIDERS if p != provider]
    _case(benchmark, oom_log, provider, "forward+backward", 4096, 768, 512, torch.float32, 3,
          rivals)  # fmt: skip
