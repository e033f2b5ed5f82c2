"""The normalized projection: its cases, for the runner and for pytest.

    pytest benchmarks/bench_projection.py --benchmark-only --benchmark-json=bench.json

y = normalize(x W^T + b) row-wise for x (N, D_in), W (D_out, D_in), b (D_out,), bf16: the end
of a CLIP tower. Providers: "triton" (``normalized_linear``; "torch" its PyTorch path), "eager"
(``normalized_linear_reference``, F.normalize(F.linear(...)) in the input dtype) and "compile"
(``torch.compile`` of that reference with automatic dynamic shapes). Modes: forward (x, W and b
require grad), backward (their gradients for a fixed dL/dy) and full. Targets at N = 32,768,
768 -> 512, full: >= 1.3x eager, >= 1.0x torch.compile. TFLOP/s count 2 N D_in D_out per matmul
pass (``PASSES``), the same count for every provider; "D" is recorded as "D_in→D_out".

Without a CUDA device the GPU cases skip and one CPU case compares the PyTorch path with eager.
The runner's parts: "projection" (fastclip and eager at ``ROWS``, 768 -> 512, forward and full)
and "compile" (torch.compile's, its compilation time too; not run at tiny sizes).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import pytest
import torch
from harness import Bench, Case, cpu_only, grid, mode_step, needs_cuda, record

from fastclip import backends
from fastclip.projection import normalized_linear
from fastclip.reference import normalized_linear_reference

PASSES = {"forward": 1, "backward": 2, "full": 3}  # y; dx and dW
PROJECTION = (768, 512)  # (D_in, D_out): ViT-B/16's image projection
ROWS = {"full": 32768, "tiny": 64, "interpreted": 64}  # N of the runner's cases

TRITON = backends.implementations("projection", triton=True)
SHAPES = (PROJECTION, (1024, 768))  # and ViT-L/14's
GRID = [
    case
    for n_in, n_out in SHAPES
    for case in grid(
        "projection",
        (*TRITON, "eager", "compile"),
        tuple(PASSES),
        (8192, 32768, 131072),
        (n_in,),
        extra=[(("D_out", n_out),)],
    )
]
CPU = grid("projection", ("torch", "eager"), ("full",), (4096,), (768,), extra=[(("D_out", 512),)])
ROUNDS, CPU_ROUNDS = 10, 3  # timed runs per case, at most


@functools.cache
def compiled() -> Callable:
    return torch.compile(normalized_linear_reference)


def function(provider: str) -> Callable:
    if provider == "eager":
        return normalized_linear_reference
    if provider == "compile":
        return compiled()
    return functools.partial(normalized_linear, backend=provider)


def inputs(bench: Bench, n: int, n_in: int, n_out: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([x, W, b], requiring grad; dL/dy)."""
    gen = torch.Generator(device=bench.device).manual_seed(0)
    device, dtype = bench.device, bench.dtype
    x = torch.randn(n, n_in, generator=gen, device=device).to(dtype)
    weight = (torch.randn(n_out, n_in, generator=gen, device=device) / n_in**0.5).to(dtype)
    bias = (0.1 * torch.randn(n_out, generator=gen, device=device)).to(dtype)
    grad = torch.randn(n, n_out, generator=gen, device=device).to(dtype)
    return [t.requires_grad_() for t in (x, weight, bias)], grad


def step(bench: Bench, case: Case, provider: str) -> Callable:
    args, grad = inputs(bench, case.N, case.D, case.more["D_out"])
    forward = functools.partial(function(provider), *args)
    return mode_step(forward, args, case.mode, grad)


def measure(bench: Bench, case: Case, runs: int | None = None, rivals=(), **fields) -> dict:
    """One case, a row of "projection"; ``rivals`` (providers) run between its timed runs."""
    n_in, n_out = case.D, case.more["D_out"]
    row = {
        "op": "projection",
        "provider": case.provider,
        "mode": case.mode,
        "N": case.N,
        "D": f"{n_in}→{n_out}",
        "D_in": n_in,
        "D_out": n_out,
        "dtype": bench.dtype_name,
    }
    row = bench.add("projection", {**row, **fields})
    if case.provider in TRITON:
        row["autotune"] = bench.autotune
    flops = PASSES[case.mode] * 2 * case.N * n_in * n_out
    others = [step(bench, case, provider) for provider in rivals]
    return bench.measure(row, step(bench, case, case.provider), flops, runs=runs, rivals=others)


def runner_cases(bench: Bench, provider: str) -> list[Case]:
    n_in, n_out = PROJECTION if bench.width is None else (bench.width * 3 // 2, bench.width)
    n = bench.pick(ROWS)
    return [
        Case("projection", provider, mode, n, n_in, (("D_out", n_out),))
        for mode in ("forward", "full")
    ]


def part_projection(bench: Bench) -> None:
    for provider in (*TRITON, "eager"):
        for case in runner_cases(bench, provider):
            measure(bench, case)


def part_compile(bench: Bench) -> None:
    if bench.scale != "full":
        bench.results.data["parts"]["compile"]["note"] = "not run with --tiny"
        return
    import torch._inductor.config as inductor

    inductor.compile_threads = 1  # in this process: a part stopped at its limit leaves no workers
    cases = runner_cases(bench, "compile")
    start = time.perf_counter()  # the first call compiles forward and backward
    step(bench, cases[-1], "compile")()
    compile_s = time.perf_counter() - start
    for case in cases:
        measure(bench, case, compile_s=compile_s)


@needs_cuda
@pytest.mark.parametrize("case", GRID, ids=str)
def test_gpu(benchmark, bench: Bench, case: Case):
    record(benchmark, lambda: measure(bench, case, ROUNDS))


@cpu_only
@pytest.mark.parametrize("case", CPU, ids=str)
def test_cpu(benchmark, bench: Bench, case: Case):
    rivals = [c.provider for c in CPU if c.provider != case.provider]
    record(benchmark, lambda: measure(bench, case, CPU_ROUNDS, rivals))
