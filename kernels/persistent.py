"""Persistent sweeps of both losses for Hopper-class GPUs: one wave of CTAs, one flattened loop.

The "persistent" implementation of InfoNCE and SigLIP (SigLIP's G kernel: persistent_siglip.py).
Same math and the same passes as the bounded blocks (``contrastive.py``, ``siglip.py``: InfoNCE
1 pass forward, S again and the two products backward; SigLIP S and the two products), with the
Triton sweeps rebuilt for Hopper:

- one wave: ``launch.persistent_programs`` CTAs, 2 per SM (configs sized for 2 CTAs per SM,
  so that one CTA's exponential epilogue overlaps the other's wgmma; ``tl.range``'s
  warp_specialize compiles to the same code for sm_90 under Triton 3.6 and 3.9, so warp
  specialization is not the means here), each walking a schedule of (row panel, column
  tile) pairs in ``tl.range(..., flatten=True)`` loops: the software pipeline streams the next
  tile's operands while the current tile's epilogue runs. The G kernels' loop is one for all
  their tiles; the forward's drains once per row panel, where a barrier orders the column
  partials' read-modify-writes;
- operands read through TMA descriptors and G stored through one. The design is TMA's:
  features TMA cannot read (fp32, or rows not 16-byte aligned) run the bounded blocks' kernels
  ("blocks"). There are no pointer-load variants: Triton 3.6 cannot compile the G kernels'
  flattened loops with them ("PassManager::run failed"), and under 3.9 they spill;
- a lean epilogue. InfoNCE's G takes one exp2 per element: with r_i, c_j the rows' and
  columns' base-2 log-normalizers and T = min(max_i r_i, max_j c_j) the tile's reference,

      G_ij = 2^(t_ij - T) (w_i 2^(T - r_i) + w'_j 2^(T - c_j)),    t_ij = s log2(e) <x_i, y_j>,

  exact wherever every r_i and every c_j of the tile lies within ``jit.RANGE`` of its largest
  (t_ij <= min(r_i, c_j) <= T, so no term overflows, and every term of at least 2^-62 of its
  softmax stays a normal fp32 number); a tile outside the range takes the two exponentials.
  SigLIP's G and loss term take one exp2 and no other special-function operation: their
  reciprocals come from Newton steps on the FMA units (``jit.reciprocal_unit``). Positive pairs are
  masked only on tiles that hold one, padding only on edge tiles.

Row panels are re-read (through TMA, from L2) for every column tile: Triton cannot hold a tile
in shared memory across loop iterations (a tensor carried through a loop lives in registers: a
64 x 512 bf16 panel would take 256 a thread at 4 warps), which Gluon's explicit shared memory
could. The schedule walks the panels in order, so each is read from HBM once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .jit import (
    LOG2E,
    NEG,
    RANGE,
    column_reference,
    dead_of,
    halves,
    holds_pairs,
    logaddexp2,
    one_exp_statistics,
    operand,
    pairs_of,
    persistent_tile,
    store_g,
    tile_dots,
    two_exp_statistics,
)
from .launch import configs, prune_configs

# ----------------------------------------------------------------------------------------------
# InfoNCE: the forward's statistics
# ----------------------------------------------------------------------------------------------


@triton.jit
def _forward_half(dots, rows, col0, row_ok, row0, x_ref, x_ref_ptr, c_base, fresh, scale2, n_x,
                  n_y, offset, row_max, row_sum, COL_STATS: tl.constexpr, ONE_EXP: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    """``_forward_kernel``'s epilogue for the (BM, BN) dots of columns col0 + arange(BN): the
    rows' running (max, sum) merged and returned; with COL_STATS the columns' log-sum-exps
    merged into their partials at ``c_base`` (started afresh where ``fresh``)."""
    cols = col0 + tl.arange(0, BN)
    col_ok = cols < n_y
    y_ref = column_reference(x_ref_ptr, cols, col_ok, n_x, offset)
    # Pairs and padding are masked only on the tiles that hold them.
    special = holds_pairs(row0, col0, offset, BM, BN) | (row0 + BM > n_x) | (col0 + BN > n_y)
    if ONE_EXP:
        t = dots * scale2
        if special:
            t = tl.where(dead_of(rows, cols, offset, row_ok, col_ok), float("-inf"), t)
        t_row = tl.max(t, axis=1)
        t_col = tl.max(t, axis=0)
        top = tl.max(t_row)
        low = tl.minimum(tl.min(tl.where(t_row > NEG, t_row, top)),
                         tl.min(tl.where(t_col > NEG, t_col, top)))  # fmt: skip
        if top - low <= RANGE:
            row_max, row_sum, c_lse = one_exp_statistics(t, top, x_ref, y_ref, scale2, row_max,
                                                         row_sum)  # fmt: skip
        else:
            dead = dead_of(rows, cols, offset, row_ok, col_ok)
            row_max, row_sum, c_lse = two_exp_statistics(
                dots, dead, row_ok, col_ok, x_ref, y_ref, scale2, row_max, row_sum, COL_STATS
            )
    else:
        dead = dead_of(rows, cols, offset, row_ok, col_ok)
        row_max, row_sum, c_lse = two_exp_statistics(
            dots, dead, row_ok, col_ok, x_ref, y_ref, scale2, row_max, row_sum, COL_STATS
        )
    if COL_STATS:
        if fresh:
            old = tl.full((BN,), float("-inf"), tl.float32)
        else:
            old = tl.load(c_base + cols, mask=col_ok, other=float("-inf"))
        tl.store(c_base + cols, logaddexp2(old, c_lse), mask=col_ok)
    return row_max, row_sum


@triton.jit
def _forward_kernel(
    # pointers
    x_ptr,
    y_ptr,
    scale_ptr,
    x_ref_ptr,  # (n_x,) fp32: row i's positive dot
    row_part_ptr,  # (col_split, n_x) partial base-2 m per column chunk, written
    col_part_ptr,  # (row_split, n_y) partial base-2 m' per row chunk, written
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
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """``contrastive._forward_kernel``'s statistics, 1 matmul pass of n_x n_y D, in one wave.

    Program (a, b) of a (row_split, col_split) grid of one wave walks row panels a,
    a + row_split, ... against column chunk b; within a panel the column and feature loops are
    one flattened, pipelined loop, which drains only at the panel's end, where the barrier
    that orders the column partials' read-modify-writes stands. Each column tile's log-sum-exp
    is merged into partial (a, j) (started afresh on the program's first panel). Every partial is
    written, by the programs without work too, so that autotuning trials leave none stale.
    Per BM x BN tile: (BM + BN) D operand elements read (the row panel from L2 after its first
    tile), BN column partials read and written.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    row_split = tl.num_programs(0)
    scale2 = tl.load(scale_ptr).to(tl.float32) * LOG2E
    tiles_m = tl.cdiv(n_x, BM)
    tiles_n = tl.cdiv(n_y, BN)
    per_chunk = tl.cdiv(tiles_n, tl.num_programs(1))
    cb_start = pid_c * per_chunk
    chunk = tl.maximum(tl.minimum(per_chunk, tiles_n - cb_start), 0)
    panels = tl.cdiv(tl.maximum(tiles_m - pid_r, 0), row_split)
    x = operand(x_ptr, n_x, D, stride_x, BM, BK, TMA=True)
    y = operand(y_ptr, n_y, D, stride_y, BN, BK, TMA=True)
    r_base = row_part_ptr + pid_c.to(tl.int64) * n_x
    c_base = col_part_ptr
    if COL_STATS:
        c_base += pid_r.to(tl.int64) * n_y

    for p in range(0, panels):
        rb = pid_r + p * row_split
        rows = rb * BM + tl.arange(0, BM)
        row_ok = rows < n_x
        x_ref = tl.load(x_ref_ptr + rows, mask=row_ok, other=0.0)
        row_max = tl.full((BM,), NEG, tl.float32)
        row_sum = tl.zeros((BM,), tl.float32)
        for cb in tl.range(cb_start, cb_start + chunk, flatten=True):
            col_ok = cb * BN + tl.arange(0, BN) < n_y
            dots = tile_dots(x, y, rb * BM, cb * BN, D, stride_a=stride_x, stride_ad=stride_xd,
                             stride_b=stride_y, stride_bd=stride_yd, row_ok=row_ok,
                             col_ok=col_ok, BK=BK, DOT_PRECISION=DOT_PRECISION,
                             TMA=True)  # fmt: skip
            # The epilogue in two column halves: half the registers live at once.
            d0, d1 = halves(dots, BM, BN)
            row_max, row_sum = _forward_half(
                d0, rows, cb * BN, row_ok, rb * BM, x_ref, x_ref_ptr, c_base, p == 0, scale2,
                n_x, n_y, offset, row_max, row_sum, COL_STATS, ONE_EXP, BM, BN // 2,
            )  # fmt: skip
            row_max, row_sum = _forward_half(
                d1, rows, cb * BN + BN // 2, row_ok, rb * BM, x_ref, x_ref_ptr, c_base, p == 0,
                scale2, n_x, n_y, offset, row_max, row_sum, COL_STATS, ONE_EXP, BM, BN // 2,
            )  # fmt: skip
        tl.store(r_base + rows, row_max + tl.log2(row_sum), mask=row_ok)
        if COL_STATS:
            tl.debug_barrier()  # the next panel re-reads the column partials
    # Partials of programs without work: the empty sums.
    if chunk == 0:
        for rb in range(pid_r, tiles_m, row_split):
            rows = rb * BM + tl.arange(0, BM)
            tl.store(r_base + rows, tl.full((BM,), float("-inf"), tl.float32), mask=rows < n_x)
    if COL_STATS and panels == 0:
        for cb in range(cb_start, cb_start + chunk):
            cols = cb * BN + tl.arange(0, BN)
            tl.store(c_base + cols, tl.full((BN,), float("-inf"), tl.float32), mask=cols < n_y)


# ----------------------------------------------------------------------------------------------
# The G kernels: one wave over a bounded block's tiles
# ----------------------------------------------------------------------------------------------


@triton.jit
def _g_half(dots, rows, col0, row_ok, row0, scale2, a_stats_ptr, b_stats_ptr, g_ptr, n_a, n_b,
            offset, stride_g, g_dots, B_TERM: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr):  # fmt: skip
    """``_gradient_kernel``'s epilogue for the (BM, BN) dots of columns col0 + arange(BN): G
    stored, its sum of G_ij <a_i, b_j> added to ``g_dots`` (returned)."""
    cols = col0 + tl.arange(0, BN)
    col_ok = cols < n_b
    ref = tl.load(a_stats_ptr + rows, mask=row_ok, other=0.0)
    shift = tl.load(a_stats_ptr + n_a + rows, mask=row_ok, other=0.0)
    w = tl.load(a_stats_ptr + 2 * n_a + rows, mask=row_ok, other=0.0)
    r = ref * scale2 + shift  # the rows' base-2 log-normalizers
    top = tl.max(tl.where(row_ok, r, NEG))
    spread = top - tl.min(tl.where(row_ok, r, -NEG))
    ref_b = tl.zeros((BN,), tl.float32)
    shift_b = tl.zeros((BN,), tl.float32)
    w_b = tl.zeros((BN,), tl.float32)
    if B_TERM:
        ref_b = tl.load(b_stats_ptr + cols, mask=col_ok, other=0.0)
        shift_b = tl.load(b_stats_ptr + n_b + cols, mask=col_ok, other=0.0)
        w_b = tl.load(b_stats_ptr + 2 * n_b + cols, mask=col_ok, other=0.0)
        c = ref_b * scale2 + shift_b
        c_top = tl.max(tl.where(col_ok, c, NEG))
        spread = tl.maximum(spread, c_top - tl.min(tl.where(col_ok, c, -NEG)))
        top = tl.minimum(top, c_top)
    if spread <= RANGE:  # one exponential per element
        # T = top as a dot, d0: exponents as differences of dots, each rounded once.
        d0 = tl.where(scale2 != 0.0, top / scale2, 0.0)
        coef_a = tl.where(row_ok, w * tl.exp2(-((ref - d0) * scale2 + shift)), 0.0)
        coef_b = tl.where(col_ok, w_b * tl.exp2(-((ref_b - d0) * scale2 + shift_b)), 0.0)
        g = tl.exp2((dots - d0) * scale2) * (coef_a[:, None] + coef_b[None, :])
    else:
        g = w[:, None] * tl.exp2((dots - ref[:, None]) * scale2 - shift[:, None])
        if B_TERM:
            g += w_b[None, :] * tl.exp2((dots - ref_b[None, :]) * scale2 - shift_b[None, :])
    edge = (row0 + BM > n_a) | (col0 + BN > n_b)
    if holds_pairs(row0, col0, offset, BM, BN) | edge:
        at_pair = tl.load(a_stats_ptr + 3 * n_a + rows, mask=row_ok, other=0.0)
        if B_TERM:
            partner = rows + offset
            pair_ok = (partner >= 0) & (partner < n_b)
            at_pair += tl.load(b_stats_ptr + 3 * n_b + partner, mask=pair_ok, other=0.0)
        g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
        g = tl.where(pairs_of(rows, cols, offset), -at_pair[:, None], g)
    store_g(g_ptr, g, row0, col0, n_a, n_b, stride_g, BM, BN)
    return g_dots + tl.sum(g * dots, axis=1)


@triton.jit
def _gradient_kernel(
    # pointers
    a_ptr,  # (n_a, D) the block's rows of x
    b_ptr,  # (n_b, D) the block's rows of y
    scale_ptr,
    a_stats_ptr,  # (4, n_a) the rows' softmax statistics (``contrastive.softmax_gradient``)
    b_stats_ptr,  # (4, n_b) the columns' (B_TERM)
    g_ptr,  # (n_a, n_b) G, written in g's dtype
    sums_ptr,  # (programs,) fp32 partial sums of G_ij <a_i, b_j>, written
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
    stride_g,
    # meta-parameters
    B_TERM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """InfoNCE's G for one block (``contrastive``'s module docstring), one exp2 per element
    (module docstring; two on a tile outside the range): 1 matmul pass of n_a n_b D.

    Program p takes tiles p, p + programs, ... in row-major order, so that the wave sweeps
    the row panels together, and writes its partial of dL/ds. r_i = s log2(e) <x_i, y_i+off>
    + softplus(m_i) / ln 2 is row i's base-2 log-normalizer (c_j column j's), so that
    p_ij = 2^(t_ij - r_i); the exponents are formed as differences of dots, (<x_i, y_j> - d0) s
    log2(e) with d0 = T / (s log2(e)), so that each is rounded once, as in the bounded blocks.
    Per BM x BN tile: (BM + BN) D operand elements read, 4 (BM + BN) statistics, BM BN elements
    of G written.
    """
    pid = tl.program_id(0)
    scale2 = tl.load(scale_ptr).to(tl.float32) * LOG2E
    tiles_n = tl.cdiv(n_b, BN)
    a = operand(a_ptr, n_a, D, stride_a, BM, BK, TMA=True)
    b = operand(b_ptr, n_b, D, stride_b, BN, BK, TMA=True)
    g_dots = tl.zeros((BM,), tl.float32)
    for t in tl.range(pid, tl.cdiv(n_a, BM) * tiles_n, tl.num_programs(0), flatten=True):
        row0, col0, rows, row_ok, d0, d1 = persistent_tile(
            a, b, t, tiles_n, n_a, n_b, D, stride_a, stride_ad, stride_b, stride_bd, BM, BN, BK,
            DOT_PRECISION,
        )  # fmt: skip
        g_dots = _g_half(d0, rows, col0, row_ok, row0, scale2, a_stats_ptr, b_stats_ptr, g_ptr,
                         n_a, n_b, offset, stride_g, g_dots, B_TERM, BM, BN // 2)  # fmt: skip
        g_dots = _g_half(d1, rows, col0 + BN // 2, row_ok, row0, scale2, a_stats_ptr,
                         b_stats_ptr, g_ptr, n_a, n_b, offset, stride_g, g_dots, B_TERM, BM,
                         BN // 2)  # fmt: skip
    tl.store(sums_ptr + pid, tl.sum(g_dots))


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# 1 CTA of 8 warps on 128 x 128 tiles (the fewest operand bytes a FLOP), or 2 CTAs per SM of 4
# warps within 255 registers: which hides the epilogue better is the GPU's to measure. 8 warps
# within 128 registers (2 CTAs) spill hundreds of bytes in every one of these kernels under
# Triton 3.6 and 3.9; the epilogues, run in column halves, need none at 128 x 128.
_FORWARD_CONFIGS = configs(
    ("BM", "BN", "BK"),
    [  # (BM, BN, BK, warps, stages, CTAs per SM)
        (128, 128, 64, 8, 3, 1),
        (64, 128, 64, 4, 4, 2),
        (128, 64, 64, 4, 3, 2),
    ],
)
_GRADIENT_CONFIGS = configs(
    ("BM", "BN", "BK"),
    [  # (BM, BN, BK, warps, stages, CTAs per SM)
        (128, 128, 64, 8, 3, 1),
        (64, 128, 64, 4, 3, 2),
        (128, 64, 64, 4, 3, 2),
    ],
)
_KEY = ["D", "n_bucket", "DOT_PRECISION"]
_forward_tuned = triton.autotune(
    _FORWARD_CONFIGS,
    key=_KEY + ["COL_STATS", "ONE_EXP"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_forward_kernel)
_gradient_tuned = triton.autotune(
    _GRADIENT_CONFIGS,
    key=_KEY + ["B_TERM"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_gradient_kernel)
