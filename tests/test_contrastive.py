"""What only the InfoNCE (CLIP) loss has: its forward kernel's statistics, one exponential per
element for 16-bit features, tensor descriptors, and the route's choice of implementation. What
it shares with SigLIP is in test_losses.py."""

from __future__ import annotations

import pytest
import torch
from helpers import CUDA, DEVICE, assert_close, check, make_inputs

import fastclip.backends as fb
import fastclip.kernels.contrastive as kc
import fastclip.kernels.launch as kl
from fastclip.kernels.launch import TileConfig

SMALL = kl.INTERPRETER_CONFIG  # 16 x 16 tiles


@pytest.mark.parametrize(
    "config",
    [
        SMALL,
        TileConfig(16, 16, 16, 16, num_stages=1, row_split=2, col_split=3),
        TileConfig(16, 32, 16, 32, num_stages=1, row_split=1, col_split=1),
        # More programs than blocks: idle programs and empty column chunks.
        TileConfig(16, 16, 16, 16, num_stages=1, row_split=9, col_split=7),
    ],
    ids=["auto-split", "split-2x3", "one-program", "oversplit"],
)
def test_kernel_statistics(config):
    """Positive dots and the rows' and columns' m straight from the forward kernel."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 40, generator=gen, dtype=torch.float64)
    y = torch.randn(70, 40, generator=gen, dtype=torch.float64)
    offset, rows = 11, torch.arange(50)
    s = 3.0 * x @ y.T
    pos = s[rows, rows + offset]
    pdot, row, col = kc.contrastive_forward(
        x.float().to(DEVICE), y.float().to(DEVICE), torch.tensor(3.0, device=DEVICE), offset,
        True, config=config,
    )  # fmt: skip
    others = (s - pos[:, None]).index_put(
        (rows, rows + offset), torch.tensor(-torch.inf, dtype=torch.float64)
    )
    assert_close(pdot, pos / 3, torch.float32, "positive dots")
    assert_close(row, torch.logsumexp(others, 1), torch.float32, "rows' m", floor=1.0)
    ref = torch.zeros(70, dtype=torch.float64)
    ref[offset : offset + 50] = pos
    others = (s - ref).index_put(
        (rows, rows + offset), torch.tensor(-torch.inf, dtype=torch.float64)
    )
    assert_close(col, torch.logsumexp(others, 0), torch.float32, "columns' m", floor=1.0)


@pytest.mark.parametrize(
    "guard, norms, scale",
    [(64.0, None, 14.3), (1e9, None, 14.3), (0.0, None, 14.3), (64.0, (0.1, 10.0), 30.0)],
    ids=["one-exp", "always-one-exp", "always-two-exp", "mixed-tiles"],
)
def test_forward_with_one_exponential(monkeypatch, guard, norms, scale):
    """16-bit features take one exponential per element wherever a tile passes the range guard
    (kc.RANGE) and two elsewhere: both give the float64 statistics of the rounded inputs. Row
    norms over two decades at scale 30 put logits from -3000 to 3000, so many tiles fail."""
    monkeypatch.setattr(kc, "RANGE", guard)
    ours, ref = make_inputs(70, 90, 32, dtype=torch.float16, scale=scale, row_norms=norms)
    x, y = (t.detach().double().cpu() for t in ours[:2])
    offset, rows = 7, torch.arange(70)
    s = scale * x @ y.T
    pos = s[rows, rows + offset]
    _, row, col = kc.contrastive_forward(
        *(t.detach() for t in ours[:3]), offset, True, config=SMALL
    )
    minus_inf = torch.tensor(-torch.inf, dtype=torch.float64)
    others = (s - pos[:, None]).index_put((rows, rows + offset), minus_inf)
    slack = max(1.0, s.abs().max().item() / 100)  # fp32 rounds logits in the thousands coarsely
    assert_close(row, torch.logsumexp(others, 1), torch.float32, "rows' m", slack, floor=1)
    col_ref = torch.zeros(90, dtype=torch.float64)
    col_ref[offset : offset + 70] = pos
    others = (s - col_ref).index_put((rows, rows + offset), minus_inf)
    assert_close(col, torch.logsumexp(others, 0), torch.float32, "columns' m", slack, floor=1)


@pytest.mark.parametrize("backend", fb.implementations("contrastive", triton=True))
def test_tensor_descriptors(monkeypatch, backend):
    """FASTCLIP_TMA=1: the forward and the G kernels read their operands through tensor
    descriptors, boxes past the last rows and features reading 0 (37 and 53 rows, 24 features
    in boxes of 16): the same loss and gradients."""
    monkeypatch.setenv("FASTCLIP_TMA", "1")
    ours, ref = make_inputs(37, 53, 24, dtype=torch.float16, seed=12)
    assert kl.tma(*ours[:2])
    check(ours, ref, backend, torch.float16, offset=9, config=SMALL)


def test_tensor_descriptors_only_where_the_operands_allow(monkeypatch):
    monkeypatch.setenv("FASTCLIP_TMA", "1")
    x = torch.zeros(8, 32, dtype=torch.float16, device=DEVICE)
    assert kl.tma(x, x)
    assert not kl.tma(x.float(), x.float())  # fp32: the pointer loads
    assert not kl.tma(x[:, :12].contiguous(), x)  # rows of 24 bytes: not 16-byte aligned
    assert not kl.tma(x.T.contiguous().T, x)  # features not contiguous
    monkeypatch.setenv("FASTCLIP_TMA", "0")
    assert not kl.tma(x, x)


def test_dot_precision_follows_torch():
    matmul = torch.backends.cuda.matmul  # a settings object: monkeypatch cannot undo on it
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert kl.dot_precision(torch.float32) == "ieee"
        matmul.allow_tf32 = True
        assert kl.dot_precision(torch.float32) == "tf32"
        assert kl.dot_precision(torch.bfloat16) == "ieee"
    finally:
        matmul.allow_tf32 = before


def test_auto_backend_picks_a_kernel_on_cuda_only(monkeypatch):
    x = torch.zeros(4, 8, device=DEVICE)
    triton = fb.implementations("contrastive", triton=True)
    assert fb.choose("contrastive", "auto", x) in (triton if CUDA else ["torch"])
    assert fb.choose("contrastive", "auto", x.double()) == "torch"
    assert fb.choose("contrastive", "torch", x) == "torch"
    assert fb.choose("contrastive", "triton", x) in triton  # the interpreter stands in
    assert fb.choose("contrastive", "fused", x) == "fused"
    with pytest.raises(ValueError, match="backend must be one of"):
        fb.choose("similarity", "blocks", x)
    monkeypatch.setattr(fb, "kc", None)  # Triton not installed
    assert fb.choose("contrastive", "auto", x) == "torch"
    with pytest.raises(ValueError, match="needs the triton package"):
        fb.choose("contrastive", "triton", x)
