"""Fused normalized projection: y = normalize(x W^T + b) row-wise, forward and backward in Triton.

Math. For x (n_rows, n_in), W (n_out, n_in) and b (n_out,),

    z_i = W x_i + b,    r_i = max(||z_i||, eps),    y_i = z_i / r_i        (F.normalize's eps)

and, with g_i = dL/dy_i and s_i = <y_i, g_i> where ||z_i|| >= eps (0 where the norm was clamped:
there y_i = z_i / eps, a constant scaling),

    dz_i = (g_i - s_i y_i) / r_i,    dL/dx = dz W,    dL/dW = dz^T x,    dL/db = sum_i dz_i.

Design and cost, in matmul passes of n_rows * n_in * n_out multiply-adds (the floor is 3):

- forward, 1 pass (``_forward_kernel``). The norm needs a whole row of z, so each program owns a
  block of BM rows and every output column. For n_out <= MAX_BLOCK_O (512) the (BM, n_out) block,
  padded to a power of two with the padding masked, stays in registers, is normalized there and
  y is written once. Holding it is what limits the tiles: 64 x 512 fp32 is 128 registers a thread
  at 8 warps, 64 at 16 warps; ``fitting`` drops the configs whose accumulator would take more
  than 128 or half of what a thread may have. 64 x 1024 would need every register a thread has
  at 16 warps (ptxas refuses), and 32-row tiles give up Hopper's warpgroup MMA, which works on
  64 rows. Wider outputs therefore take a two-stage epilogue: z is written one column block
  (WIDE_BLOCK_O or half of it; the loop keeps about twice the registers live) at a time while the
  squares are summed, then the program rescales its rows in place (one more read and write of its
  own y, mostly from L2, no more matmul work; in 16-bit dtypes z is rounded once before the
  scaling, as eager PyTorch rounds it too). Saved for the backward: y and the row norms ||z_i||
  (n_rows fp32), nothing else of size n_rows * n_out.
- backward, 2 passes. ``_dx_kernel`` owns a block of rows and a block of input features: it sweeps
  g and y once for s_i (O(BM n_out); the programs of one row block run side by side, so only the
  first reads g and y from memory, the others from L2; the first also writes s), then forms dz
  tile by tile in registers and multiplies it by W (1 pass). ``_dw_kernel`` owns a (BO, BI) tile
  of dW and a chunk of the rows: it forms dz^T again from g, y, s and the norms and multiplies it
  by x (1 pass), summing dz for db on the way. The row chunks' partials go to a private fp32
  workspace summed afterwards: deterministic, no atomics; the split keeps the GPU busy when
  n_out * n_in alone gives few tiles. dz is never stored: materializing it would save a handful
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
from torch.autograd.function import once_differentiable
from triton.runtime import driver

from .jit import (
    column_chunk,
    similarity_tile,
)
from .launch import (
    WORKSPACE_BYTES,
    TileConfig,
    bucket,
    configs,
    dot_precision,
    launch,
    target_programs,
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


def footprint(kernel: str, blocks: dict) -> tuple[int, int]:
    """(operand elements per pipeline stage, fp32 accumulator elements) of a kernel's tiles."""
    bm, bo, bi = blocks["BM"], blocks["BO"], blocks["BI"]
    if kernel == "forward":  # x (BM, BI) and W (BO, BI) tiles into z (BM, BO)
        return (bm + bo) * bi, bm * bo
    if kernel == "dx":  # g, y (BM, BO) and W (BO, BI) into dx (BM, BI)
        return (2 * bm + bi) * bo, bm * bi
    return (2 * bo + bi) * bm, bo * bi  # dw: g, y (BM, BO) and x (BM, BI) into dW (BO, BI)


def fitting(kernel: str, configs: list, meta: dict, element_size: int, shared_memory: int) -> list:
    """The configs whose pipelined operand tiles take at most 3/4 of the shared memory and whose
    fp32 accumulator takes at most 128 registers a thread and half of what a thread may have
    (65536 / threads): the compiler spills the rest, or refuses it. The forward's two-stage
    epilogue counts its accumulator twice (compiled, it keeps about that much more live)."""
    kept = []
    for c in configs:
        sizes = {**meta, **c.kwargs}
        operands, accumulator = footprint(kernel, sizes)
        smem = operands * c.num_stages * element_size
        threads = 32 * c.num_warps
        registers = accumulator / threads * (2 if meta.get("WIDE") else 1)
        if smem <= 0.75 * shared_memory and registers <= min(128, 65536 / threads / 2):
            if kernel != "forward" or _full_width_mma(sizes, c.num_warps):
                kept.append(c)
    return kept


