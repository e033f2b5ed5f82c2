"""Fused SigLIP (sigmoid) loss: loss and gradients in Triton sweeps, never an N x N buffer.

Math. With S_ij = s * <x_i, y_j> + b (x: (n_x, D), y: (n_y, D), s the exponentiated logit scale,
b the logit bias) and z_ij = +1 for the positive pairs j = i + offset, -1 otherwise,

    L = (1/n_x) sum_ij -log sigmoid(z_ij S_ij) = (1/n_x) [sum_ij softplus(S_ij) - sum_pos S_pos]

(softplus(-S) = softplus(S) - S). A "negatives only" block (other ranks' texts) has no positives.
Every pair is independent, so with G_ij = (sigmoid(S_ij) - d_ij) / n_x, d_ij = [j == i + off]:

    dL/dx = s G y,  dL/dy = s G^T x,  dL/ds = sum_ij G_ij <x_i, y_j>,  dL/db = sum_ij G_ij.

softplus and sigmoid share one exponential, e = 2^(-|S log2 e|), and are stable for any |S|.

Design and cost, in matmul passes of n_x * n_y * D multiply-adds. Nothing needs a statistic of a
whole row first, so the gradients come out of the same sweeps as the loss, during the forward
(the backward only scales them by dL_out). The floor is 3 passes (S, G y, G^T x); this design
does 4: one sweep owning blocks of x's rows yields the loss, sum G and G y (2 passes), a second
owning blocks of y's rows yields G^T x (2 passes), each accumulating into a private fp32
workspace: deterministic, no atomics. One sweep for both products would save a pass but needs
either a register accumulator of D floats per row (too large for D >= 512) or atomic additions
into a gradient on every tile, which cost more than the pass. Without gradients (evaluation),
the loss alone is 1 pass. The positive pairs' terms are O(N D): their logits are row dot
products, and their -d_ij gradient terms are added in ``tiles.finalize_kernel``.

Inputs in fp32, fp16 or bf16; all arithmetic in fp32; fp32 products in TF32 only when torch
allows it. Extra memory: gradients (O(N D)), O(N) partial sums and the bounded workspace.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import (
    LN2,
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
)


@triton.jit
def _siglip_kernel(
    # pointers
    a_ptr,
    b_ptr,
    scale_ptr,
    bias_ptr,
    loss_ptr,  # (col_split, n_a) partial sums of softplus(S) in base 2 (LOSS), written
    sig_ptr,  # (col_split, n_a) partial sums of sigmoid(S) (LOSS and GRAD), written
    acc_ptr,  # (col_split, n_a, D) fp32 workspace: (sigmoid(S) b) / n_x partials (GRAD), written
    # sizes
    n_a,
    n_b,
    D,
    n_bucket,  # autotune key only
    inv_n,  # 1 / n_x, the loss's normalization
    # strides
    stride_a,
    stride_ad,
    stride_b,
    stride_bd,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    LOSS: tl.constexpr,
    GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    """One sweep of a block of a's rows over a chunk of b's rows: 1 matmul pass of n_a n_b D,
    plus 1 more with GRAD.

    Inputs: a (n_a, D), b (n_b, D), s and b as one-element tensors; S_ij = s <a_i, b_j> + b.
    LOSS: per-row partial sums of softplus(S) (base 2) and of sigmoid(S). GRAD: the workspace
    collects sum_j sigmoid(S_ij) b_j / n_x. Called with (x, y) and LOSS (+GRAD), and with (y, x)
    and GRAD alone for dL/dy (S is symmetric in the two operands).
    """
    rb = tl.program_id(0)
    pid_c = tl.program_id(1)
    scale2, bias2 = base2_affine(scale_ptr, bias_ptr, HAS_BIAS)
    rows = (rb * BM + tl.arange(0, BM)).to(tl.int64)
    row_ok = rows < n_a
    a_rows = a_ptr + rows * stride_a
    acc_blk = acc_ptr + (pid_c.to(tl.int64) * n_a + rb * BM) * D  # this program's workspace
    softplus_sum = tl.zeros((BM,), tl.float32)
    sigmoid_sum = tl.zeros((BM,), tl.float32)

    cb_start, cb_end = column_chunk(n_b, BN)
    if GRAD and cb_start >= cb_end:
        clear_rows(acc_blk, row_ok, D, BM, BD)
    for cb in range(cb_start, cb_end):
        cols = (cb * BN + tl.arange(0, BN)).to(tl.int64)
        col_ok = cols < n_b
        s = similarity_tile(a_rows, b_ptr + cols * stride_b, row_ok, col_ok, D, stride_ad,
                            stride_bd, BK, DOT_PRECISION)  # fmt: skip
        # Base-2 logits; -inf on padding columns makes their softplus and sigmoid exactly 0.
        s = s * scale2 + tl.where(col_ok, bias2, float("-inf"))[None, :]
        e = tl.exp2(-tl.abs(s))  # exp(-|S|), in (0, 1]
        sigmoid = tl.where(s >= 0, 1.0, e) / (1.0 + e)
        if LOSS:
            softplus_sum += tl.sum(tl.maximum(s, 0.0) + tl.log2(1.0 + e), axis=1)
            sigmoid_sum += tl.sum(sigmoid, axis=1)
        if GRAD:
            accumulate_tile(sigmoid * inv_n, b_ptr, cb, col_ok, acc_blk, row_ok, D, stride_b,
                            stride_bd, cb == cb_start, BM, BN, BD, DOT_PRECISION)  # fmt: skip

    if LOSS:
        partial = pid_c.to(tl.int64) * n_a + rows
        tl.store(loss_ptr + partial, softplus_sum, mask=row_ok)
        tl.store(sig_ptr + partial, sigmoid_sum, mask=row_ok)


_CONFIGS = configs(
    ("BM", "BN", "BK", "BD"),
    [  # (BM, BN, BK, BD, warps, stages)
        (64, 128, 64, 128, 8, 3),
        (64, 256, 64, 128, 8, 2),
        (128, 64, 64, 128, 8, 3),
        (128, 128, 32, 32, 8, 3),
        (64, 128, 64, 64, 8, 3),
        (128, 64, 64, 64, 8, 3),
        (64, 64, 32, 64, 4, 2),
    ],
)
_siglip_tuned = triton.autotune(
    _CONFIGS,
    key=["D", "n_bucket", "HAS_BIAS", "LOSS", "GRAD", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_siglip_kernel)


def _sweep(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    n_x: int,
    offset: int | None,
    loss: bool,
    grad: bool,
    config: TileConfig | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Sweep a's rows against b; a's row i pairs with b's row i + offset (None: no pairs).

    Returns the sums over all pairs of softplus(S) (base 2) and sigmoid(S), a (2,) tensor, if
    ``loss``; dL/da (n_a, D) and the row terms of dL/ds (n_a,) if ``grad``.
    """
    n_a, D = a.shape
    n_b = b.shape[0]
    col_split, slice_rows, workspace = plan_workspace(n_a, n_b, D, a.device, config, grad)
    f32 = {"dtype": torch.float32, "device": a.device}
    totals = torch.zeros(2, **f32) if loss else None
    da = torch.empty((n_a, D), dtype=a.dtype, device=a.device) if grad else None
    dscale = torch.empty(n_a, **f32) if grad else None
    pair_weight = torch.full((n_a,), 1 / n_x, **f32) if grad and offset is not None else None
    meta = {
        "HAS_BIAS": bias is not None,
        "LOSS": loss,
        "GRAD": grad,
        "DOT_PRECISION": dot_precision(a.dtype),
    }
    blocks = {"BM": "block_m", "BN": "block_n", "BK": "block_k", "BD": "block_d"}
    for start in range(0, n_a, slice_rows):
        rows = slice(start, min(start + slice_rows, n_a))
        n_rows = rows.stop - start
        sums = torch.empty((2, col_split, n_rows), **f32) if loss else None
        unused = a  # placeholder pointer for buffers the flags leave untouched
        # fmt: off
        args = (
            a[rows], b, scale, scale if bias is None else bias,
            sums[0] if loss else unused, sums[1] if loss else unused, workspace if grad else unused,
            n_rows, n_b, D, bucket(max(n_a, n_b)), 1 / n_x,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        )
        # fmt: on
        grid = lambda meta, n=n_rows: (triton.cdiv(n, meta["BM"]), col_split)  # noqa: E731
        launch(_siglip_kernel, _siglip_tuned, grid, config, args, meta, blocks)
        if loss:
            totals += sums.sum(dim=(1, 2))
        if grad:
            weight = pair_weight[rows] if pair_weight is not None else None
            off = 0 if offset is None else offset + start
            finalize(workspace, col_split, a[rows], b, scale, weight, None, off, da[rows],
                     dscale[rows])  # fmt: skip
    return totals, da, dscale


