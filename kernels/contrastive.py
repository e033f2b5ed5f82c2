"""Fused InfoNCE (CLIP) contrastive loss: Triton forward and backward, no N x N buffer.

Math. Row i of ``x`` (n_x, D) and row j of ``y`` (n_y, D) score

    S_ij = s * <x_i, y_j> + b                           (s: logit scale, b: logit bias)

and row i's positive partner is column i + offset (offset >= 0, n_x + offset <= n_y). Each row
is summarized relative to its own positive, never by a difference of two large numbers:

    m_i = log sum_{j != i+off} exp(S_ij - S_i,i+off)    (the other logits, relative)

so row i's cross-entropy is log(1 + e^m_i) = softplus(m_i) >= 0, exact however confident the
row is (m_i -> -inf as p_ii -> 1). Column j has m'_j, the same over its column with its
positive row j - off (columns without one use 0 as their reference; their weight is 0). With
loss weights wx_i and wy_j (both_directions=True: 1/(2 n_x) on the rows and on the n_x columns
that hold a positive; False: 1/n_x on the rows, wy = 0),

    L = sum_i wx_i softplus(m_i) + sum_j wy_j softplus(m'_j).

Its gradient with respect to S, with p_ij = exp(S_ij - S_i,i+off - softplus(m_i)) the softmax
of row i and q_ij that of column j, is

    G_ij = wx_i p_ij + wy_j q_ij                           for j != i + off,
    G_ij = -(wx_i sigmoid(m_i) + wy_j sigmoid(m'_j))        for the positive pair,

because 1 - p_ii = sum_{j != i} p_ij = sigmoid(m_i) exactly. G is formed in fp32 with the
positive's term folded in before any rounding, so a confident row keeps its gradient. Its
entries, in units of the loss weights, are at most 2; in fp16 they meet the tensor cores times
``launch.FP16_G_SCALE`` (folded into the weights), so that a confident row's (1e-8 and less)
stay normal fp16 numbers under any loss scale; the products divide it out in fp32, exactly. No
byte or pass more: the alternatives cost more (per-row and per-column power-of-two scales: a
second G per block, 2 R C bytes more; fp32 G for fp16: twice the G bytes and products off the
fp16 tensor cores). Then
dL/dx = s G y, dL/dy = s G^T x, dL/ds = sum_ij G_ij <x_i, y_j>, and dL/db = 0 exactly (each
softmax sums to one: the bias cancels, and the kernels never load it).

Design and cost, in matmul passes of n_x * n_y * D multiply-adds (the floor is 4: S in the
forward, S again, G y and G^T x in the backward):

- forward, 1 pass (``_forward_kernel``). The positive dots come first (O(N D)). A 2-D grid:
  program (a, b) walks row blocks a, a + row_split, ... against the column blocks of chunk b,
  keeps each row's running max and sum of 2^(logit - max) in registers (the online log-sum-exp,
  the positive masked out) and writes one partial m per column chunk; for the other direction
  it merges each tile's column log-sum-exp into a partial m' owned by its row chunk. The
  partials, O((row_split + col_split) N) floats, are combined afterwards. Per BM x BN tile:
  2 BM BN D FLOPs for (BM + BN) D operand elements read.
- backward, bounded blocks (``method="blocks"``, 3 passes): for each block of R rows x C
  columns, ``_gradient_block_kernel`` recomputes S (1 pass) and writes G in the features'
  dtype to a bounded buffer with its share of dL/ds; cuBLAS then adds G y and G^T x into fp32
  accumulators (2 passes at GEMM speed). A variant lets cuBLAS compute the block's dots in fp32
  and the kernel read them (``method="blocks-mm"``). Per tile: (BM + BN) D operand elements read (or
  BM BN fp32 dots) and BM BN elements of G written.
- backward, fused (2 + 2 passes): row sweeps with fp32 workspaces, in ``fused.py``.

Inputs in fp32, fp16 or bf16; all arithmetic in fp32; fp32 products use TF32 only when torch
allows TF32 matmuls. Exponentials are taken in base 2 with log2(e) folded into the scale. Row
offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import persistent
from .jit import (
    LOG2E,
    NEG,
    RANGE,
    block_tile,
    column_chunk,
    column_reference,
    logaddexp2,
    one_exp_statistics,
    operand,
    pairs_of,
    store_tile,
    tile_dots,
    two_exp_statistics,
)
from .launch import (
    MIN_BLOCK,
    TileConfig,
    bucket,
    configs,
    dot_precision,
    g_storage_scale,
    launch,
    persistent_programs,
    prune_configs,
    target_programs,
    tma,
    tma_usable,
)
from .sweeps import (
    combine,
    positive_dots,
    side_stats,
    sweep_blocks,
)

# The bounded-block designs, as ``contrastive_forward``'s and ``contrastive_backward``'s
# ``method`` takes them: "persistent" runs the sweeps of ``persistent.py`` where TMA can read the
# features (the fused backward is ``fused.contrastive_backward``).
METHODS = ("blocks", "blocks-mm", "persistent")
# Forward programs along rows; each owns a partial column log-sum-exp of length n_y.
MAX_ROW_SPLIT = 16

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    # pointers
    x_ptr,
    y_ptr,
    scale_ptr,
    x_ref_ptr,  # (n_x,) fp32: row i's positive dot, the reference of its logits
    row_part_ptr,  # (col_split, n_x) partial base-2 m per column chunk, written
    col_part_ptr,  # (row_split, n_y) partial base-2 m' per row chunk, read-modify-written
    # sizes
    n_x,
    n_y,
    D,
    offset,
    n_bucket,  # autotune key only
    # strides
    stride_x,
    stride_xd,
    stride_y,
    stride_yd,
    # meta-parameters
    COL_STATS: tl.constexpr,
    ONE_EXP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Row (and column) statistics m of S = s x y^T: 1 matmul pass of n_x n_y D.

    Program (a, b) handles row blocks a, a + row_split, ... against the b-th chunk of column
    blocks: the online log-sum-exp over its chunk of each row's logits minus its positive's
    (positive masked out), written as partial (b, i); with COL_STATS, each tile's column
    log-sum-exp merged into partial (a, j). Outputs are in base 2; the caller combines them.

    Two exponentials per element, one for the rows' sums and one for the columns': each is
    relative to its own maximum, which keeps every logit's precision. ONE_EXP (16-bit inputs,
    whose G is rounded far more coarsely anyway) takes one, 2^(S - T) with T the tile's largest
    logit, and reads both directions' sums off it, wherever the tile passes a range guard:
    every row's and column's largest logit within RANGE of T, so that none of the terms that
    matter falls below fp32's normal range. A tile that fails it takes the two exponentials.
    Per tile: (BM + BN) D operand elements read, BN column partials read and written.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    row_split = tl.num_programs(0)
    scale2 = tl.load(scale_ptr).to(tl.float32) * LOG2E
    cb_start, cb_end = column_chunk(n_y, BN)
    x = operand(x_ptr, n_x, D, stride_x, BM, BK, TMA)
    y = operand(y_ptr, n_y, D, stride_y, BN, BK, TMA)

    for rb in range(pid_r, tl.cdiv(n_x, BM), row_split):
        rows = rb * BM + tl.arange(0, BM)
        row_ok = rows < n_x
        x_ref = tl.load(x_ref_ptr + rows, mask=row_ok, other=0.0)
        row_max = tl.full((BM,), NEG, tl.float32)  # running max of each row
        row_sum = tl.zeros((BM,), tl.float32)  # running sum of 2^(u - row_max)
        for cb in range(cb_start, cb_end):
            cols = cb * BN + tl.arange(0, BN)
            col_ok = cols < n_y
            dots = tile_dots(x, y, rb * BM, cb * BN, D, stride_a=stride_x, stride_ad=stride_xd,
                             stride_b=stride_y, stride_bd=stride_yd, row_ok=row_ok, col_ok=col_ok,
                             BK=BK, DOT_PRECISION=DOT_PRECISION, TMA=TMA)  # fmt: skip
            pairs = pairs_of(rows, cols, offset)
            y_ref = column_reference(x_ref_ptr, cols, col_ok, n_x, offset)
            if ONE_EXP:
                t = tl.where(pairs | ~(row_ok[:, None] & col_ok[None, :]), float("-inf"),
                             dots * scale2)  # fmt: skip
                t_row = tl.max(t, axis=1)
                t_col = tl.max(t, axis=0)
                top = tl.max(t_row)
                low = tl.minimum(tl.min(tl.where(t_row > NEG, t_row, top)),
                                 tl.min(tl.where(t_col > NEG, t_col, top)))  # fmt: skip
                if top - low <= RANGE:
                    row_max, row_sum, c_lse = one_exp_statistics(
                        t, top, x_ref, y_ref, scale2, row_max, row_sum
                    )
                else:
                    row_max, row_sum, c_lse = two_exp_statistics(
                        dots, pairs, row_ok, col_ok, x_ref, y_ref, scale2, row_max, row_sum,
                        COL_STATS,
                    )  # fmt: skip
            else:
                row_max, row_sum, c_lse = two_exp_statistics(
                    dots, pairs, row_ok, col_ok, x_ref, y_ref, scale2, row_max, row_sum, COL_STATS
                )
            if COL_STATS:
                c_ptrs = col_part_ptr + pid_r.to(tl.int64) * n_y + cols
                if rb == pid_r:  # this program's first row block starts the partial afresh
                    old = tl.full((BN,), float("-inf"), tl.float32)
                else:
                    old = tl.load(c_ptrs, mask=col_ok, other=float("-inf"))
                tl.store(c_ptrs, logaddexp2(old, c_lse), mask=col_ok)
        if COL_STATS:
            tl.debug_barrier()  # the next row block re-reads these partials

        row_m = row_max + tl.log2(row_sum)  # -inf for a row without other logits
        tl.store(row_part_ptr + pid_c.to(tl.int64) * n_x + rows, row_m, mask=row_ok)


@triton.jit
def softmax_gradient(dots, rows, cols, offset, scale2, a_stats_ptr, n_a, b_stats_ptr, n_b,
                      A_TERM: tl.constexpr, B_TERM: tl.constexpr):  # fmt: skip
    """G for a tile of dots (BM, BN) between a's rows ``rows`` (BM,) and b's rows ``cols``
    (BN,), int32 indices, in fp32 (module docstring); a's row i pairs with b's row i + offset.

    ``a_stats`` (4, n_a) are the statistics of the softmax over each row of a (its positive's
    dot, softplus(m) in base 2, the weight w, and w sigmoid(m)); ``b_stats`` (4, n_b) those of
    the softmax over each row of b. A_TERM and B_TERM select the softmaxes in the loss. Zero
    outside the tile's valid rows and columns.
    """
    row_ok = rows < n_a
    col_ok = cols < n_b
    partner = rows + offset
    g = tl.zeros(dots.shape, tl.float32)
    at_pair = tl.zeros(rows.shape, tl.float32)  # the pair's -G of each row, if in the tile
    if A_TERM:
        ref = tl.load(a_stats_ptr + rows, mask=row_ok, other=0.0)
        shift = tl.load(a_stats_ptr + n_a + rows, mask=row_ok, other=0.0)
        w = tl.load(a_stats_ptr + 2 * n_a + rows, mask=row_ok, other=0.0)
        g += w[:, None] * tl.exp2((dots - ref[:, None]) * scale2 - shift[:, None])
        at_pair += tl.load(a_stats_ptr + 3 * n_a + rows, mask=row_ok, other=0.0)
    if B_TERM:
        ref = tl.load(b_stats_ptr + cols, mask=col_ok, other=0.0)
        shift = tl.load(b_stats_ptr + n_b + cols, mask=col_ok, other=0.0)
        w = tl.load(b_stats_ptr + 2 * n_b + cols, mask=col_ok, other=0.0)
        g += w[None, :] * tl.exp2((dots - ref[None, :]) * scale2 - shift[None, :])
        # The pair's column term, loaded once per row at its partner rather than per column.
        pair_ok = (partner >= 0) & (partner < n_b)
        at_pair += tl.load(b_stats_ptr + 3 * n_b + partner, mask=pair_ok, other=0.0)
    # Padding rows and columns: their dots are 0, so 2^(...) there could overflow.
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
    return tl.where(pairs_of(rows, cols, offset), -at_pair[:, None], g)


@triton.jit
def _gradient_block_kernel(
    # pointers
    a_ptr,  # (n_a, D) the block's rows of x
    b_ptr,  # (n_b, D) the block's rows of y
    dots_ptr,  # (n_a, n_b) fp32 dots computed by a GEMM (DOTS_GIVEN), or unused
    scale_ptr,
    a_stats_ptr,  # (4, n_a) row softmax statistics (see softmax_gradient)
    b_stats_ptr,  # (4, n_b) column softmax statistics (B_TERM)
    g_ptr,  # (n_a, n_b) G, written in g's dtype
    sums_ptr,  # (1, programs) fp32 partial sums of G_ij <a_i, b_j>, written
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
    stride_dots,
    stride_g,
    # meta-parameters
    B_TERM: tl.constexpr,
    DOTS_GIVEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """One BM x BN tile of a block's G (module docstring): 1 matmul pass of n_a n_b D over the
    grid (none with DOTS_GIVEN, where the dots come from cuBLAS), plus BM BN elements of G
    written and one partial of dL/ds."""
    rows, cols, tile_ok, dots = block_tile(
        a_ptr, b_ptr, dots_ptr, n_a, n_b, D,
        stride_a=stride_a, stride_ad=stride_ad, stride_b=stride_b, stride_bd=stride_bd,
        stride_dots=stride_dots, DOTS_GIVEN=DOTS_GIVEN, DOT_PRECISION=DOT_PRECISION,
        BM=BM, BN=BN, BK=BK, TMA=TMA,
    )  # fmt: skip
    scale2 = tl.load(scale_ptr).to(tl.float32) * LOG2E
    g = softmax_gradient(dots, rows, cols, offset, scale2, a_stats_ptr, n_a, b_stats_ptr, n_b,
                         A_TERM=True, B_TERM=B_TERM)  # fmt: skip
    store_tile(g_ptr, g, stride_g, tile_ok, BM, BN)
    tl.store(sums_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(g * dots))


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


_FORWARD_CONFIGS = configs(
    ("BM", "BN", "BK"),
    [  # (BM, BN, BK, warps, stages, CTAs per SM)
        (128, 128, 64, 8, 3, 1),
        (128, 128, 32, 8, 4, 1),
        (64, 128, 32, 4, 4, 2),
        (128, 64, 64, 4, 3, 2),
        (64, 64, 64, 4, 4, 2),
        (64, 64, 32, 4, 2, 2),
    ],
)
_BLOCK_CONFIGS = configs(
    ("BM", "BN", "BK"),
    [  # (BM, BN, BK, warps, stages, CTAs per SM)
        (128, 128, 64, 8, 3, 1),
        (64, 256, 64, 8, 3, 1),
        (64, 128, 64, 4, 3, 2),
        (128, 64, 64, 8, 3, 2),
        (64, 64, 64, 4, 3, 2),
    ],
)
_KEY = ["D", "n_bucket", "DOT_PRECISION"]
_forward_tuned = triton.autotune(
    _FORWARD_CONFIGS,
    key=_KEY + ["COL_STATS", "ONE_EXP"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_forward_kernel)
_block_tuned = triton.autotune(
    _BLOCK_CONFIGS,
    key=_KEY + ["B_TERM", "DOTS_GIVEN"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_gradient_block_kernel)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def contrastive_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    offset: int,
    both_directions: bool,
    *,
    method: str = "blocks",
    config: TileConfig | None = None,
) -> Stats:
    """Statistics of S = scale * x @ y.T, computed without materializing S.

    Args:
        x: (n_x, D) and y: (n_y, D), same dtype (fp32/fp16/bf16) and device; any strides.
        scale: a one-element tensor on the same device.
        offset: row i's positive is column i + offset; needs n_x + offset <= n_y.
        both_directions: also compute the column statistics.
        method: "persistent" (where ``launch.tma_usable``): ``persistent._forward_kernel``, one
            wave of ``launch.persistent_programs``, row_split of them along the rows and the rest
            along the columns; otherwise ``_forward_kernel``.
        config: fixed tiles and splits; None autotunes (fixed small tiles under the interpreter).

    Returns:
        (pdot, m, m'): the positive pairs' dots <x_i, y_i+off> (n_x,), the rows' m (n_x,) and
        the columns' m' (n_y,) or None (module docstring); all fp32.
    """
    n_x, D = x.shape
    n_y = y.shape[0]
    pdot = positive_dots(x, y, offset)
    one_wave = method == "persistent" and tma_usable(x, y)
    if one_wave:
        programs = persistent_programs(x.device, config)
        row_split = min(programs, MAX_ROW_SPLIT) if both_directions else programs
        col_split = max(1, programs // row_split)
    else:
        row_blocks, col_blocks = triton.cdiv(n_x, MIN_BLOCK), triton.cdiv(n_y, MIN_BLOCK)
        row_split = min(row_blocks, MAX_ROW_SPLIT) if both_directions else row_blocks
        col_split = min(col_blocks, max(1, triton.cdiv(target_programs(x.device), row_split)))
    if config is not None:
        row_split = config.row_split or row_split
        col_split = config.col_split or col_split

    kw = {"device": x.device, "dtype": torch.float32}
    row_part = torch.full((col_split, n_x), float("-inf"), **kw)
    col_part = torch.full((row_split, n_y), float("-inf"), **kw) if both_directions else None
    args = dict(
        x_ptr=x,
        y_ptr=y,
        scale_ptr=scale,
        x_ref_ptr=pdot,
        row_part_ptr=row_part,
        col_part_ptr=col_part,
        n_x=n_x,
        n_y=n_y,
        D=D,
        offset=offset,
        n_bucket=bucket(max(n_x, n_y)),
        stride_x=x.stride(0),
        stride_xd=x.stride(1),
        stride_y=y.stride(0),
        stride_yd=y.stride(1),
        COL_STATS=both_directions,
        ONE_EXP=both_directions and x.dtype != torch.float32,
        DOT_PRECISION=dot_precision(x.dtype),
    )
    grid = lambda meta: (row_split, col_split)  # noqa: E731
    if one_wave:  # its operands always through TMA
        launch(persistent._forward_kernel, persistent._forward_tuned, grid, config, args)
    else:
        launch(_forward_kernel, _forward_tuned, grid, config, {**args, "TMA": tma(x, y)})
    return pdot, combine(row_part), None if col_part is None else combine(col_part)


def softmax_sides(stats: Stats, w_x, w_y, n_y: int, offset: int, g_scale: float):
    """Both softmaxes' (4, n) statistics for the gradient kernels (``softmax_gradient``), one
    launch each (``sweeps.side_stats``): the reference dot, softplus(m) in base 2, the weight
    times ``g_scale`` (G is formed in those units, ``launch.FP16_G_SCALE``), and that times
    1 - p_pair = sigmoid(m)."""
    pdot, row, col = stats
    x_side = side_stats(pdot, row, w_x, g_scale)
    y_side = None if col is None else side_stats(pdot, col, w_y, g_scale, offset=offset)
    return x_side, y_side


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
    method: str = "blocks",
    block_bytes: int | None = None,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Gradients of L by bounded blocks (module docstring): G from ``_gradient_block_kernel``,
    the products from cuBLAS.

    Args:
        x, y, scale, offset: as in ``contrastive_forward``; stats: its outputs.
        w_x (n_x,), w_y (n_y,) or None: fp32 relative loss weights, O(1) (1 on the rows and on
            the columns that hold a positive), and weight: the 0-dim fp32 factor they share
            (dL_out / (2 n_x) for CLIP's loss). G is formed with the relative weights, so that
            its entries are O(1) whatever dL_out is (in fp16, times ``FP16_G_SCALE``, so that a
            confident row's stay normal numbers), and the products are scaled by weight.
        need_dx, need_dy: which feature gradients to produce. dL/ds comes with either.
        method: "blocks" (G from ``_gradient_block_kernel``, the products from cuBLAS),
            "blocks-mm" (the same, the dots from cuBLAS too) or "persistent" (G from
            ``persistent._gradient_kernel`` where ``launch.tma_usable``, else as "blocks").
        block_bytes: bound of the G buffer in bytes (``blocks.default_block_bytes`` when None).
        config: fixed tiles and splits; None autotunes (fixed small tiles under the interpreter).

    Returns:
        dx (n_x, D) in x's dtype or None, dy (n_y, D) in y's dtype or None, dscale (0-dim fp32).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    g_scale = g_storage_scale(x.dtype)  # G meets the tensor cores in x's dtype
    x_side, y_side = softmax_sides(stats, w_x, w_y, y.shape[0], offset, g_scale)
    weight = weight / g_scale

    def args_of(r0: int, r1: int, c0: int, c1: int) -> dict:
        return dict(
            a_stats_ptr=x_side[:, r0:r1].contiguous(),
            b_stats_ptr=None if y_side is None else y_side[:, c0:c1].contiguous(),
            offset=offset + r0 - c0,
            B_TERM=y_side is not None,
        )

    one_wave = method == "persistent" and tma_usable(x, y)
    kernel, tuned = (_gradient_block_kernel, _block_tuned)
    if one_wave:
        kernel, tuned = (persistent._gradient_kernel, persistent._gradient_tuned)
    dx, dy, sums = sweep_blocks(
        kernel,
        tuned,
        x,
        y,
        scale,
        scale * weight,
        config,
        args_of,
        n_sums=1,
        need_dx=need_dx,
        need_dy=need_dy,
        dots_by_gemm=method == "blocks-mm",
        block_bytes=block_bytes,
        persistent=one_wave,
    )
    return dx, dy, sums[0] * weight
