"""The bounded-block walk's GEMMs: 16-bit operands into fp32 accumulators, with cuBLAS's fp32
output where torch can give it (``out_dtype``) and exact widening elsewhere, decided by a probe
that works on every supported torch.

The probe meets three kinds of torch here, simulated on the CPU by stand-ins for ``torch.mm``
and ``torch.addmm``: one that has ``out_dtype`` for both (torch >= 2.10 on CUDA), one whose
``addmm`` refuses an fp32 input with 16-bit operands (torch 2.8 and 2.9), one without the
argument (torch < 2.8).

The plan of the blocks: large ones on a GPU, whose GEMMs fill their waves; small ones for small
buffers, as the tests of the losses use them.
"""

from __future__ import annotations

import pytest
import torch

from fastclip.kernels import blocks

MM, ADDMM = torch.mm, torch.addmm


def fp32_output(fn):
    """``fn`` with out_dtype=float32 done as cuBLAS does it: fp32 products of the operands."""

    def call(*args, out_dtype=None, out=None, **kwargs):
        if out_dtype is None:
            return fn(*args, out=out, **kwargs)
        *rest, a, b = args
        wide = [t.float() for t in (*rest, a, b)]
        calls.append(fn.__name__)
        return fn(*wide, out=out, **kwargs)

    calls = []
    call.calls = calls
    return call


def refusing_fp32_input(*args, out_dtype=None, out=None, **kwargs):
    """torch 2.8/2.9's addmm: its input must have the operands' dtype, out_dtype or not."""
    acc, a, _ = args
    if out_dtype is not None and acc.dtype != a.dtype:
        raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")
    return ADDMM(*args, out=out, **kwargs)


def without_out_dtype(fn):
    def call(*args, out=None, **kwargs):  # torch < 2.8: no such keyword
        return fn(*args, out=out, **kwargs)

    return call


TORCHES = {  # name -> () -> (mm, addmm, whether the probe should allow out_dtype)
    "out_dtype": lambda: (fp32_output(MM), fp32_output(ADDMM), True),
    "addmm-refuses-fp32-input": lambda: (fp32_output(MM), refusing_fp32_input, False),
    "no-out_dtype": lambda: (without_out_dtype(MM), without_out_dtype(ADDMM), False),
}


@pytest.fixture(params=TORCHES.values(), ids=TORCHES.keys())
def torch_like(request, monkeypatch):
    mm, addmm, expected = request.param()
    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)
    blocks.out_dtype_products.cache_clear()
    yield mm, addmm, expected
    blocks.out_dtype_products.cache_clear()


def operands(dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(40, 24, generator=gen).to(dtype)
    b = torch.randn(24, 32, generator=gen).to(dtype)
    return a, b, a.double() @ b.double()


def test_the_probe_tells_each_torch_apart(torch_like):
    _, _, expected = torch_like
    assert blocks.out_dtype_products("cpu") is expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_products_are_exact_on_every_torch(torch_like, dtype):
    """Both GEMMs give the fp32-accumulated product of the operands (widening a 16-bit value is
    exact), whichever path the probe picked; the out_dtype path is taken exactly where the probe
    allows it."""
    mm, addmm, expected = torch_like
    a, b, exact = operands(dtype)
    out = torch.empty(40, 32)
    blocks.matmul_f32(a, b, out=out)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
    acc = torch.ones(40, 32)
    blocks.accumulate_mm(acc, a, b)
    blocks.accumulate_mm(acc, a, b)
    torch.testing.assert_close(acc.double(), 1 + 2 * exact, rtol=1e-5, atol=1e-5)
    if expected:  # the probe's two calls, then one product and two accumulations
        assert mm.calls == ["mm", "mm"] and addmm.calls == ["addmm", "addmm", "addmm"]


def test_this_cpu_widens():
    """The real torch on this CPU, whatever the probe finds there."""
    blocks.out_dtype_products.cache_clear()
    a, b, exact = operands()
    acc = torch.zeros(40, 32)
    blocks.accumulate_mm(acc, a, b)
    torch.testing.assert_close(acc.double(), exact, rtol=1e-5, atol=1e-5)
    assert blocks.out_dtype_products("meta") is False


# ---------------------------------------------------------------------------------------------
# The block plan
# ---------------------------------------------------------------------------------------------


def waves_filled(m: int, d: int, sms: int = 132) -> float:
    """The share of whole waves on ``sms`` SMs that an (m, d) GEMM output's 128 x 128 tiles
    fill."""
    tiles = -(-m // 128) * -(-d // 128)
    return tiles / (sms * -(-tiles // sms))


@pytest.mark.parametrize("dim", [512, 768])
@pytest.mark.parametrize("n", [65536, 1 << 20])
def test_large_batches_get_large_blocks_that_fill_the_waves(n, dim):
    """bf16 in the GPU's buffer: sides >= 8192 dividing N, both products' outputs (R x D for
    G y, C x D for G^T x) filling >= 95% of their waves, and >= 2048 FLOPs per byte of the fp32
    accumulators' traffic."""
    R, C = blocks.plan_blocks(n, n, 2, blocks.BLOCK_BYTES)
    assert (R, C) == (8192, 16384) and R * C * 2 <= blocks.BLOCK_BYTES
    assert n % R == n % C == 0
    assert min(waves_filled(R, dim), waves_filled(C, dim)) >= 0.95
    assert 4 * R * C * dim / ((R + C) * dim * 8) >= 2048


@pytest.mark.parametrize(
    "n_x, n_y, plan",
    [
        (4096, 4096, (4096, 4096)),  # one block up to 11,585 square
        (11585, 11585, (11585, 11585)),
        (100, 2500, (100, 2500)),
        (11586, 11586, (8192, 11586)),  # whole rows, a power of two of them
        (100_000, 6000, (16384, 6000)),
        (4096, 65536, (4096, 32768)),  # all of n_x: wider blocks
        (100_000, 100_000, (8192, 16384)),  # ragged edges
    ],
)
def test_the_gpu_plan(n_x, n_y, plan):
    assert blocks.plan_blocks(n_x, n_y, 2, blocks.BLOCK_BYTES) == plan


@pytest.mark.parametrize(
    "n_x, n_y, element, block_bytes, plan",
    [
        (96, 96, 2, 8 * 2**10, (64, 64)),  # the benchmarks' tiny scale
        (70, 70, 4, 24 * 24 * 8, (32, 32)),  # test_losses' tiny buffer: fp32 G
        (45, 83, 8, 24 * 24 * 8, (16, 32)),  # and dots
        (70, 70, 16, 24 * 24 * 8, (16, 16)),  # the PyTorch path's four fp32 arrays
        (40, 40, 16, 16 * 16 * 8, (16, 16)),  # below MIN_SIDE squared: MIN_SIDE
        (37, 37, 4, 37 * 37 * 4, (37, 37)),  # one block
        (65536, 65536, 6, blocks.BLOCK_BYTES, (4096, 8192)),  # blocks-mm: bf16 G, fp32 dots
        (65536, 65536, 16, blocks.BLOCK_BYTES, (4096, 4096)),
    ],
)
def test_small_buffers_give_small_blocks(n_x, n_y, element, block_bytes, plan):
    R, C = blocks.plan_blocks(n_x, n_y, element, block_bytes)
    assert (R, C) == plan
    assert R * C * element <= max(block_bytes, blocks.MIN_SIDE**2 * element)
