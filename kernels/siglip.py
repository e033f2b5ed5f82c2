"""Fused SigLIP (sigmoid) loss: loss and gradients in Triton sweeps, never an N x N buffer.

Math. With S_ij = s * <x_i, y_j> + b (x: (n_x, D), y: (n_y, D), s the exponentiated logit scale,
b the logit bias) and z_ij = +1 for the positive pairs j = i + offset, -1 otherwise,

    L = (1/n_x) sum_ij -log sigmoid(z_ij S_ij) = (1/n_x) sum_ij softplus(-z_ij S_ij),

each term a softplus of its own logit (softplus(-S) for a pair, softplus(S) otherwise), never
softplus(S) - S: a confident pair's loss, softplus(-15) = 3.06e-7, keeps its relative precision
and no sum is ever negative. A "negatives only" block (other ranks' texts) has no pairs. Every
pair is independent, so with

    G_ij = sigmoid(S_ij) / n_x  for a negative,   G_ij = -sigmoid(-S_ij) / n_x  for a pair

(sigmoid(S) - 1 = -sigmoid(-S), formed without the subtraction),

    dL/dx = s G y,  dL/dy = s G^T x,  dL/ds = sum_ij G_ij <x_i, y_j>,  dL/db = sum_ij G_ij.

softplus and sigmoid share one exponential, e = exp(-|z S|), and ``log1p_unit``. In
fp16, G (O(1): n_x G is at most 1) meets the tensor cores times ``launch.FP16_G_SCALE``, so that
the tiny sigmoids of confident pairs and of far negatives stay normal fp16 numbers; the
products divide it out in fp32 (a power of two: exact). No byte or pass more.

Design and cost, in matmul passes of n_x * n_y * D multiply-adds. Nothing needs a statistic of a
whole row first, so the gradients come out of the forward (the backward only scales them by
dL_out). The floor is 3 passes (S, G y, G^T x):

- bounded blocks (``method="blocks"``, 3 passes): for each block of R rows x C columns,
  ``_gradient_block_kernel`` computes S, the block's loss, dL/ds and dL/db partials, and writes
  G in the features' dtype to a bounded buffer (1 pass); cuBLAS adds G y and G^T x into fp32
  accumulators (2 passes at GEMM speed). ``method="blocks-mm"`` lets cuBLAS compute the dots.
  Per BM x BN tile: (BM + BN) D operand elements read and BM BN elements of G written.
- fused sweeps (4 passes): ``_sweep_kernel`` with GRAD, driven by ``fused.siglip_forward``.

Without gradients (evaluation), the loss alone is 1 pass (``_sweep_kernel`` without GRAD).
Inputs in fp32, fp16 or bf16; all arithmetic in fp32; fp32 products in TF32 only when torch
allows it. Extra memory: gradients (O(N D)), O(N) partial sums and the bounded buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import persistent_siglip
from .jit import (
    LN2_C,
    accumulate_tile,
    base2_affine,
    block_tile,
    clear_rows,
    column_chunk,
    log1p_unit,
    pairs_of,
    similarity_tile,
    store_parts,
    store_tile,
)
from .launch import (
    TileConfig,
    configs,
    g_storage_scale,
    prune_configs,
    tma_usable,
)
from .sweeps import (
    sweep_blocks,
    sweep_rows,
)

# The bounded-block designs, as ``siglip_forward``'s ``method`` takes them: "persistent" forms G
# by ``persistent_siglip.py`` where TMA can read the features (the fused sweeps are
# ``fused.siglip_forward``).
METHODS = ("blocks", "blocks-mm", "persistent")


@triton.jit
def sigmoid_base2(z2, e):
    """sigmoid(z) of z = z2 / log2(e), given e = exp(-|z|) = 2^-|z2|: (1 or e) / (1 + e), full
    relative precision in either tail."""
    return tl.where(z2 >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def softplus_base2(z2, e):
    """softplus(z) of z = z2 / log2(e), given e = exp(-|z|) = 2^-|z2|: max(z, 0) + log1p(e),
    full relative precision in either tail (softplus(-15) = 3.06e-7, not 0 or a negative).
    Shares e with ``sigmoid_base2``: one exponential for both."""
    return tl.maximum(z2, 0.0) * LN2_C + log1p_unit(e)


@triton.jit
def _siglip_logits(dots, pairs, scale2, bias2, HAS_PAIRS: tl.constexpr):
    """(t, e) of a tile of dots, fp32: t = -z S in base 2 (S for a negative, -S for a pair), the
    argument of the loss term softplus(-z S), and e = 2^-|t| = exp(-|z S|), which the loss
    term and G share."""
    t = dots * scale2 + bias2  # S in base 2
    if HAS_PAIRS:
        t = tl.where(pairs, -t, t)
    return t, tl.exp2(-tl.abs(t))


@triton.jit
def _siglip_gradient(t, e, pairs, tile_ok, HAS_PAIRS: tl.constexpr):
    """n_x G of a tile from ``_siglip_logits``, 0 outside the valid tile: O(1) entries, the
    launchers divide its products and sums by n_x."""
    g = sigmoid_base2(t, e)
    if HAS_PAIRS:
        g = tl.where(pairs, -g, g)
    return tl.where(tile_ok, g, 0.0)


@triton.jit
def _sweep_kernel(
    # pointers
    a_ptr,
    b_ptr,
    scale_ptr,
    bias_ptr,
    acc_ptr,  # (col_split, n_a, D) fp32 workspace: n_x G b partials (GRAD), written
    parts_ptr,  # (3, col_split, n_a) partial sums of n_x G_ij <a_i, b_j>, the loss terms, n_x G
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
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_PAIRS: tl.constexpr,
    LOSS: tl.constexpr,
    GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    G_SCALE: tl.constexpr,  # G meets the tensor cores times this (``launch.FP16_G_SCALE``)
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    """One sweep of a block of a's rows over a chunk of b's rows: 1 matmul pass of n_a n_b D,
    plus 1 more with GRAD.

    Per-row partial sums of n_x G_ij <a_i, b_j>, the loss terms and n_x G (LOSS; the first
    also with GRAD alone). GRAD: the workspace collects sum_j n_x G_ij b_j. Called with (x, y)
    and LOSS (+GRAD), and with (y, x) and GRAD alone for dL/dy (S is symmetric in the two
    operands). Per tile: (BM + BN) D operand elements read, and with GRAD BN D more and a
    BM x D fp32 accumulator read and written.
    """
    rb = tl.program_id(0)
    pid_c = tl.program_id(1)
    scale2, bias2 = base2_affine(scale_ptr, bias_ptr, HAS_BIAS)
    rows = rb * BM + tl.arange(0, BM)
    row_ok = rows < n_a
    a_rows = a_ptr + rows.to(tl.int64) * stride_a
    acc_blk = acc_ptr + (pid_c.to(tl.int64) * n_a + rb * BM) * D  # this program's workspace
    g_dots = tl.zeros((BM,), tl.float32)
    loss_sum = tl.zeros((BM,), tl.float32)
    g_sum = tl.zeros((BM,), tl.float32)

    cb_start, cb_end = column_chunk(n_b, BN)
    if GRAD and cb_start >= cb_end:
        clear_rows(acc_blk, row_ok, D, BM, BD)
    for cb in range(cb_start, cb_end):
        cols = cb * BN + tl.arange(0, BN)
        col_ok = cols < n_b
        b_rows = b_ptr + cols.to(tl.int64) * stride_b
        dots = similarity_tile(a_rows, b_rows, row_ok, col_ok, D, stride_ad, stride_bd, BK=BK,
                               DOT_PRECISION=DOT_PRECISION)  # fmt: skip
        pairs = pairs_of(rows, cols, offset)
        tile_ok = row_ok[:, None] & col_ok[None, :]
        t, e = _siglip_logits(dots, pairs, scale2, bias2, HAS_PAIRS)
        g = _siglip_gradient(t, e, pairs, tile_ok, HAS_PAIRS)
        g_dots += tl.sum(g * dots, axis=1)
        if LOSS:
            g_sum += tl.sum(g, axis=1)
            loss_sum += tl.sum(tl.where(tile_ok, softplus_base2(t, e), 0.0), axis=1)
        if GRAD:
            accumulate_tile(g * G_SCALE, b_ptr, cb, col_ok, acc_blk, row_ok, D, stride_b,
                            stride_bd, fresh=cb == cb_start, BM=BM, BN=BN, BD=BD,
                            DOT_PRECISION=DOT_PRECISION)  # fmt: skip

    store_parts(parts_ptr, g_dots, 0, rows, row_ok, n_a)
    if LOSS:
        store_parts(parts_ptr, loss_sum, 1, rows, row_ok, n_a)
        store_parts(parts_ptr, g_sum, 2, rows, row_ok, n_a)


@triton.jit
def _gradient_block_kernel(
    # pointers
    a_ptr,  # (n_a, D) the block's rows of x
    b_ptr,  # (n_b, D) the block's rows of y
    dots_ptr,  # (n_a, n_b) fp32 dots computed by a GEMM (DOTS_GIVEN), or unused
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
    stride_dots,
    stride_g,
    stride_sums,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_PAIRS: tl.constexpr,
    DOTS_GIVEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    G_SCALE: tl.constexpr,  # G is written times this (``launch.FP16_G_SCALE``)
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """One BM x BN tile of a block's G and its partial sums (module docstring): 1 matmul pass
    of n_a n_b D over the grid (none with DOTS_GIVEN), plus BM BN elements of G written."""
    rows, cols, tile_ok, dots = block_tile(
        a_ptr, b_ptr, dots_ptr, n_a, n_b, D,
        stride_a=stride_a, stride_ad=stride_ad, stride_b=stride_b, stride_bd=stride_bd,
        stride_dots=stride_dots, DOTS_GIVEN=DOTS_GIVEN, DOT_PRECISION=DOT_PRECISION,
        BM=BM, BN=BN, BK=BK, TMA=TMA,
    )  # fmt: skip
    scale2, bias2 = base2_affine(scale_ptr, bias_ptr, HAS_BIAS)
    pairs = pairs_of(rows, cols, offset)
    t, e = _siglip_logits(dots, pairs, scale2, bias2, HAS_PAIRS)
    program = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    loss = tl.where(tile_ok, softplus_base2(t, e), 0.0)
    tl.store(sums_ptr + stride_sums + program, tl.sum(loss))
    g = _siglip_gradient(t, e, pairs, tile_ok, HAS_PAIRS)
    tl.store(sums_ptr + program, tl.sum(g * dots))
    tl.store(sums_ptr + 2 * stride_sums + program, tl.sum(g))
    store_tile(g_ptr, g * G_SCALE, stride_g, tile_ok, BM, BN)


# The sweep with loss and gradient keeps S, G and a BM x BD accumulator live: BD = 128 (at
# 128 x 64 and 64 x 64 tiles) and 64 x 64 x 64 at 3 stages spill under Triton 3.6.
_SWEEP_CONFIGS = configs(
    ("BM", "BN", "BK", "BD"),
    [  # (BM, BN, BK, BD, warps, stages, CTAs per SM)
        (128, 64, 64, 64, 8, 3, 1),
        (64, 64, 32, 64, 4, 3, 2),
        (64, 64, 32, 64, 4, 2, 2),
    ],
)
_BLOCK_CONFIGS = configs(
    ("BM", "BN", "BK"),
    [  # (BM, BN, BK, warps, stages, CTAs per SM)
        (128, 64, 64, 8, 3, 1),
        (128, 64, 32, 8, 4, 1),
        (64, 64, 64, 4, 3, 2),
    ],
)
_sweep_tuned = triton.autotune(
    _SWEEP_CONFIGS,
    key=["D", "n_bucket", "HAS_BIAS", "HAS_PAIRS", "LOSS", "GRAD", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_sweep_kernel)
_block_tuned = triton.autotune(
    _BLOCK_CONFIGS,
    key=["D", "n_bucket", "HAS_BIAS", "HAS_PAIRS", "DOTS_GIVEN", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_gradient_block_kernel)


def sweep(a, b, scale, bias, n_x, offset, loss, grad, block_bytes, config):
    """Sweep a's rows against b (a's row i pairs with b's row i + offset; None: no pairs).

    Returns dL/da (n_a, D) if ``grad`` (else None) and the (3,) sums over all pairs of
    G_ij <a_i, b_j>, the loss terms and G (the last two only with ``loss``).
    """

    def args_of(rows):
        return dict(
            bias_ptr=bias,
            offset=0 if offset is None else offset + rows.start,
            HAS_BIAS=bias is not None,
            HAS_PAIRS=offset is not None,
            LOSS=loss,
            GRAD=grad,
            G_SCALE=g_scale,
        )

    g_scale = g_storage_scale(a.dtype)
    grad_scale = scale / (n_x * g_scale) if grad else None
    da, sums = sweep_rows(
        _sweep_kernel,
        _sweep_tuned,
        a,
        b,
        scale,
        config,
        args_of,
        n_parts=3,
        grad_scale=grad_scale,
        workspace_bytes=block_bytes,
    )
    return da, sums / n_x


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
    method: str = "blocks",
    block_bytes: int | None = None,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
           torch.Tensor | None]:  # fmt: skip
    """The SigLIP loss of the module docstring and, on request, its gradients.

    Args:
        x (n_x, D), y (n_y, D): features, same dtype (fp32/fp16/bf16) and device; any strides.
        scale, bias: one-element tensors on that device (bias may be None).
        offset: x_i's positive is y_{i + offset} (n_x + offset <= n_y); None: negatives only.
        need_dx, need_dy: produce dL/dx, dL/dy. need_dparams: dL/dscale and dL/dbias.
        method: "blocks", "blocks-mm" (module docstring) or "persistent" (G from
            ``persistent_siglip._gradient_kernel`` where ``launch.tma_usable``, else as
            "blocks"); the loss alone is always the 1-pass sweep.
        block_bytes: bound of the G buffer in bytes (``blocks.default_block_bytes`` when None).
        config: fixed tiles and splits; None autotunes (fixed small tiles under the interpreter).

    Returns:
        loss (0-dim fp32), dx, dy (input dtype), dscale, dbias (0-dim fp32); each None when not
        requested.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n_x = x.shape[0]
    if not (need_dx or need_dy or need_dparams):
        _, sums = sweep(x, y, scale, bias, n_x, offset, True, False, block_bytes, config)
        return sums[1], None, None, None, None

    def args_of(r0: int, r1: int, c0: int, c1: int) -> dict:
        return dict(
            bias_ptr=bias,
            offset=0 if offset is None else offset + r0 - c0,
            HAS_BIAS=bias is not None,
            HAS_PAIRS=offset is not None,
            G_SCALE=g_scale,
        )

    g_scale = g_storage_scale(x.dtype)
    one_wave = method == "persistent" and tma_usable(x, y)
    kernel, tuned = (_gradient_block_kernel, _block_tuned)
    if one_wave:
        kernel, tuned = (persistent_siglip._gradient_kernel, persistent_siglip._tuned)
    dx, dy, sums = sweep_blocks(
        kernel,
        tuned,
        x,
        y,
        scale,
        scale / (n_x * g_scale),
        config,
        args_of,
        n_sums=3,
        need_dx=need_dx,
        need_dy=need_dy,
        dots_by_gemm=method == "blocks-mm",
        block_bytes=block_bytes,
        persistent=one_wave,
    )
    dscale, loss, dbias = (sums / n_x).unbind()
    if not need_dparams:
        dscale = dbias = None
    return loss, dx, dy, dscale, dbias
