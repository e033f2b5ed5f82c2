"""The bounded-block walk's GEMMs: 16-bit operands into fp32 accumulators, with cuBLAS's fp32
output where torch can give it (``out_dtype``) and exact widening elsewhere, decided by a probe
that works on every supported torch.

The probe meets three kinds of torch here, simulated on the CPU by stand-ins for ``torch.mm``
and ``torch.addmm``: one that has ``out_dtype`` for both (torch >= 2.10 on CUDA), one whose
``addmm`` refuses an fp32 input with 16-bit operands (torch 2.8 and 2.9), one without the
argument (torch < 2.8).
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
