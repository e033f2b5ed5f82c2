"""SigLIP's persistent G kernel: ``persistent.py``'s design (one wave of CTAs walking a block's
tiles in one flattened, pipelined loop; operands read and G written through TMA; masks only on
the tiles that need them) with SigLIP's epilogue at one exp2 per element and no other
special-function operation. Math: ``siglip.py``'s module docstring; 3 passes in all, like the
bounded blocks': S (here), G y and G^T x (cuBLAS).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .jit import (
    LN2_C,
    atanh_series,
    base2_affine,
    holds_pairs,
    operand,
    pairs_of,
    persistent_tile,
    reciprocal_unit,
    store_g,
)
from .launch import configs, prune_configs


@triton.jit
def _half(dots, rows, col0, row_ok, row0, scale2, bias2, g_ptr, n_a, n_b, offset, stride_g,
          g_dots, losses, g_sum, HAS_PAIRS: tl.constexpr, G_SCALE: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    """``_gradient_kernel``'s epilogue for the (BM, BN) dots of columns col0 + arange(BN): G
    stored, its sums added to (g_dots, losses, g_sum) (returned)."""
    cols = col0 + tl.arange(0, BN)
    col_ok = cols < n_b
    t2 = dots * scale2 + bias2  # -z S in base 2 (S for a negative, -S for a pair)
    paired = False
    if HAS_PAIRS:
        paired = holds_pairs(row0, col0, offset, BM, BN)
        if paired:
            t2 = tl.where(pairs_of(rows, cols, offset), -t2, t2)
    e = tl.exp2(-tl.abs(t2))  # the one special-function operation
    g = tl.where(t2 >= 0, 1.0, e) * reciprocal_unit(1.0 + e)  # sigmoid(-z S)
    if paired:
        g = tl.where(pairs_of(rows, cols, offset), -g, g)
    edge = (row0 + BM > n_a) | (col0 + BN > n_b)
    if edge:
        g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
    g_dots += tl.sum(g * dots, axis=1)  # the dots die here: few registers live at once
    g_sum += tl.sum(g, axis=1)
    store_g(g_ptr, g * G_SCALE, row0, col0, n_a, n_b, stride_g, BM, BN)
    half = 0.5 * e
    loss = tl.maximum(t2, 0.0) * LN2_C + atanh_series(half * reciprocal_unit(1.0 + half))
    if edge:
        loss = tl.where(row_ok[:, None] & col_ok[None, :], loss, 0.0)
    return g_dots, losses + tl.sum(loss, axis=1), g_sum


@triton.jit
def _gradient_kernel(
    # pointers
    a_ptr,  # (n_a, D) the block's rows of x
    b_ptr,  # (n_b, D) the block's rows of y
    scale_ptr,
    bias_ptr,
    g_ptr,  # (n_a, n_b) G, written in g's dtype
    sums_ptr,  # (3, programs) fp32 partial sums of n_x G_ij <a_i, b_j>, the loss terms, n_x G
    # sizes
    n_a,
    n_b,
    D,
    offset,  # a's row i pairs with b's row i + offset (HAS_PAIRS)
    n_bucket,  # autotune key only
    # strides
    stride_a,
    stride_ad,
    stride_b,
    stride_bd,
    stride_g,
    stride_sums,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_PAIRS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    G_SCALE: tl.constexpr,  # G is written times this (``launch.FP16_G_SCALE``)
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """SigLIP's G, loss and sums for one block (``siglip``'s module docstring): 1 matmul pass
    of n_a n_b D, one exp2 per element and no other special-function operation (the
    reciprocals of the sigmoid and of log1p's series by ``reciprocal_unit``). Schedule as
    ``persistent._gradient_kernel``'s. Per BM x BN tile: (BM + BN) D operand elements read, BM BN
    elements of G written.
    """
    pid = tl.program_id(0)
    scale2, bias2 = base2_affine(scale_ptr, bias_ptr, HAS_BIAS)
    tiles_n = tl.cdiv(n_b, BN)
    a = operand(a_ptr, n_a, D, stride_a, BM, BK, TMA=True)
    b = operand(b_ptr, n_b, D, stride_b, BN, BK, TMA=True)
    g_dots = tl.zeros((BM,), tl.float32)
    losses = tl.zeros((BM,), tl.float32)
    g_sum = tl.zeros((BM,), tl.float32)
    for t in tl.range(pid, tl.cdiv(n_a, BM) * tiles_n, tl.num_programs(0), flatten=True):
        row0, col0, rows, row_ok, d0, d1 = persistent_tile(
            a, b, t, tiles_n, n_a, n_b, D, stride_a, stride_ad, stride_b, stride_bd, BM, BN, BK,
            DOT_PRECISION,
        )  # fmt: skip
        g_dots, losses, g_sum = _half(d0, rows, col0, row_ok, row0, scale2, bias2, g_ptr, n_a,
                                      n_b, offset, stride_g, g_dots, losses, g_sum, HAS_PAIRS,
                                      G_SCALE, BM, BN // 2)  # fmt: skip
        g_dots, losses, g_sum = _half(d1, rows, col0 + BN // 2, row_ok, row0, scale2,
                                      bias2, g_ptr, n_a, n_b, offset, stride_g, g_dots, losses,
                                      g_sum, HAS_PAIRS, G_SCALE, BM, BN // 2)  # fmt: skip
    tl.store(sums_ptr + pid, tl.sum(g_dots))
    tl.store(sums_ptr + stride_sums + pid, tl.sum(losses))
    tl.store(sums_ptr + 2 * stride_sums + pid, tl.sum(g_sum))


# As ``persistent._GRADIENT_CONFIGS``.
_CONFIGS = configs(
    ("BM", "BN", "BK"),
    [  # (BM, BN, BK, warps, stages, CTAs per SM)
        (128, 128, 64, 8, 3, 1),
        (64, 128, 64, 4, 3, 2),
        (128, 64, 64, 4, 3, 2),
    ],
)
_tuned = triton.autotune(
    _CONFIGS,
    key=["D", "n_bucket", "DOT_PRECISION", "HAS_BIAS", "HAS_PAIRS"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_gradient_kernel)
