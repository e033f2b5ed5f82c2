"""The fused InfoNCE loss against the float64 eager reference: values and all four gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import CUDA, DEVICE, LOSS_BACKENDS, assert_close, check, make_inputs, needs_cuda

import fastclip.backends as fb
import fastclip.kernels.contrastive as kc
import fastclip.kernels.tiles as kt
from fastclip import clip_loss, infonce, siglip_loss
from fastclip.measure import peak_memory_bytes
from fastclip.reference import clip_loss_exact, clip_loss_reference

BACKENDS = LOSS_BACKENDS
SMALL = kc.TileConfig(block_m=16, block_n=16, block_k=16, block_d=16, num_stages=1)
# A G buffer of 24 x 24 fp32 entries: the bounded-block backends run many blocks, ragged ones.
TINY_BLOCKS = 24 * 24 * 8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n_img, n_txt, offset, both",
    [
        (1, 1, 0, True),
        (37, 37, 0, True),  # not a multiple of the tile
        (64, 64, 0, True),  # exactly four tiles
        (20, 45, 7, True),  # rectangular, positives shifted
        (20, 45, 25, True),  # positives in the last columns
        (20, 45, 7, False),  # one direction (the distributed local loss)
        (45, 45, 0, False),
    ],
)
def test_shapes(backend, tiles, n_img, n_txt, offset, both):
    tiles(SMALL)
    ours, ref = make_inputs(n_img, n_txt, 24, seed=n_img + n_txt)
    check(ours, ref, backend, torch.float32, offset, both)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_img, n_txt, offset, both", [(70, 70, 0, True), (45, 83, 30, False)])
def test_many_small_blocks(backend, tiles, n_img, n_txt, offset, both):
    """A G buffer far smaller than the problem: blocks of 16-24 rows and columns, ragged at the
    edges, the positives crossing block boundaries (PyTorch path too: the same driver)."""
    tiles(SMALL)
    ours, ref = make_inputs(n_img, n_txt, 24, seed=n_img)
    check(ours, ref, backend, torch.float32, offset, both, block_bytes=TINY_BLOCKS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [1, 17, 64, 500, 512, 768, 1000, 1024])
def test_feature_widths(backend, tiles, dim):
    # Wider chunks keep the interpreter fast; D = 500, 1000 still end in a masked chunk.
    tiles(kc.TileConfig(block_m=16, block_n=16, block_k=64, block_d=128, num_stages=1))
    ours, ref = make_inputs(19, 23, dim, seed=dim)
    check(ours, ref, backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0, 1000.0])
def test_scales_and_unnormalized_features(backend, tiles, scale):
    tiles(SMALL)
    # Unnormalized features at scale 1000 put logits in the thousands: an exact logsumexp
    # with a running max is required; a fixed maximum would overflow or underflow.
    ours, ref = make_inputs(29, 29, 20, scale=scale, norm=False, seed=3)
    check(ours, ref, backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_python_scale(backend, tiles):
    tiles(SMALL)
    ours, ref = make_inputs(21, 21, 16, bias=None)
    x, y = ours[0], ours[1]
    loss = clip_loss(x, y, 7.5, backend=backend)
    expected = clip_loss_exact(ref[0], ref[1], 7.5)
    assert_close(loss, expected, torch.float32, "loss")
    loss.backward()
    expected.backward()
    assert_close(x.grad, ref[0].grad, torch.float32, "d_image")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, tiles):
    tiles(SMALL)
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(33, 48, generator=gen, dtype=torch.float64)
    stored_transposed = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    x = wide.float().to(DEVICE)[:, ::2].detach()  # column stride 2
    y = stored_transposed.float().to(DEVICE).T.detach()  # (40, 24), row stride 1
    assert not x.is_contiguous() and not y.is_contiguous()
    ours = [x.requires_grad_(), y.requires_grad_(), torch.tensor(5.0, device=DEVICE), None]
    ref = [wide[:, ::2].clone().requires_grad_(), stored_transposed.T.clone().requires_grad_()]
    ref += [torch.tensor(5.0, dtype=torch.float64), None]
    check(ours, ref, backend, torch.float32, offset=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_some_inputs_require_grad(backend, tiles):
    """Locked towers: a frozen side gets no gradient, the rest stays exact."""
    tiles(SMALL)
    for frozen in range(3):
        ours, ref = make_inputs(18, 26, 16, seed=frozen)
        ours[frozen].requires_grad_(False)
        ref[frozen].requires_grad_(False)
        check(ours, ref, backend, torch.float32, offset=4)
        assert ours[frozen].grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_features_give_non_finite_loss(backend, tiles):
    tiles(SMALL)
    for bad in (float("nan"), float("inf")):
        ours, _ = make_inputs(17, 17, 16)
        x = ours[0].detach().clone()
        x[3, 5] = bad
        assert not torch.isfinite(infonce(x, *ours[1:], backend=backend))


@pytest.mark.parametrize(
    "config",
    [
        SMALL,
        kc.TileConfig(16, 16, 16, 16, num_stages=1, row_split=2, col_split=3),
        kc.TileConfig(16, 32, 16, 32, num_stages=1, row_split=1, col_split=1),
        # More programs than blocks: idle programs and empty column chunks.
        kc.TileConfig(16, 16, 16, 16, num_stages=1, row_split=9, col_split=7),
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
        True, config,
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


def test_backward_in_workspace_slices(monkeypatch, tiles):
    """A workspace budget smaller than the problem: the backward runs in several row slices."""
    tiles(kc.TileConfig(16, 16, 16, 16, num_stages=1, col_split=2))
    monkeypatch.setattr(kt, "WORKSPACE_BYTES", 2 * 64 * 24 * 4)  # 64 rows per slice
    ours, ref = make_inputs(150, 160, 24, seed=9)
    check(ours, ref, "fused", torch.float32, offset=6)


def test_backward_slices_with_idle_column_chunks(monkeypatch, tiles):
    """More column chunks than column blocks (so idle programs), and a last row slice shorter
    than the others: every chunk's workspace partial must be fresh, never a previous slice's."""
    tiles(kc.TileConfig(16, 16, 16, 16, num_stages=1, col_split=7))
    monkeypatch.setattr(kt, "WORKSPACE_BYTES", 7 * 64 * 16 * 4)  # 64 rows per slice
    ours, ref = make_inputs(20, 100, 16, seed=10)  # dy: 100 rows of y against 2 blocks of x
    check(ours, ref, "fused", torch.float32, offset=30)


def test_dot_precision_follows_torch():
    matmul = torch.backends.cuda.matmul  # a settings object: monkeypatch cannot undo on it
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert kt.dot_precision(torch.float32) == "ieee"
        matmul.allow_tf32 = True
        assert kt.dot_precision(torch.float32) == "tf32"
        assert kt.dot_precision(torch.bfloat16) == "ieee"
    finally:
        matmul.allow_tf32 = before


def test_auto_backend_picks_a_kernel_on_cuda_only(monkeypatch):
    x = torch.zeros(4, 8, device=DEVICE)
    triton = [name for name, impl in fb.IMPLEMENTATIONS["contrastive"].items() if impl.triton]
    assert fb.choose("contrastive", "auto", x).name in (triton if CUDA else ["torch"])
    assert fb.choose("contrastive", "auto", x.double()).name == "torch"
    assert fb.choose("contrastive", "torch", x).name == "torch"
    assert fb.choose("contrastive", "triton", x).name in triton  # the interpreter stands in
    assert fb.choose("contrastive", "fused", x).name == "fused"
    with pytest.raises(ValueError, match="backend must be one of"):
        fb.choose("similarity", "blocks", x)
    monkeypatch.setattr(fb, "kc", None)  # Triton not installed
    assert fb.choose("contrastive", "auto", x).name == "torch"
    with pytest.raises(ValueError, match="needs the triton package"):
        fb.choose("contrastive", "triton", x)


# ---------------------------------------------------------------------------------------------
# CUDA only: low precision, autotuned configs, large shapes, memory
# ---------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("backend", ["blocks", "blocks-mm", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, dim", [(1000, 512), (4096, 768), (3001, 1000)])
def test_low_precision_no_worse_than_eager(backend, dtype, n, dim):
    ours, ref = make_inputs(n, n, dim, dtype=dtype, scale=100.0, seed=n)
    loss = clip_loss(*ours, backend=backend)
    loss.backward()
    expected = clip_loss_exact(*ref)
    expected.backward()
    eager_in = [t.detach().clone().requires_grad_() for t in ours[:2]] + ours[2:]
    eager = clip_loss_reference(*eager_in)
    eager.backward()
    for name, a, b, e in [
        ("loss", loss, expected, eager),
        ("d_image", ours[0].grad, ref[0].grad, eager_in[0].grad),
        ("d_text", ours[1].grad, ref[1].grad, eager_in[1].grad),
    ]:
        err = (a.double().cpu() - b.double().cpu()).abs().max().item()
        eager_err = (e.double().cpu() - b.double().cpu()).abs().max().item()
        bound = 2 * eager_err + 1e-3 * b.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > 2 x eager's {eager_err:.3g} (+slack)"


@needs_cuda
@pytest.mark.parametrize("backend", ["blocks", "blocks-mm", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autotuned_matches_reference(backend, dtype, monkeypatch):
    monkeypatch.setenv("FASTCLIP_AUTOTUNE", "1")
    ours, ref = make_inputs(2500, 2600, 512, dtype=dtype, seed=2)
    check(ours, ref, backend, dtype, offset=50)


@needs_cuda
@pytest.mark.parametrize("backend", ["blocks", "blocks-mm", "fused"])
def test_memory_grows_linearly_not_quadratically(backend):
    n, dim = 16384, 256
    ours, _ = make_inputs(n, n, dim, dtype=torch.bfloat16)
    block = 32 * 2**20
    run = lambda: clip_loss(*ours, backend=backend, block_bytes=block).backward()  # noqa: E731
    extra = peak_memory_bytes(run, DEVICE)
    bound = n * dim * 8 + 2 * block  # the gradients, their fp32 accumulator, the G buffer
    assert extra < bound, f"fwd+bwd added {extra / 2**20:.0f} MiB; N x N is 512 MiB"


@needs_cuda
@pytest.mark.parametrize("backend", ["blocks", "blocks-mm", "fused"])
def test_fixed_default_tiles_without_autotuning(backend, monkeypatch):
    monkeypatch.setenv("FASTCLIP_AUTOTUNE", "0")
    ours, ref = make_inputs(1500, 1700, 768, dtype=torch.bfloat16, seed=4)
    check(ours, ref, backend, torch.bfloat16, offset=100)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("backend", ["torch", "blocks", "blocks-mm"])
def test_block_memory_stays_within_the_budget(tiles, backend, loss):
    """Forward and backward with a 32 x 32 block buffer: the extra memory is the gradients, their
    accumulators and a few blocks, far below one N x N matrix (which eager allocates)."""
    tiles(SMALL)
    n, dim, block = 256, 16, 32 * 32 * 8
    ours, ref = make_inputs(n, n, dim, bias=-1.0)
    fn = clip_loss if loss == "clip" else siglip_loss
    run = lambda: fn(*ours, backend=backend, block_bytes=block).backward()  # noqa: E731
    extra = peak_memory_bytes(run, DEVICE)
    bound = 4 * n * dim * 4 + 8 * block  # dx, dy, dy's accumulator, a panel; G, dots, scratch
    assert extra <= bound, f"{extra} bytes added, budget {bound}"
    eager = peak_memory_bytes(lambda: clip_loss_reference(*ref[:3]).backward(), DEVICE)
    assert eager > n * n * 8  # the measure sees an N x N matrix where there is one


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
    _, row, col = kc.contrastive_forward(*(t.detach() for t in ours[:3]), offset, True, SMALL)
    minus_inf = torch.tensor(-torch.inf, dtype=torch.float64)
    others = (s - pos[:, None]).index_put((rows, rows + offset), minus_inf)
    slack = max(1.0, s.abs().max().item() / 100)  # fp32 rounds logits in the thousands coarsely
    assert_close(row, torch.logsumexp(others, 1), torch.float32, "rows' m", slack, floor=1)
    col_ref = torch.zeros(90, dtype=torch.float64)
    col_ref[offset : offset + 70] = pos
    others = (s - col_ref).index_put((rows, rows + offset), minus_inf)
    assert_close(col, torch.logsumexp(others, 0), torch.float32, "columns' m", slack, floor=1)


@pytest.mark.parametrize("backend", ["blocks", "blocks-mm", "fused"])
def test_tensor_descriptors(monkeypatch, tiles, backend):
    """FASTCLIP_TMA=1: the forward and the G kernels read their operands through tensor
    descriptors, boxes past the last rows and features reading 0 (37 and 53 rows, 24 features
    in boxes of 16): the same loss and gradients."""
    monkeypatch.setenv("FASTCLIP_TMA", "1")
    tiles(SMALL)
    ours, ref = make_inputs(37, 53, 24, dtype=torch.float16, seed=12)
    assert kt.tma(*ours[:2])
    check(ours, ref, backend, torch.float16, offset=9)


def test_tensor_descriptors_only_where_the_operands_allow(monkeypatch):
    monkeypatch.setenv("FASTCLIP_TMA", "1")
    x = torch.zeros(8, 32, dtype=torch.float16, device=DEVICE)
    assert kt.tma(x, x)
    assert not kt.tma(x.float(), x.float())  # fp32: the pointer loads
    assert not kt.tma(x[:, :12].contiguous(), x)  # rows of 24 bytes: not 16-byte aligned
    assert not kt.tma(x.T.contiguous().T, x)  # features not contiguous
    monkeypatch.setenv("FASTCLIP_TMA", "0")
    assert not kt.tma(x, x)
