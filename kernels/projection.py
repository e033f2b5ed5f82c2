"""Fused normalized projection: y = normalize(x W^T + b) row-wise, forward and backward in Triton.

Math. For x (n_rows, n_in), W (n_out, n_in) and b (n_out,),

    z_i = W x_i + b,    r_i = max(||z_i||, eps),    y_i = z_i / r_i        (F.normalize's eps)

and, with g_i = dL/dy_i and s_i = <y_i, g_i> where ||z_i|| >= eps (0 where the norm was clamped:
there y_i = z_i / eps, a constant scaling),

    dz_i = (g_i - s_i y_i) / r_i,    dL/dx = dz W,    dL/dW = dz^T x,    dL/db = sum_i dz_i.

Design and cost, in matmul passes of n_rows * n_in * n_out multiply-adds (the floor is 3):

- forward, 1 pass (``_forward_kernel``). The norm needs a whole row of z, so each program owns a
  block of BM rows and every output column. For n_out <= MAX_BLOCK_O (512) the (BM, n_out) block,
  padded to a power of two with the padding masked, stays in registers, is normalized there and y is
  written once. Holding it is what limits the tiles: 64 x 512 fp32 is 128 registers a thread at 8
  warps, 64 at 16 warps; ``launch.projection_fitting`` drops the configs whose accumulator would
  take more than 128 or half of what a thread may have. 64 x 1024 would need every register a thread
  has at 16 warps (ptxas refuses), and 32-row tiles give up Hopper's warpgroup MMA, which works on
  64 rows. Wider outputs therefore take a two-stage epilogue: z is written one column block
  (WIDE_BLOCK_O or half of it; the loop keeps about twice the registers live) at a time while the
  squares are summed, then the program rescales its rows in place (one more read and write of its
  own y, mostly from L2, no more matmul work; in 16-bit dtypes z is rounded once before the scaling,
  as eager PyTorch rounds it too). Saved for the backward: y and the row norms ||z_i|| (n_rows
  fp32), nothing else of size n_rows * n_out.
- backward, 2 passes (``projection_backward.py``). ``_dx_kernel`` owns a block of rows and a block
  of input features: it sweeps g and y once for s_i (O(BM n_out); the programs of one row block run
  side by side, so only the first reads g and y from memory, the others from L2; the first also
  writes s), then forms dz tile by tile in registers and multiplies it by W (1 pass). ``_dw_kernel``
  owns a (BO, BI) tile of dW and a chunk of the rows: it forms dz^T again from g, y, s and the norms
  and multiplies it by x (1 pass), summing dz for db on the way. The row chunks' partials go to a
  private fp32 workspace summed afterwards: deterministic, no atomics; the split keeps the GPU busy
  when n_out * n_in alone gives few tiles. dz is never stored: materializing it would save a handful
  of fp32 operations per element but cost a write and two reads of n_rows * n_out elements, while
  recomputing reads g and y in the same tiles instead.

Total: 3 passes, the floor. An input that does not need its gradient skips its pass (a frozen
weight: no dW; x without grad: the dx kernel only computes s). Inputs in fp32, fp16 or bf16;
products accumulate in fp32 (fp32 inputs in TF32 only when torch allows it), the normalization is
in fp32, and dz is rounded to the input dtype for its products, as eager PyTorch does. Row
offsets are 64-bit.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .jit import (
    similarity_tile,
)
from .launch import (
    TileConfig,
    bucket,
    configs,
    dot_precision,
    launch,
    projection_prune,
)

# The widest output row the forward normalizes in registers (see the module docstring), and the
# column block of the two-stage epilogue past it (or half of it, whichever pads n_out less).
MAX_BLOCK_O = 512
WIDE_BLOCK_O = 256

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _linear_tile(x_rows, row_ok, w_ptr, b_ptr, cols, n_in, n_out, stride_w, stride_xd, stride_wd,
                 HAS_BIAS: tl.constexpr, BI: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):  # fmt: skip
    """z = x W^T + b for rows (pointers x_rows, (BM,)) and output columns cols (BO,), fp32; 0 on
    padding columns."""
    col_ok = cols < n_out
    z = similarity_tile(x_rows, w_ptr + cols * stride_w, row_ok, col_ok, n_in, stride_xd,
                        stride_wd, BK=BI, DOT_PRECISION=DOT_PRECISION)  # fmt: skip
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def _forward_kernel(
    # pointers
    x_ptr,  # (n_rows, n_in)
    w_ptr,  # (n_out, n_in)
    b_ptr,  # (n_out,) (HAS_BIAS)
    y_ptr,  # (n_rows, n_out) contiguous, written
    norm_ptr,  # (n_rows,) fp32 ||z_i||, written
    # sizes
    n_rows,
    n_in,
    n_out,
    n_bucket,  # autotune key only
    eps,
    # strides
    stride_x,
    stride_xd,
    stride_w,
    stride_wd,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    WIDE: tl.constexpr,  # n_out > BO: column blocks and the two-stage epilogue
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BO: tl.constexpr,
    BI: tl.constexpr,
):
    """y = normalize(x W^T + b) for a block of BM rows: 1 matmul pass of n_rows n_in n_out overall.

    Inputs: x, W, b as above. BO covers every output column (BO >= n_out) unless WIDE. Writes y in
    x's dtype and the row norms ||z_i|| (before the eps clamp) in fp32.
    """
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    row_ok = rows < n_rows
    x_rows = x_ptr + rows * stride_x
    y_rows = y_ptr + rows * n_out
    if WIDE:
        squares = tl.zeros((BM,), tl.float32)
        for ob in range(0, tl.cdiv(n_out, BO)):
            cols = ob * BO + tl.arange(0, BO)
            z = _linear_tile(x_rows, row_ok, w_ptr, b_ptr, cols, n_in, n_out, stride_w, stride_xd,
                             stride_wd, HAS_BIAS, BI, DOT_PRECISION)  # fmt: skip
            squares += tl.sum(z * z, axis=1)
            ok = row_ok[:, None] & (cols < n_out)[None, :]
            tl.store(y_rows[:, None] + cols[None, :], z.to(y_ptr.dtype.element_ty), mask=ok)
        norm = tl.sqrt(squares)
        scale = 1.0 / tl.maximum(norm, eps)
        tl.debug_barrier()  # the rescale reads what other threads of the program stored
        for ob in range(0, tl.cdiv(n_out, BO)):
            cols = ob * BO + tl.arange(0, BO)
            ptrs = y_rows[:, None] + cols[None, :]
            ok = row_ok[:, None] & (cols < n_out)[None, :]
            z = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
            tl.store(ptrs, (z * scale[:, None]).to(y_ptr.dtype.element_ty), mask=ok)
    else:
        cols = tl.arange(0, BO)
        z = _linear_tile(x_rows, row_ok, w_ptr, b_ptr, cols, n_in, n_out, stride_w, stride_xd,
                         stride_wd, HAS_BIAS, BI, DOT_PRECISION)  # fmt: skip
        norm = tl.sqrt(tl.sum(z * z, axis=1))
        y = z * (1.0 / tl.maximum(norm, eps))[:, None]
        ok = row_ok[:, None] & (cols < n_out)[None, :]
        tl.store(y_rows[:, None] + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(norm_ptr + rows, norm, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


# Forward: BO is set by the launcher (``output_block``); the entries give BM and BI, with the
# widest BO they can hold.
_FORWARD_CONFIGS = configs(
    ("BM", "BI"),
    [  # (BM, BI, warps, stages)
        (64, 32, 8, 4),  # BO <= 512
        (64, 64, 8, 2),  # BO <= 512
        (64, 32, 16, 3),  # BO <= 512
        (64, 64, 16, 2),  # BO <= 512
        (128, 64, 8, 3),  # BO <= 256
        (128, 32, 16, 3),  # BO <= 256
        (64, 64, 4, 3),  # BO <= 256
        (128, 64, 4, 4),  # BO <= 128
        (64, 16, 8, 3),  # BO <= 512, fp32 operands too: the fallback
    ],
)
_forward_tuned = triton.autotune(
    _FORWARD_CONFIGS,
    key=["n_in", "n_out", "n_bucket", "HAS_BIAS", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": functools.partial(projection_prune, "forward")},
)(_forward_kernel)


def output_block(n_out: int) -> int:
    """The forward's column block: n_out rounded up to a power of two (at least 16) up to
    MAX_BLOCK_O, all of it in registers; past it, the two-stage epilogue's WIDE_BLOCK_O or half
    of it, whichever pads n_out less (768: 3 x 256; 640: 5 x 128)."""
    if n_out <= MAX_BLOCK_O:
        return max(16, triton.next_power_of_2(n_out))
    widths = (WIDE_BLOCK_O, WIDE_BLOCK_O // 2)
    return min(widths, key=lambda width: triton.cdiv(n_out, width) * width)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def projection_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    *,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = normalize(x W^T + b) row-wise and the row norms ||x_i W^T + b|| the backward needs.

    Args:
        x (n_rows, n_in), weight (n_out, n_in), bias (n_out,) or None: one dtype (fp32/fp16/bf16)
            and device; any strides.
        eps: the norm's lower bound, as in F.normalize.
        config: fixed block_m and block_k (the column block is ``output_block(n_out)``); None
            autotunes (fixed small tiles under the interpreter).

    Returns:
        y (n_rows, n_out) contiguous in x's dtype; the norms (n_rows,) fp32, before the clamp.
    """
    n_rows, n_in = x.shape
    n_out = weight.shape[0]
    y = torch.empty((n_rows, n_out), dtype=x.dtype, device=x.device)
    norm = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_o = output_block(n_out)
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else None  # the kernel reads b at unit stride
    meta = {"HAS_BIAS": has_bias, "WIDE": n_out > block_o, "BO": block_o}
    meta["DOT_PRECISION"] = dot_precision(x.dtype)
    args = dict(
        x_ptr=x,
        w_ptr=weight,
        b_ptr=bias,
        y_ptr=y,
        norm_ptr=norm,
        n_rows=n_rows,
        n_in=n_in,
        n_out=n_out,
        n_bucket=bucket(n_rows),
        eps=eps,
        stride_x=x.stride(0),
        stride_xd=x.stride(1),
        stride_w=weight.stride(0),
        stride_wd=weight.stride(1),
        **meta,
    )
    grid = lambda meta: (triton.cdiv(n_rows, meta["BM"]),)  # noqa: E731
    launch(_forward_kernel, _forward_tuned, grid, config, args,
           {"BM": "block_m", "BI": "block_k"})  # fmt: skip
    return y, norm
