"""The cost model reproduces the measured H200 points and counts what each design executes; the
backend table picks from measurements first, the model second."""

from __future__ import annotations

import pytest
import torch

import fastclip.backends as fb
from fastclip import costs
from fastclip.kernels.blocks import BLOCK_BYTES

N, PASS = 65536, lambda n, d: 2.0 * n * n * d  # noqa: E731


@pytest.mark.parametrize(
    "op, impl, D, backward, measured, tolerance",
    [
        ("contrastive", "fused", 512, False, 16.4e-3, 0.1),  # forward, 268 TFLOP/s
        ("contrastive", "fused", 512, True, 132e-3, 0.15),  # forward + fused backward
        ("siglip", "fused", 768, True, 204e-3, 0.25),  # both fused sweeps
    ],
)
def test_calibrated_on_the_h200_measurements(op, impl, D, backward, measured, tolerance):
    """benchmarks/results/2026-11-27-h200-partial, bf16, N = 65,536."""
    seconds = costs.loss_cost(op, impl, N, D, 2, backward).seconds
    assert seconds == pytest.approx(measured, rel=tolerance)


@pytest.mark.parametrize(
    "op, impl, passes",
    [
        ("contrastive", "blocks", 4),  # S, S again, G y, G^T x: the floor
        ("contrastive", "blocks-mm", 4),
        ("contrastive", "fused", 5),  # the backward recomputes S once per operand
        ("siglip", "blocks", 3),  # S, G y, G^T x: the floor
        ("siglip", "blocks-mm", 3),
        ("siglip", "fused", 4),
    ],
)
def test_counts_the_matmul_passes_each_design_executes(op, impl, passes):
    cost = costs.loss_cost(op, impl, 8192, 512)
    assert cost.flops == pytest.approx(passes * PASS(8192, 512))


@pytest.mark.parametrize("impl", ["blocks", "blocks-mm"])
@pytest.mark.parametrize("n", [4096, 65536, 1 << 20])
def test_the_block_buffer_stays_bounded(impl, n):
    cost = costs.loss_cost("contrastive", impl, n, 512)
    assert 0 < cost.buffer_bytes <= BLOCK_BYTES
    assert cost.launches >= 1


def test_time_grows_with_the_batch_and_the_width():
    for impl in costs.CONTRASTIVE:
        times = [costs.loss_cost("contrastive", impl, n, 512).seconds for n in (4096, 16384, 65536)]
        assert times == sorted(times), impl
        assert costs.loss_cost("contrastive", impl, 16384, 768).seconds > times[1], impl


def test_the_model_prefers_gemm_backwards_at_scale():
    """Where the fused backward is L2-bound (the measured case), the cuBLAS designs win."""
    assert costs.fastest("contrastive", costs.CONTRASTIVE[:3], N, 512, 2) != "fused"
    assert costs.fastest("siglip", costs.SIGLIP[:3], N, 768, 2) != "fused"


def test_the_table_picks_measurements_first(monkeypatch):
    modeled = fb.fastest("contrastive", torch.bfloat16, 512, N)
    assert modeled in ("blocks", "blocks-mm", "fused")
    other = next(name for name in ("fused", "blocks") if name != modeled)
    table = {"contrastive": {"bfloat16": {"512": {"65536": other, "4096": modeled}}}}
    monkeypatch.setattr(fb, "_measured", lambda: table)
    assert fb.fastest("contrastive", torch.bfloat16, 500, 60000) == other  # nearest D, N
    assert fb.fastest("contrastive", torch.bfloat16, 512, 5000) == modeled
    assert fb.fastest("siglip", torch.bfloat16, 512, N) in ("blocks", "blocks-mm", "fused")


def test_constants_by_gpu_name():
    """The H100's differ from the H200's in HBM bandwidth (and the measured GEMM rate) alone;
    any other GPU gets the H200's, named as the default."""
    assert costs.device_constants("NVIDIA H100 80GB HBM3") is costs.H100
    assert costs.device_constants("NVIDIA H200") is costs.H200
    assert costs.H100.hbm == pytest.approx(3.35e12) and costs.H100.l2 == costs.H200.l2
    other = costs.device_constants("NVIDIA A100-SXM4-80GB")
    assert other.hbm == costs.H200.hbm and "default" in other.name and "A100" in other.name
    assert "default" in costs.device_constants(None).name
    # Less HBM bandwidth and a slower GEMM: the same forward+backward takes longer.
    h100 = costs.loss_cost("contrastive", "blocks", N, 512, device=costs.H100).seconds
    assert h100 > costs.loss_cost("contrastive", "blocks", N, 512).seconds