def _full_width_mma(sizes: dict, num_warps: int) -> bool:
    """Hopper's MMA runs per warp group (4 warps) on 64 rows: warp groups beyond BM / 64 split
    the BO output columns between them, and an n64 instruction where n128 fits halves the
    operand reuse. A BO of 128 or more must stay at least 128 wide per warp group."""
    split = max(1, (num_warps // 4) // max(1, sizes["BM"] // 64))
    return sizes["BO"] < 128 or sizes["BO"] // split >= 128


def prune(kernel: str, configs: list, named_args: dict, **meta) -> list:
    """``early_config_prune``: the fitting configs for this GPU (each kernel's first argument is an
    operand in the input dtype); the last config, the smallest, if none fits."""
    first = next(iter(named_args.values()))
    smem = driver.active.utils.get_device_properties(first.device.index)["max_shared_mem"]
    return fitting(kernel, configs, meta, first.element_size(), smem) or configs[-1:]


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

_forward_tuned = triton.autotune(
    _FORWARD_CONFIGS,
    key=["n_in", "n_out", "n_bucket", "HAS_BIAS", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": functools.partial(prune, "forward")},
)(_forward_kernel)
_dx_tuned = triton.autotune(
    _DX_CONFIGS,
    key=["n_in", "n_out", "n_bucket", "DX", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": functools.partial(prune, "dx")},
)(_dx_kernel)
_dw_tuned = triton.autotune(
    _DW_CONFIGS,
    key=["n_in", "n_out", "n_bucket", "DW", "DB", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": functools.partial(prune, "dw")},
)(_dw_kernel)

_BACKWARD_BLOCKS = {"BM": "block_m", "BO": "block_n", "BI": "block_d"}


def output_block(n_out: int) -> int:
    """The forward's column block: n_out rounded up to a power of two (at least 16) up to
    MAX_BLOCK_O, all of it in registers; past it, the two-stage epilogue's WIDE_BLOCK_O or half
    of it, whichever pads n_out less (768: 3 x 256; 640: 5 x 128)."""
    if n_out <= MAX_BLOCK_O:
        return max(16, triton.next_power_of_2(n_out))
    widths = (WIDE_BLOCK_O, WIDE_BLOCK_O // 2)
    return min(widths, key=lambda width: triton.cdiv(n_out, width) * width)


def _row_split(n_rows: int, n_out: int, n_in: int, device, config: TileConfig | None) -> int:
    """Row chunks of the dW sweep: enough programs to fill the GPU, chunks of >= 256 rows, and a
    workspace of at most WORKSPACE_BYTES."""
    if config is not None and config.row_split:
        return config.row_split
    tiles = triton.cdiv(n_out, 128) * max(1, triton.cdiv(n_in, 128))  # tuned: 64 to 256 wide
    split = min(triton.cdiv(target_programs(device), tiles), triton.cdiv(n_rows, 256))
    return max(1, min(split, WORKSPACE_BYTES // (4 * n_out * max(n_in, 1))))


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


# ----------------------------------------------------------------------------------------------
# Autograd and the op's launcher
# ----------------------------------------------------------------------------------------------


class _NormalizedLinear(torch.autograd.Function):
    """Saves y and the row norms, and x or W only for the gradient that needs it."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, config: TileConfig | None):
        y, norm = projection_forward(x, weight, bias, eps, config=config)
        need_dx, need_dw, _ = ctx.needs_input_grad[:3]
        ctx.save_for_backward(x if need_dw else None, weight if need_dx else None, y, norm)
        ctx.eps, ctx.config = eps, config
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, y, norm = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        grads = projection_backward(
            grad, y, norm, x, weight, ctx.eps, need_dx, need_dw, need_db, config=ctx.config
        )
        return *grads, None, None


def normalized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    *,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """``fastclip.normalized_linear`` on the kernels: x (n_rows, n_in) -> y (n_rows, n_out),
    differentiable with respect to x, weight and bias where they require grad."""
    inputs = (x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _NormalizedLinear.apply(x, weight, bias, eps, config)
    return projection_forward(x, weight, bias, eps, config=config)[0]
