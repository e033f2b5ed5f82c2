"""Fused InfoNCE (CLIP) contrastive loss: Triton forward and backward, never an N x N buffer.

Math. Row i of ``x`` (n_x, D) and row j of ``y`` (n_y, D) score

    S_ij = s * <x_i, y_j> + b                           (s: logit scale, b: logit bias)

and row i's positive partner is column i + offset (offset >= 0, n_x + offset <= n_y). With
row and column log-sum-exps r_i = logsumexp_j S_ij and c_j = logsumexp_i S_ij, the loss is

    L = sum_i wx_i * (r_i - S_i,i+off) + sum_j wy_j * (c_j - S_j-off,j)

where both_directions=True gives CLIP's symmetric loss (wx_i = 1/(2 n_x), wy_j = 1/(2 n_x) on the
n_x columns that hold a positive, 0 elsewhere) and both_directions=False the one-directional
cross-entropy (wx_i = 1/n_x, wy = 0). Its gradient with respect to S is

    G_ij = wx_i * (exp(S_ij - r_i) - d_ij) + wy_j * (exp(S_ij - c_j) - d_ij),  d_ij = [j == i+off]

so dL/dx = s * G y, dL/dy = s * G^T x, dL/ds = sum_ij G_ij <x_i, y_j> = sum_i <(G y)_i, x_i>, and
dL/db = sum_ij G_ij = 0 exactly (each softmax sums to one, so the bias cancels; it is still added to
S so that the numbers are those of the definition).

Design and cost, in matmul passes of n_x * n_y * D multiply-adds (the floor is 4):

- forward, 1 pass (``_forward_kernel``). A 2-D grid: program (a, b) walks row blocks a,
  a + row_split, ... against the column blocks of chunk b. It keeps each row block's running max
  and sum of exponentials in registers (the online logsumexp) and writes one partial r per column
  chunk; for the other direction it merges each tile's column logsumexp into a partial c owned by
  its row chunk. The partials, O((row_split + col_split) * N) floats, are combined with a
  logsumexp afterwards. The positive logits are n_x row dot products (``_row_dot_kernel``, O(N D)).
- backward, 2 + 2 passes (``_backward_kernel``). One launch per operand: each program owns a block
  of rows of that operand, recomputes their similarity tiles against a chunk of the other operand
  (1 pass), turns them into the softmax part of G with the saved logsumexps and accumulates it
  times the other operand in an fp32 workspace (1 pass). The workspace is private to its program:
  deterministic, no atomics. ``_finalize_kernel`` then sums the chunks' partials, subtracts the
  positive pairs' -d_ij terms (one row of the other operand per row, O(N D)) and writes the
  gradient and the terms of dL/ds. One launch producing both gradients from one recomputation
  would need only 3 passes, but either a register accumulator of D floats per row (too large for
  D >= 512) or atomic additions into both gradients on every tile, costlier than the pass saved.

Total: 5 passes. Extra memory: the O(N) statistics above and an fp32 workspace of at most
``WORKSPACE_BYTES`` (the backward processes the rows in slices that fit it). Inputs in fp32, fp16
or bf16; all arithmetic in fp32; fp32 inputs use TF32 products only when torch allows TF32 matmuls.
Exponentials are taken in base 2 with log2(e) folded into the scale. Row offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import (
    LN2,
    LOG2E,
    MIN_BLOCK,
    TileConfig,
    accumulate_tile,
    base2_affine,
    bucket,
    clear_rows,
    column_chunk,
    configs,
    dot_precision,
    finalize,
    launch,
    plan_workspace,
    positive_logits,
    prune_configs,
    similarity_tile,
    target_programs,
)

# Forward programs along rows; each owns a partial column logsumexp of length n_y.
MAX_ROW_SPLIT = 16

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _logaddexp2(a, b):
    hi = tl.maximum(a, b)
    return hi + tl.log2(1.0 + tl.exp2(tl.minimum(a, b) - hi))


@triton.jit
def _forward_kernel(
    # pointers
    x_ptr,
    y_ptr,
    scale_ptr,
    bias_ptr,
    row_lse_ptr,  # (col_split, n_x) partial row logsumexps, written
    col_lse_ptr,  # (row_split, n_y) partial column logsumexps, read-modify-written
    # sizes
    n_x,
    n_y,
    D,
    n_bucket,  # autotune key only
    # strides
    stride_x,
    stride_xd,
    stride_y,
    stride_yd,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    COL_STATS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Row and column logsumexps of S = s x y^T + b: 1 matmul pass of n_x n_y D.

    Inputs: x (n_x, D) and y (n_y, D) features, s and b as one-element tensors. Program (a, b)
    handles row blocks a, a + row_split, ... against the b-th contiguous chunk of column blocks:
    an online (running-max) logsumexp per row over its chunk, written as partial (b, i); for each
    tile, the column logsumexp merged into partial (a, j). Outputs are base-2 logsumexps of
    S * log2(e); the caller combines the partials.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    row_split = tl.num_programs(0)
    scale2, bias2 = base2_affine(scale_ptr, bias_ptr, HAS_BIAS)

    cb_start, cb_end = column_chunk(n_y, BN)

    for rb in range(pid_r, tl.cdiv(n_x, BM), row_split):
        rows = (rb * BM + tl.arange(0, BM)).to(tl.int64)
        row_ok = rows < n_x
        x_rows = x_ptr + rows * stride_x
        # The bias, and -inf on padding rows so that they drop out of the column statistics.
        row_shift = tl.where(row_ok, bias2, float("-inf"))
        row_max = tl.full((BM,), float("-inf"), tl.float32)  # running max of each row
        row_sum = tl.zeros((BM,), tl.float32)  # running sum of 2^(S - row_max)
        for cb in range(cb_start, cb_end):
            cols = (cb * BN + tl.arange(0, BN)).to(tl.int64)
            col_ok = cols < n_y
            s = similarity_tile(
                x_rows, y_ptr + cols * stride_y, row_ok, col_ok, D, stride_xd, stride_yd, BK,
                DOT_PRECISION,
            )  # fmt: skip
            col_pad = tl.where(col_ok, 0.0, float("-inf"))
            s = s * scale2 + row_shift[:, None] + col_pad[None, :]  # (BM, BN), base 2

            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            row_sum = row_sum * tl.exp2(row_max - new_max)
            row_sum += tl.sum(tl.exp2(s - new_max[:, None]), axis=1)
            row_max = new_max

            if COL_STATS:
                c_max = tl.max(s, axis=0)
                c_lse = c_max + tl.log2(tl.sum(tl.exp2(s - c_max[None, :]), axis=0))
                c_ptrs = col_lse_ptr + pid_r.to(tl.int64) * n_y + cols
                if rb == pid_r:  # this program's first row block starts the partial afresh
                    old = tl.full((BN,), float("-inf"), tl.float32)
                else:
                    old = tl.load(c_ptrs, mask=col_ok, other=float("-inf"))
                tl.store(c_ptrs, _logaddexp2(old, c_lse), mask=col_ok)
                tl.debug_barrier()  # the next row block re-reads these partials

        row_lse = row_max + tl.log2(row_sum)
        tl.store(row_lse_ptr + pid_c.to(tl.int64) * n_x + rows, row_lse, mask=row_ok)


@triton.jit
def _backward_kernel(
    # pointers
    a_ptr,
    b_ptr,
    scale_ptr,
    bias_ptr,
    lse_a_ptr,
    w_a_ptr,  # (n_a,) logsumexp and weight of the softmax over each row of S
    lse_b_ptr,
    w_b_ptr,  # (n_b,) logsumexp and weight of the softmax over each column of S
    acc_ptr,  # (col_split, n_a, D) fp32 workspace: (G b) partials, written
    # sizes
    n_a,
    n_b,
    D,
    n_bucket,  # autotune key only
    # strides
    stride_a,
    stride_ad,
    stride_b,
    stride_bd,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    ROW_TERM: tl.constexpr,
    COL_TERM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    """Accumulate (P b) for a block of rows of a over a chunk of b: 2 matmul passes of n_a n_b D.

    S_ij = s <a_i, b_j> + b is recomputed tile by tile and turned into the softmax part of the
    module docstring's G, P_ij = wa_i exp(S_ij - ra_i) + wb_j exp(S_ij - cb_j) (ROW_TERM and
    COL_TERM select the terms); the program's private workspace slice collects P_ij b_j over its
    chunk. The positive pairs' -d_ij terms touch one row of b per row of a, so they are left to
    ``_finalize_kernel``. Called with (x, y) for dL/dx and with (y, x) for dL/dy.
    """
    rb = tl.program_id(0)
    pid_c = tl.program_id(1)
    scale2, bias2 = base2_affine(scale_ptr, bias_ptr, HAS_BIAS)

    rows = (rb * BM + tl.arange(0, BM)).to(tl.int64)
    row_ok = rows < n_a
    a_rows = a_ptr + rows * stride_a
    w_a = tl.zeros((BM,), tl.float32)
    if ROW_TERM:
        lse_a = tl.load(lse_a_ptr + rows, mask=row_ok, other=float("inf")) * LOG2E
        w_a = tl.load(w_a_ptr + rows, mask=row_ok, other=0.0)
    acc_blk = acc_ptr + (pid_c.to(tl.int64) * n_a + rb * BM) * D  # this program's workspace

    cb_start, cb_end = column_chunk(n_b, BN)
    if cb_start >= cb_end:
        clear_rows(acc_blk, row_ok, D, BM, BD)
    for cb in range(cb_start, cb_end):
        cols = (cb * BN + tl.arange(0, BN)).to(tl.int64)
        col_ok = cols < n_b
        b_rows = b_ptr + cols * stride_b
        s = similarity_tile(a_rows, b_rows, row_ok, col_ok, D, stride_ad, stride_bd, BK,
                             DOT_PRECISION)  # fmt: skip
        # -inf on padding columns: their weights must be exactly 0 (a finite S there could
        # still overflow exp). Padding rows have zero weights or are never stored.
        s = s * scale2 + tl.where(col_ok, bias2, float("-inf"))[None, :]
        g = tl.zeros((BM, BN), tl.float32)
        w_b = tl.zeros((BN,), tl.float32)
        if ROW_TERM:
            g += w_a[:, None] * tl.exp2(s - lse_a[:, None])
        if COL_TERM:
            lse_b = tl.load(lse_b_ptr + cols, mask=col_ok, other=float("inf")) * LOG2E
            w_b = tl.load(w_b_ptr + cols, mask=col_ok, other=0.0)
            g += w_b[None, :] * tl.exp2(s - lse_b[None, :])
        accumulate_tile(g, b_ptr, cb, col_ok, acc_blk, row_ok, D, stride_b, stride_bd,
                        cb == cb_start, BM, BN, BD, DOT_PRECISION)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


_FORWARD_CONFIGS = configs(
    ("BM", "BN", "BK"),
    [  # (BM, BN, BK, warps, stages)
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 4, 3),
        (64, 128, 64, 4, 3),
        (64, 64, 64, 4, 4),
        (128, 256, 32, 8, 3),
        (64, 64, 32, 4, 2),
    ],
)
_BACKWARD_CONFIGS = configs(
    ("BM", "BN", "BK", "BD"),
    [  # (BM, BN, BK, BD, warps, stages)
        (64, 128, 64, 128, 8, 3),
        (64, 256, 64, 128, 8, 2),
        (128, 64, 64, 128, 8, 3),
        (128, 128, 64, 32, 8, 3),
        (128, 128, 32, 32, 8, 3),
        (64, 128, 64, 64, 8, 3),
        (128, 64, 64, 64, 8, 3),
        (64, 64, 64, 64, 4, 3),
        (64, 64, 32, 64, 4, 2),
    ],
)
_KEY = ["D", "n_bucket", "HAS_BIAS", "DOT_PRECISION"]
_forward_tuned = triton.autotune(
    _FORWARD_CONFIGS,
    key=_KEY + ["COL_STATS"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_forward_kernel)
_backward_tuned = triton.autotune(
    _BACKWARD_CONFIGS,
    key=_KEY + ["ROW_TERM", "COL_TERM"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_backward_kernel)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def contrastive_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    offset: int,
    both_directions: bool,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Statistics of S = scale * x @ y.T + bias, computed without materializing S.

    Args:
        x: (n_x, D) and y: (n_y, D), same dtype (fp32/fp16/bf16) and device; any strides.
        scale, bias: one-element tensors on the same device (bias may be None).
        offset: row i's positive is column i + offset; needs n_x + offset <= n_y.
        both_directions: also compute the column logsumexps.
        config: fixed tiles and splits; None autotunes (fixed small tiles under the interpreter).

    Returns:
        row_lse (n_x,), col_lse (n_y,) or None, positive logits S_i,i+off (n_x,); all fp32.
    """
    n_x, D = x.shape
    n_y = y.shape[0]
    target = target_programs(x.device)
    row_blocks, col_blocks = triton.cdiv(n_x, MIN_BLOCK), triton.cdiv(n_y, MIN_BLOCK)
    row_split = min(row_blocks, MAX_ROW_SPLIT) if both_directions else row_blocks
    col_split = min(col_blocks, max(1, triton.cdiv(target, row_split)))
    if config is not None:
        row_split = config.row_split or row_split
        col_split = config.col_split or col_split

    kw = {"device": x.device, "dtype": torch.float32}
    row_part = torch.full((col_split, n_x), float("-inf"), **kw)
    col_part = torch.full((row_split, n_y), float("-inf"), **kw) if both_directions else None
    # fmt: off
    args = (
        x, y, scale, scale if bias is None else bias, row_part,
        row_part if col_part is None else col_part,
        n_x, n_y, D, bucket(max(n_x, n_y)),
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
    )
    # fmt: on
    meta = {
        "HAS_BIAS": bias is not None,
        "COL_STATS": both_directions,
        "DOT_PRECISION": dot_precision(x.dtype),
    }
    blocks = {"BM": "block_m", "BN": "block_n", "BK": "block_k"}
    grid = lambda meta: (row_split, col_split)  # noqa: E731
    launch(_forward_kernel, _forward_tuned, grid, config, args, meta, blocks)

    positives = positive_logits(x, y, offset, scale, bias)
    row_lse = torch.logsumexp(row_part * LN2, dim=0)
    col_lse = torch.logsumexp(col_part * LN2, dim=0) if col_part is not None else None
    return row_lse, col_lse, positives