def siglip_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    offset: int | None,
    need_dx: bool,
    need_dy: bool,
    need_dparams: bool,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
           torch.Tensor | None]:  # fmt: skip
    """The SigLIP loss of the module docstring and, on request, its gradients.

    Args:
        x (n_x, D), y (n_y, D): features, same dtype (fp32/fp16/bf16) and device; any strides.
        scale, bias: one-element tensors on that device (bias may be None).
        offset: x_i's positive is y_{i + offset} (n_x + offset <= n_y); None: negatives only.
        need_dx, need_dy: produce dL/dx, dL/dy. need_dparams: dL/dscale and dL/dbias.
        config: fixed tiles and splits; None autotunes (fixed small tiles under the interpreter).

    Returns:
        loss (0-dim fp32), dx, dy (input dtype), dscale, dbias (0-dim fp32); each None when not
        requested.
    """
    n_x = x.shape[0]
    # dL/ds comes with either gradient sweep: with dL/dy's if that one runs anyway.
    grad_x = need_dx or (need_dparams and not need_dy)
    totals, dx, dscale = _sweep(x, y, scale, bias, n_x, offset, True, grad_x, config)
    loss = totals[0] * LN2
    n_pos = 0
    if offset is not None:
        loss = loss - positive_logits(x, y, offset, scale, bias).sum()
        n_pos = n_x
    dy = None
    if need_dy:
        y_offset = None if offset is None else -offset
        _, dy, dscale_y = _sweep(y, x, scale, bias, n_x, y_offset, False, True, config)
        dscale = dscale if grad_x else dscale_y
    if not need_dparams:
        return loss / n_x, (dx if need_dx else None), dy, None, None
    dbias = (totals[1] - n_pos) / n_x
    return loss / n_x, (dx if need_dx else None), dy, dscale.sum(), dbias
