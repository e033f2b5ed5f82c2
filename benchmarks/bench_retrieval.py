"""Speed and memory of the similarity matrix and of top-k retrieval.

    pytest benchmarks/bench_retrieval.py --benchmark-only --benchmark-json=bench.json

Similarity: ``fastclip.similarity`` against cuBLAS (``torch.matmul(a, b.T)``, the plain product;
target >= 0.9x at 16384^2) and eager ``scale * a @ b.T + bias``. Top-k: ``topk_similarity``
against eager ``torch.topk(q @ k.T, k)``, which stores the n_q x n_k scores (target >= 3x at
n = 65536, k = 10, with O(n k) memory). bf16, 1 matmul pass of 2 n_q n_k D FLOPs each. On a CPU,
the PyTorch path's top-k against eager at n = 4096 and 16384 (fp32): its peak memory is the
(n, k) result and one block of ``fastclip.similarity.TOPK_CHUNK_ELEMENTS`` scores at any n.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from common import DEVICE, cpu_only, measure, needs_cuda

from fastclip import similarity, topk_similarity
from fastclip.measure import synchronize
from fastclip.reference import similarity_reference

ROUNDS = 3
SIMILARITY = [(n, dim) for dim in (512, 768) for n in (4096, 16384, 32768)]
TOPK = [(n, k) for k in (1, 10, 100) for n in (16384, 65536, 262144)]


def _features(n: int, dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=gen, device=DEVICE), dim=-1).to(dtype)


def _similarity_case(benchmark, oom_log, provider: str, n: int, dim: int, dtype: torch.dtype):
    a, b = _features(n, dim, dtype, 0), _features(n, dim, dtype, 1)
    fns = {
        "fastclip": lambda: similarity(a, b, 14.3, 0.5, backend="triton"),
        "fastclip-torch": lambda: similarity(a, b, 14.3, 0.5, backend="torch"),
        "cublas": lambda: torch.matmul(a, b.T),
        "eager": lambda: similarity_reference(a, b, 14.3, 0.5),
    }

    def run() -> None:
        fns[provider]()
        synchronize(DEVICE)

    info = {"op": "similarity", "provider": provider, "mode": "forward", "N": n, "D": dim}
    info["dtype"] = str(dtype).removeprefix("torch.")
    measure(benchmark, oom_log, info, run, (a, b), 2 * n * n * dim, ROUNDS)


def _topk_case(benchmark, oom_log, provider: str, n: int, k: int, dim: int, dtype: torch.dtype,
               rivals: tuple[str, ...] = ()):  # fmt: skip
    """Top-k of n queries among n keys by ``provider``, alternating with ``rivals``."""
    q, keys = _features(n, dim, dtype, 0), _features(n, dim, dtype, 1)
    fns = {
        "fastclip": lambda: topk_similarity(q, keys, k, backend="triton"),
        "fastclip-torch": lambda: topk_similarity(q, keys, k, backend="torch"),
        "eager": lambda: torch.topk(q @ keys.T, k, dim=1),
    }

    def runner(name: str):
        def run() -> None:
            fns[name]()
            synchronize(DEVICE)

        return run

    info = {"op": "topk", "provider": provider, "mode": f"k={k}", "N": n, "D": dim}
    info["dtype"] = str(dtype).removeprefix("torch.")
    others = [runner(p) for p in rivals]
    measure(benchmark, oom_log, info, runner(provider), (q, keys), 2 * n * n * dim, ROUNDS,
            rivals=others)  # fmt: skip


@needs_cuda
@pytest.mark.parametrize("provider", ["fastclip", "cublas", "eager"])
@pytest.mark.parametrize("n, dim", SIMILARITY, ids=[f"N{n}-D{d}" for n, d in SIMILARITY])
def test_gpu_similarity(benchmark, oom_log, n, dim, provider):
    _similarity_case(benchmark, oom_log, provider, n, dim, torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("provider", ["fastclip", "eager"])
@pytest.mark.parametrize("n, k", TOPK, ids=[f"N{n}-k{k}" for n, k in TOPK])
def test_gpu_topk(benchmark, oom_log, n, k, provider):
    _topk_case(benchmark, oom_log, provider, n, k, 512, torch.bfloat16)


CPU_PROVIDERS = ("fastclip-torch", "eager")
CPU_TOPK_N = (4096, 16384)  # the PyTorch path's memory: one bounded block, where eager's grows


@cpu_only
@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("n", CPU_TOPK_N, ids=[f"N{n}" for n in CPU_TOPK_N])
def test_cpu_topk(benchmark, oom_log, n, provider):
    rivals = tuple(p for p in CPU_PROVIDERS if p != provider)
    _topk_case(benchmark, oom_log, provider, n, 10, 256, torch.float32, rivals)
