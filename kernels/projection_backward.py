"""The normalized projection's backward, y = normalize(x W^T + b): dL/dx, dL/dW and dL/db in
two Triton kernels, dz never stored. The math and the design are in ``projection.py``'s
docstring (the backward's 2 passes: ``_dx_kernel``, then ``_dw_kernel``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .jit import column_chunk
from .launch import (
    WORKSPACE_BYTES,
    TileConfig,
    bucket,
    configs,
    dot_precision,
    launch,
    projection_prune,
    target_programs,
)

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_gy(g_rows, y_rows, row_ok, outs, n_out, stride_gd):
    """The (BM, BO) tiles of g and y (contiguous rows) at the given row pointers, in fp32."""
    ok = row_ok[:, None] & (outs < n_out)[None, :]
    g = tl.load(g_rows[:, None] + outs[None, :] * stride_gd, mask=ok, other=0.0)
    y = tl.load(y_rows[:, None] + outs[None, :], mask=ok, other=0.0)
    return g.to(tl.float32), y.to(tl.float32)


@triton.jit
def _dx_kernel(
    # pointers
    g_ptr,  # (n_rows, n_out) dL/dy
    y_ptr,  # (n_rows, n_out) contiguous, the forward's output
    norm_ptr,  # (n_rows,) fp32 ||z_i||, the forward's
    w_ptr,  # (n_out, n_in) (DX)
    yg_ptr,  # (n_rows,) fp32 s_i = <y_i, g_i>, 0 where the norm was clamped, written
    dx_ptr,  # (n_rows, n_in) contiguous dL/dx (DX), written
    # sizes
    n_rows,
    n_in,
    n_out,
    n_bucket,  # autotune key only
    eps,
    # strides
    stride_g,
    stride_gd,
    stride_w,
    stride_wd,
    # meta-parameters
    DX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BO: tl.constexpr,
    BI: tl.constexpr,
):
    """s_i for a block of BM rows and, with DX, dL/dx = dz W for its BI input features: 1 matmul
    pass of n_rows n_out n_in overall (none without DX).

    Inputs: g, y, the norms and W as above. Programs run row block by row block, the BI blocks of
    one row block next to each other, so that its g and y tiles are read from memory once.
    """
    n_ib = 1
    if DX:
        n_ib = tl.cdiv(n_in, BI)
    rb = tl.program_id(0) // n_ib
    ib = tl.program_id(0) % n_ib
    rows = (rb * BM + tl.arange(0, BM)).to(tl.int64)
    row_ok = rows < n_rows
    g_rows = g_ptr + rows * stride_g
    y_rows = y_ptr + rows * n_out

    yg = tl.zeros((BM,), tl.float32)
    for o0 in range(0, n_out, BO):
        g, y = _load_gy(g_rows, y_rows, row_ok, o0 + tl.arange(0, BO), n_out, stride_gd)
        yg += tl.sum(g * y, axis=1)
    norm = tl.load(norm_ptr + rows, mask=row_ok, other=1.0)
    yg = tl.where(norm >= eps, yg, 0.0)  # a clamped norm is the constant eps: no projection
    if ib == 0:
        tl.store(yg_ptr + rows, yg, mask=row_ok)

    if DX:
        scale = 1.0 / tl.maximum(norm, eps)
        ins = ib * BI + tl.arange(0, BI)
        in_ok = ins < n_in
        acc = tl.zeros((BM, BI), tl.float32)
        for o0 in range(0, n_out, BO):
            outs = o0 + tl.arange(0, BO)
            g, y = _load_gy(g_rows, y_rows, row_ok, outs, n_out, stride_gd)
            dz = (g - y * yg[:, None]) * scale[:, None]  # (BM, BO)
            w = tl.load(w_ptr + outs[:, None] * stride_w + ins[None, :] * stride_wd,
                        mask=(outs < n_out)[:, None] & in_ok[None, :], other=0.0)  # fmt: skip
            acc = tl.dot(dz.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
        dx = dx_ptr + rows[:, None] * n_in + ins[None, :]
        tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & in_ok[None, :])


@triton.jit
def _dw_kernel(
    # pointers
    g_ptr,  # (n_rows, n_out) dL/dy
    y_ptr,  # (n_rows, n_out) contiguous, the forward's output
    norm_ptr,  # (n_rows,) fp32 ||z_i||, the forward's
    yg_ptr,  # (n_rows,) fp32 s_i, from _dx_kernel
    x_ptr,  # (n_rows, n_in) (DW)
    dw_ptr,  # (row_split, n_out, n_in) fp32 partials of dL/dW (DW), written
    db_ptr,  # (row_split, n_out) fp32 partials of dL/db (DB), written
    # sizes
    n_rows,
    n_in,
    n_out,
    n_bucket,  # autotune key only
    eps,
    # strides
    stride_g,
    stride_gd,
    stride_x,
    stride_xd,
    # meta-parameters
    DW: tl.constexpr,
    DB: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BO: tl.constexpr,
    BI: tl.constexpr,
):
    """A (BO, BI) tile of dz^T x and BO sums of dz over one chunk of the rows: 1 matmul pass of
    n_out n_rows n_in overall with DW (none for db alone).

    Inputs: g, y, the norms, s and x as above; grid (dW tiles, row chunks). dz is recomputed from
    g, y, s_i and r_i for every tile. Every program writes its partials, zeros for an empty chunk.
    """
    n_ib = 1
    if DW:
        n_ib = tl.cdiv(n_in, BI)
    ob = tl.program_id(0) // n_ib
    ib = tl.program_id(0) % n_ib
    outs = ob * BO + tl.arange(0, BO)
    ins = ib * BI + tl.arange(0, BI)
    out_ok, in_ok = outs < n_out, ins < n_in
    acc = tl.zeros((BO, BI), tl.float32)
    db = tl.zeros((BO,), tl.float32)
    rb_start, rb_end = column_chunk(n_rows, BM)  # this program's row blocks (chunks on axis 1)
    for rb in range(rb_start, rb_end):
        rows = (rb * BM + tl.arange(0, BM)).to(tl.int64)
        row_ok = rows < n_rows
        norm = tl.load(norm_ptr + rows, mask=row_ok, other=1.0)
        yg = tl.load(yg_ptr + rows, mask=row_ok, other=0.0)
        g, y = _load_gy(g_ptr + rows * stride_g, y_ptr + rows * n_out, row_ok, outs, n_out,
                        stride_gd)  # fmt: skip
        dz = (g - y * yg[:, None]) * (1.0 / tl.maximum(norm, eps))[:, None]  # (BM, BO)
        if DB:
            db += tl.sum(dz, axis=0)
        if DW:
            x = tl.load(x_ptr + rows[:, None] * stride_x + ins[None, :] * stride_xd,
                        mask=row_ok[:, None] & in_ok[None, :], other=0.0)  # fmt: skip
            acc = tl.dot(tl.trans(dz.to(x.dtype)), x, acc, input_precision=DOT_PRECISION)
    partial = tl.program_id(1).to(tl.int64) * n_out + outs
    if DW:
        dw = dw_ptr + partial[:, None] * n_in + ins[None, :]
        tl.store(dw, acc, mask=out_ok[:, None] & in_ok[None, :])
    if DB and ib == 0:
        tl.store(db_ptr + partial, db, mask=out_ok)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


_DX_CONFIGS = configs(("BM", "BO", "BI"), [  # (BM, BO, BI, warps, stages)
    (64, 64, 128, 4, 3),
    (128, 64, 128, 8, 3),
    (128, 32, 256, 8, 3),
    (64, 64, 256, 8, 3),
    (128, 64, 64, 4, 3),
    (64, 32, 64, 4, 2),
])  # fmt: skip
_DW_CONFIGS = configs(("BM", "BO", "BI"), [
    (64, 128, 128, 8, 3),
    (32, 128, 256, 8, 3),
    (64, 64, 128, 4, 3),
    (64, 128, 64, 8, 3),
    (32, 256, 128, 8, 2),
    (32, 64, 64, 4, 2),
])  # fmt: skip

_dx_tuned = triton.autotune(
    _DX_CONFIGS,
    key=["n_in", "n_out", "n_bucket", "DX", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": functools.partial(projection_prune, "dx")},
)(_dx_kernel)
_dw_tuned = triton.autotune(
    _DW_CONFIGS,
    key=["n_in", "n_out", "n_bucket", "DW", "DB", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": functools.partial(projection_prune, "dw")},
)(_dw_kernel)

_BACKWARD_BLOCKS = {"BM": "block_m", "BO": "block_n", "BI": "block_d"}


def _row_split(n_rows: int, n_out: int, n_in: int, device, config: TileConfig | None) -> int:
    """Row chunks of the dW sweep: enough programs to fill the GPU, chunks of >= 256 rows, and a
    workspace of at most WORKSPACE_BYTES."""
    if config is not None and config.row_split:
        return config.row_split
    tiles = triton.cdiv(n_out, 128) * max(1, triton.cdiv(n_in, 128))  # tuned: 64 to 256 wide
    split = min(triton.cdiv(target_programs(device), tiles), triton.cdiv(n_rows, 256))
    return max(1, min(split, WORKSPACE_BYTES // (4 * n_out * max(n_in, 1))))


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def projection_backward(
    grad: torch.Tensor,
    y: torch.Tensor,
    norm: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    *,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dL/dx, dL/dW, dL/db of y = normalize(x W^T + b) from dL/dy, each only on request.

    Args:
        grad (n_rows, n_out): dL/dy, y's dtype, any strides. y, norm: ``projection_forward``'s.
        x (n_rows, n_in): needed for dL/dW, else may be None. weight (n_out, n_in): needed for
            dL/dx, else may be None. eps: the forward's.
        config: fixed block_m (rows), block_n (output features), block_d (input features) and
            row_split (row chunks of the dW sweep); None autotunes.

    Returns:
        dx (n_rows, n_in), dW (n_out, n_in), db (n_out,), in y's dtype; None where not requested.
    """
    n_rows, n_out = y.shape
    n_in = x.shape[1] if x is not None else weight.shape[1] if weight is not None else 0
    f32 = {"dtype": torch.float32, "device": y.device}
    yg = torch.empty(n_rows, **f32)
    dx = torch.empty((n_rows, n_in), dtype=y.dtype, device=y.device) if need_dx else None
    n_bucket, precision = bucket(n_rows), dot_precision(y.dtype)

    w = weight if need_dx else None
    args = dict(
        g_ptr=grad,
        y_ptr=y,
        norm_ptr=norm,
        w_ptr=w,
        yg_ptr=yg,
        dx_ptr=dx,
        n_rows=n_rows,
        n_in=n_in,
        n_out=n_out,
        n_bucket=n_bucket,
        eps=eps,
        stride_g=grad.stride(0),
        stride_gd=grad.stride(1),
        stride_w=w.stride(0) if need_dx else 0,
        stride_wd=w.stride(1) if need_dx else 0,
        DX=need_dx,
        DOT_PRECISION=precision,
    )
    blocks_i = lambda meta: triton.cdiv(n_in, meta["BI"]) if need_dx else 1  # noqa: E731
    grid = lambda meta: (triton.cdiv(n_rows, meta["BM"]) * blocks_i(meta),)  # noqa: E731
    launch(_dx_kernel, _dx_tuned, grid, config, args, _BACKWARD_BLOCKS)
    if not (need_dw or need_db):
        return dx, None, None

    split = _row_split(n_rows, n_out, n_in, y.device, config)
    dw = torch.empty((split, n_out, n_in), **f32) if need_dw else None
    db = torch.empty((split, n_out), **f32) if need_db else None
    args = dict(
        g_ptr=grad,
        y_ptr=y,
        norm_ptr=norm,
        yg_ptr=yg,
        x_ptr=x if need_dw else None,
        dw_ptr=dw,
        db_ptr=db,
        n_rows=n_rows,
        n_in=n_in,
        n_out=n_out,
        n_bucket=n_bucket,
        eps=eps,
        stride_g=grad.stride(0),
        stride_gd=grad.stride(1),
        stride_x=x.stride(0) if need_dw else 0,
        stride_xd=x.stride(1) if need_dw else 0,
        DW=need_dw,
        DB=need_db,
        DOT_PRECISION=precision,
    )
    blocks_i = lambda meta: triton.cdiv(n_in, meta["BI"]) if need_dw else 1  # noqa: E731
    grid = lambda meta: (triton.cdiv(n_out, meta["BO"]) * blocks_i(meta), split)  # noqa: E731
    launch(_dw_kernel, _dw_tuned, grid, config, args, _BACKWARD_BLOCKS)
    dw = dw.sum(0).to(y.dtype) if need_dw else None
    db = db.sum(0).to(y.dtype) if need_db else None
    return dx, dw, db
