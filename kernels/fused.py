"""The "fused" design of both losses' gradients (``backend="fused"``): Triton row sweeps that
accumulate G times the other operand in private fp32 workspaces (``sweeps.sweep_rows``), with no
G buffer and no GEMM library. The math is in ``contrastive.py`` and ``siglip.py``.

- InfoNCE (``contrastive_backward``, 2 + 2 passes): one launch per operand; each program owns
  a block of rows, recomputes their tiles against a chunk of the other operand (1 pass), forms
  G and accumulates G times the other operand in a private fp32 workspace (1 pass): no buffer,
  no GEMM library, but each tile also reads and writes a BM x D fp32 accumulator, which bounds
  it by L2 bandwidth.
- SigLIP (``siglip_forward``, 4 passes; its sweeps are ``siglip._sweep_kernel`` with GRAD,
  which also computes the loss alone): one sweep owning blocks of x's rows yields the
  loss, sum G and G y (2 passes), a second owning blocks of y's rows yields G^T x (2 passes),
  each accumulating into a private fp32 workspace (deterministic, no atomics; per tile also a
  BM x D fp32 accumulator read and written, which bounds it by L2 bandwidth).

Workspaces are bounded by ``block_bytes``: rows run in slices whose (col_split, rows, D) fp32
workspace stays within it. This design stays selectable until a GPU run has measured the
bounded blocks faster at every N; then this module goes, with its branches in
``fastclip.backends``, its rows in ``fastclip.registry`` and its case in ``fastclip.costs``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .contrastive import Stats, softmax_gradient, softmax_sides
from .jit import (
    LOG2E,
    accumulate_tile,
    clear_rows,
    column_chunk,
    similarity_tile,
    store_parts,
)
from .launch import TileConfig, configs, g_storage_scale, prune_configs
from .siglip import sweep
from .sweeps import sweep_rows


@triton.jit
def _backward_kernel(
    # pointers
    a_ptr,
    b_ptr,
    scale_ptr,
    acc_ptr,  # (col_split, n_a, D) fp32 workspace: G b partials, written
    parts_ptr,  # (1, col_split, n_a) partial sums of G_ij <a_i, b_j>, written
    a_stats_ptr,  # (4, n_a) statistics of the softmax over a's rows (A_TERM)
    b_stats_ptr,  # (4, n_b) statistics of the softmax over b's rows (B_TERM)
    # sizes
    n_a,
    n_b,
    D,
    offset,  # a's row i pairs with b's row i + offset
    n_bucket,  # autotune key only
    # strides
    stride_a,
    stride_ad,
    stride_b,
    stride_bd,
    # meta-parameters
    A_TERM: tl.constexpr,
    B_TERM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    """Accumulate G b for a block of rows of a over a chunk of b: 2 matmul passes of n_a n_b D.

    S is recomputed tile by tile and turned into G (``softmax_gradient``); the program's
    private workspace slice collects G_ij b_j over its chunk, and its rows' sums of G_ij S_ij / s
    (dL/ds's terms, from G in fp32). Called with (x, y) for dL/dx and
    with (y, x) for dL/dy. Per tile: (BM + 2 BN) D operand elements read, and a BM x D fp32
    accumulator read and written.
    """
    rb = tl.program_id(0)
    pid_c = tl.program_id(1)
    scale2 = tl.load(scale_ptr).to(tl.float32) * LOG2E
    rows = rb * BM + tl.arange(0, BM)
    row_ok = rows < n_a
    a_rows = a_ptr + rows.to(tl.int64) * stride_a
    acc_blk = acc_ptr + (pid_c.to(tl.int64) * n_a + rb * BM) * D  # this program's workspace

    g_dots = tl.zeros((BM,), tl.float32)
    cb_start, cb_end = column_chunk(n_b, BN)
    if cb_start >= cb_end:
        clear_rows(acc_blk, row_ok, D, BM, BD)
    for cb in range(cb_start, cb_end):
        cols = cb * BN + tl.arange(0, BN)
        col_ok = cols < n_b
        b_rows = b_ptr + cols.to(tl.int64) * stride_b
        dots = similarity_tile(a_rows, b_rows, row_ok, col_ok, D, stride_ad, stride_bd, BK=BK,
                               DOT_PRECISION=DOT_PRECISION)  # fmt: skip
        g = softmax_gradient(dots, rows, cols, offset, scale2, a_stats_ptr, n_a, b_stats_ptr,
                             n_b, A_TERM=A_TERM, B_TERM=B_TERM)  # fmt: skip
        g_dots += tl.sum(g * dots, axis=1)
        accumulate_tile(g, b_ptr, cb, col_ok, acc_blk, row_ok, D, stride_b, stride_bd,
                        fresh=cb == cb_start, BM=BM, BN=BN, BD=BD,
                        DOT_PRECISION=DOT_PRECISION)  # fmt: skip
    store_parts(parts_ptr, g_dots, 0, rows, row_ok, n_a)


_BACKWARD_CONFIGS = configs(
    ("BM", "BN", "BK", "BD"),
    [  # (BM, BN, BK, BD, warps, stages, CTAs per SM)
        (128, 64, 64, 128, 8, 3, 1),
        (128, 64, 64, 64, 8, 3, 1),
        (64, 64, 64, 64, 4, 3, 2),
        (64, 64, 32, 64, 4, 2, 2),
    ],
)
_backward_tuned = triton.autotune(
    _BACKWARD_CONFIGS,
    key=["D", "n_bucket", "DOT_PRECISION", "A_TERM", "B_TERM"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_backward_kernel)


def contrastive_backward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    stats: Stats,
    w_x: torch.Tensor,
    w_y: torch.Tensor | None,
    weight: torch.Tensor,
    offset: int,
    need_dx: bool,
    need_dy: bool,
    *,
    block_bytes: int | None = None,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """InfoNCE's gradients by the fused row sweeps (module docstring). Arguments and returns as
    ``contrastive.contrastive_backward``'s, but ``block_bytes`` bounds the fp32 workspace."""
    g_scale = g_storage_scale(x.dtype)  # G tiles meet the tensor cores in x's dtype
    x_side, y_side = softmax_sides(stats, w_x, w_y, y.shape[0], offset, g_scale)
    weight = weight / g_scale

    def sweep(a, b, a_side, b_side, off):
        def args_of(rows):
            return dict(
                a_stats_ptr=None if a_side is None else a_side[:, rows].contiguous(),
                b_stats_ptr=b_side,
                offset=off + rows.start,
                A_TERM=a_side is not None,
                B_TERM=b_side is not None,
            )

        return sweep_rows(
            _backward_kernel,
            _backward_tuned,
            a,
            b,
            scale,
            config,
            args_of,
            n_parts=1,
            grad_scale=scale * weight,
            workspace_bytes=block_bytes,
        )

    dx = dy = sums = None
    if need_dx or not need_dy:  # dL/ds comes with either sweep
        dx, sums = sweep(x, y, x_side, y_side, offset)
    if need_dy:
        dy, sums_y = sweep(y, x, y_side, x_side, -offset)
        sums = sums if sums is not None else sums_y
    return (dx if need_dx else None), dy, sums[0] * weight


def siglip_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    offset: int | None,
    need_dx: bool,
    need_dy: bool,
    need_dparams: bool,
    *,
    block_bytes: int | None = None,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
           torch.Tensor | None]:  # fmt: skip
    """SigLIP's loss and gradients by the fused sweeps (module docstring). Arguments and
    returns as ``siglip.siglip_forward``'s, but ``block_bytes`` bounds the fp32 workspace."""
    n_x = x.shape[0]
    # The loss, dL/ds, dL/db and dL/dx; then dL/dy.
    dx, sums = sweep(x, y, scale, bias, n_x, offset, True, need_dx, block_bytes, config)
    dy = None
    if need_dy:
        y_offset = None if offset is None else -offset
        dy, _ = sweep(y, x, scale, bias, n_x, y_offset, False, True, block_bytes, config)
    dscale, loss, dbias = sums.unbind()
    if not need_dparams:
        return loss, dx, dy, None, None
    return loss, dx, dy, dscale, dbias
