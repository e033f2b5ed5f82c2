"""InfoNCE (``clip_loss``): its cases, for the runner and for pytest.

    pytest benchmarks/bench_contrastive.py --benchmark-only --benchmark-json=bench.json
    python benchmarks/render.py bench.json

Providers: fastclip's Triton implementations (``fastclip.registry``; each is a ``backend=``),
"eager" (``clip_loss_reference`` in the input dtype) and "compile" (``torch.compile`` of it with
automatic dynamic shapes: compiled for the first shape, then once more for all others). The GPU
grid: D = 512 and 768, N = 4,096 to 65,536, bf16, modes forward and full (a full step's gradients
checked, ``losses``); then N = 2^20 by the implementations at the floor (target: <= 8 s within
5 GB). Without a CUDA device the GPU cases skip and one CPU case compares the PyTorch path
("torch") with eager in fp32, each run alternating with the other's.

The runner's parts: "contrastive" (``losses.batch`` at each N of ``BATCHES``, D = 512),
"large" (N = 2^20 by the implementation ``auto`` picks, then by the others at the floor while
the part's time lasts) and, with SigLIP's, "confident".
"""

from __future__ import annotations

import pytest
import torch
from harness import Bench, Case, cpu_only, grid, needs_cuda, record, settle
from losses import (
    Loss,
    at_floor,
    batch,
    confident,
    grid_case,
    implementations,
    inputs,
    large,
    loss_function,
)

from fastclip import backends, clip_loss
from fastclip.reference import clip_loss_exact, clip_loss_reference

INFONCE = Loss(
    "contrastive", clip_loss, clip_loss_reference, clip_loss_exact, D=512, scale=1 / 0.07, bias=None
)
# The runner's sizes by scale. Tiny ones are multiples of 16 as the real ones are (Triton
# specializes integers on that): a tiny run on a GPU compiles the kernels the real one launches.
BATCHES = {"full": (4096, 16384, 65536), "tiny": (64, 96), "interpreted": (64,)}
LARGE = {"full": 2**20, "tiny": 256, "interpreted": 128}
CONFIDENT = {"full": 4096, "tiny": 64, "interpreted": 32}

PROVIDERS = ("eager", *implementations("contrastive"), "compile")  # eager first: the yardstick
GRID = grid("contrastive", PROVIDERS, ("forward", "full"), (4096, 16384, 32768, 65536), (512, 768))
CPU = grid("contrastive", ("torch", "eager"), ("full",), (4096,), (512,))
ROUNDS, CPU_ROUNDS = 3, 2  # timed runs per case, at most


def part_batches(bench: Bench) -> None:
    for n in bench.pick(BATCHES):
        batch(bench, INFONCE, n)


def part_large(bench: Bench) -> None:
    """auto's pick, then the designs no GPU has measured at this size, then the others."""
    n = bench.pick(LARGE)
    picked = backends.fastest("contrastive", bench.dtype, bench.D(INFONCE.D), n)
    for provider in dict.fromkeys((picked, *backends.MEASURED_ONLY, *at_floor("contrastive"))):
        large(bench, INFONCE, n, provider, auto=provider == picked)
        settle(bench.device)


def part_confident(bench: Bench) -> None:
    confident(bench, INFONCE, bench.pick(CONFIDENT))


@needs_cuda
@pytest.mark.parametrize("case", GRID, ids=str)
def test_gpu(benchmark, bench: Bench, case: Case):
    record(benchmark, lambda: grid_case(bench, INFONCE, case, ROUNDS))


@needs_cuda
@pytest.mark.parametrize("provider", at_floor("contrastive"))
def test_gpu_large_batch(benchmark, bench: Bench, provider: str):
    """InfoNCE at N = 2^20, D = 512, one forward+backward.

    The autotuner keys batch sizes past 64K to one bucket: a forward+backward at N = 65536 tunes
    it in seconds, and the large case then runs the tuned kernels without a search of its own.
    """
    warm = inputs(INFONCE, 65536, 512, bench.dtype, bench.device)
    torch.autograd.grad(loss_function(INFONCE, provider)(*warm), warm)
    del warm
    record(benchmark, lambda: large(bench, INFONCE, 2**20, provider))


@cpu_only
@pytest.mark.parametrize("case", CPU, ids=str)
def test_cpu(benchmark, bench: Bench, case: Case):
    rivals = [c.provider for c in CPU if c.provider != case.provider]
    record(benchmark, lambda: grid_case(bench, INFONCE, case, CPU_ROUNDS, rivals))