def _grad_rows(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    lse_a: torch.Tensor | None,
    w_a: torch.Tensor | None,
    lse_b: torch.Tensor | None,
    w_b: torch.Tensor | None,
    offset: int,
    config: TileConfig | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient s G b of every row of a and the per-row terms of dL/ds.

    a's row i is paired with b's row i + offset; (lse_a, w_a) is the softmax over a's rows
    (both None: not in the loss), (lse_b, w_b) the one over b's rows.
    """
    n_a, D = a.shape
    n_b = b.shape[0]
    grad = torch.empty((n_a, D), dtype=a.dtype, device=a.device)
    dscale = torch.empty(n_a, dtype=torch.float32, device=a.device)
    col_split, slice_rows, workspace = plan_workspace(n_a, n_b, D, a.device, config)
    meta = {
        "HAS_BIAS": bias is not None,
        "ROW_TERM": lse_a is not None,
        "COL_TERM": lse_b is not None,
        "DOT_PRECISION": dot_precision(a.dtype),
    }
    blocks = {"BM": "block_m", "BN": "block_n", "BK": "block_k", "BD": "block_d"}
    for start in range(0, n_a, slice_rows):
        rows = slice(start, min(start + slice_rows, n_a))
        n_rows = rows.stop - start
        lse_rows = lse_a[rows] if lse_a is not None else a  # a: placeholder, never read
        w_rows = w_a[rows] if w_a is not None else None
        # fmt: off
        args = (
            a[rows], b, scale, scale if bias is None else bias,
            lse_rows, a if w_rows is None else w_rows, a if lse_b is None else lse_b,
            a if w_b is None else w_b, workspace, n_rows, n_b, D, bucket(max(n_a, n_b)),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        )
        # fmt: on
        grid = lambda meta, n=n_rows: (triton.cdiv(n, meta["BM"]), col_split)  # noqa: E731
        launch(_backward_kernel, _backward_tuned, grid, config, args, meta, blocks)
        finalize(workspace, col_split, a[rows], b, scale, w_rows, w_b, offset + start,
                 grad[rows], dscale[rows])  # fmt: skip
    return grad, dscale


def contrastive_backward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor | None,
    w_x: torch.Tensor,
    w_y: torch.Tensor | None,
    offset: int,
    need_dx: bool,
    need_dy: bool,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Gradients of L (module docstring) by recomputation from the saved logsumexps.

    Args:
        x, y, scale, bias, offset: as in ``contrastive_forward``.
        row_lse (n_x,), col_lse (n_y,) or None: its outputs (None: one direction only).
        w_x (n_x,), w_y (n_y,) or None: fp32 loss weights, already multiplied by dL_out.
        need_dx, need_dy: which feature gradients to produce. dL/ds comes with either launch.

    Returns:
        dx (n_x, D) in x's dtype or None, dy (n_y, D) in y's dtype or None, dscale (0-dim fp32).
    """
    dx = dy = dscale = None
    if need_dx or not need_dy:
        dx, dscale = _grad_rows(x, y, scale, bias, row_lse, w_x, col_lse, w_y, offset, config)
    if need_dy:
        dy, dscale_y = _grad_rows(y, x, scale, bias, col_lse, w_y, row_lse, w_x, -offset, config)
        dscale = dscale if dscale is not None else dscale_y
    return (dx if need_dx else None), dy, dscale.sum()
