"""SigLIP (``siglip_loss``): its cases, for the runner and for pytest.

    pytest benchmarks/bench_siglip.py --benchmark-only --benchmark-json=bench.json

Providers as InfoNCE's (``bench_contrastive.py``): fastclip's Triton implementations, "eager"
(``siglip_loss_reference``) and "compile". fastclip's SigLIP computes its gradients in its
forward when the inputs require grad, so its "forward" mode holds most of the work. The GPU grid:
D = 512 and 768, N = 16,384 to 131,072, bf16; on a CPU, the PyTorch path against eager.

The runner's parts: "siglip" (``losses.batch`` at each N of ``BATCHES``, D = 768) and, with
InfoNCE's, "confident".
"""

from __future__ import annotations

import pytest
from harness import Bench, Case, cpu_only, grid, needs_cuda, record
from losses import Loss, batch, confident, grid_case, implementations

from fastclip import siglip_loss
from fastclip.reference import siglip_loss_reference

# Its float64 reference is the eager one on float64 inputs.
SIGLIP = Loss(
    "siglip",
    siglip_loss,
    siglip_loss_reference,
    siglip_loss_reference,
    D=768,
    scale=10.0,
    bias=-10.0,
)
BATCHES = {"full": (4096, 16384, 65536), "tiny": (64, 96), "interpreted": (64,)}
CONFIDENT = {"full": 4096, "tiny": 64, "interpreted": 32}

PROVIDERS = ("eager", *implementations("siglip"), "compile")
GRID = grid("siglip", PROVIDERS, ("forward", "full"), (16384, 32768, 65536, 131072), (512, 768))
CPU = grid("siglip", ("torch", "eager"), ("full",), (4096,), (512,))
ROUNDS, CPU_ROUNDS = 3, 2  # timed runs per case, at most


def part_batches(bench: Bench) -> None:
    for n in bench.pick(BATCHES):
        batch(bench, SIGLIP, n)


def part_confident(bench: Bench) -> None:
    confident(bench, SIGLIP, bench.pick(CONFIDENT))


@needs_cuda
@pytest.mark.parametrize("case", GRID, ids=str)
def test_gpu(benchmark, bench: Bench, case: Case):
    record(benchmark, lambda: grid_case(bench, SIGLIP, case, ROUNDS))


@cpu_only
@pytest.mark.parametrize("case", CPU, ids=str)
def test_cpu(benchmark, bench: Bench, case: Case):
    rivals = [c.provider for c in CPU if c.provider != case.provider]
    record(benchmark, lambda: grid_case(bench, SIGLIP, case, CPU_ROUNDS, rivals))
