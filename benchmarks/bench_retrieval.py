"""The similarity matrix and top-k retrieval: their cases, for the runner and for pytest.

    pytest benchmarks/bench_retrieval.py --benchmark-only --benchmark-json=bench.json

Similarity: ``fastclip.similarity`` ("triton"; "torch" its PyTorch path) against cuBLAS
("cublas": ``torch.matmul(a, b.T)``, the plain product; target >= 0.9x at 16,384^2) and eager
(``scale * a @ b.T + bias``). Top-k: ``topk_similarity`` against eager ``torch.topk(q @ k.T, k)``,
which stores the n_q x n_k scores (target >= 3x at n = 65,536, k = 10, with O(n k) memory).
bf16, 1 matmul pass of 2 n_q n_k D FLOPs each, no gradients (mode "eval"). On a CPU, the PyTorch
path's top-k against eager at n = 4,096 and 16,384 (fp32): its peak memory is the (n, k) result
and one block of ``fastclip.similarity.TOPK_CHUNK_ELEMENTS`` scores at any n.

The runner's part: "retrieval", the similarity at ``SIMILARITY`` and the top-k at ``TOPK``,
D = 512, k = 10.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from harness import Bench, Case, cpu_only, features, grid, needs_cuda, record, settle

from fastclip import backends, similarity, topk_similarity
from fastclip.reference import similarity_reference

SIMILARITY = {"full": 16384, "tiny": 64, "interpreted": 64}  # n of the runner's n x n case
TOPK = {"full": 65536, "tiny": 16, "interpreted": 16}  # queries and keys of its top-k case
RETRIEVAL_D, K = 512, 10
SCALE, BIAS = 14.3, 0.5  # the similarity's logit scale and bias
SEEDS = {"similarity": (0, 1), "topk": (2, 3)}

TRITON = backends.implementations("similarity", triton=True)
GRID = grid("similarity", (*TRITON, "cublas", "eager"), ("eval",), (4096, 16384, 32768), (512, 768))
GRID += grid(
    "topk",
    (*TRITON, "eager"),
    ("eval",),
    (16384, 65536, 262144),
    (512,),
    extra=[(("k", k),) for k in (1, 10, 100)],
)
CPU = grid("topk", ("torch", "eager"), ("eval",), (4096, 16384), (256,), extra=[(("k", K),)])
ROUNDS = 3  # timed runs per case, at most


def function(op: str, provider: str, a, b, k: int | None) -> Callable:
    """``provider``'s similarity of a and b, or top-k of queries a among keys b."""
    if op == "topk" and provider == "eager":
        return lambda: torch.topk(a @ b.T, k, dim=1)
    if op == "topk":
        return lambda: topk_similarity(a, b, k, backend=provider)
    if provider == "cublas":
        return lambda: torch.matmul(a, b.T)
    if provider == "eager":
        return lambda: similarity_reference(a, b, SCALE, BIAS)
    return lambda: similarity(a, b, SCALE, BIAS, backend=provider)


def measure(bench: Bench, case: Case, runs: int | None = None, rivals=()) -> dict:
    """One case, a row of "retrieval"; ``rivals`` (providers) run between its timed runs."""
    k = case.more.get("k")
    a, b = (features(case.N, case.D, bench.device, s).to(bench.dtype) for s in SEEDS[case.op])
    row = {"op": case.op, "provider": case.provider, "mode": case.mode, "N": case.N, "D": case.D}
    row = bench.add("retrieval", {**row, "dtype": bench.dtype_name, **case.more})
    if case.provider in TRITON:
        row["autotune"] = bench.autotune
    fn = function(case.op, case.provider, a, b, k)
    others = [function(case.op, p, a, b, k) for p in rivals]
    return bench.measure(row, fn, 2 * case.N * case.N * case.D, runs=runs, rivals=others)


def part_retrieval(bench: Bench) -> None:
    D = bench.D(RETRIEVAL_D)
    n = bench.pick(SIMILARITY)
    for provider in (*TRITON, "cublas", "eager"):
        measure(bench, Case("similarity", provider, "eval", n, D))
    settle(bench.device)
    n = bench.pick(TOPK)
    for provider in (*TRITON, "eager"):
        measure(bench, Case("topk", provider, "eval", n, D, (("k", K),)))


@needs_cuda
@pytest.mark.parametrize("case", GRID, ids=str)
def test_gpu(benchmark, bench: Bench, case: Case):
    record(benchmark, lambda: measure(bench, case, ROUNDS))


@cpu_only
@pytest.mark.parametrize("case", CPU, ids=str)
def test_cpu_topk(benchmark, bench: Bench, case: Case):
    rivals = [c.provider for c in CPU if c.provider != case.provider and c.N == case.N]
    record(benchmark, lambda: measure(bench, case, ROUNDS, rivals))
