"""Building blocks shared by fastclip's pairwise kernels: similarity tiles, work splits, the
row-gradient epilogue, launch configuration.

The pairwise losses (InfoNCE in ``contrastive.py``, SigLIP in ``siglip.py``) score every row of
``a`` (n_a, D) against every row of ``b`` (n_b, D) tile by tile. Their gradients have the shape
dL/da = s * (P b - w (.) b[partner]) where P is dense (recomputed per tile, accumulated in an fp32
workspace by the loss's own kernel) and the second term pairs each row with one partner row;
``finalize_kernel`` adds that term, scales, casts, and emits the row terms of dL/ds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime import driver

LOG2E = tl.constexpr(math.log2(math.e))  # exp(x) = exp2(x * LOG2E)
LN2 = math.log(2.0)
# A gradient's fp32 accumulator never exceeds this; larger problems run in row slices.
WORKSPACE_BYTES = 256 * 2**20
# Smallest block in any config: the work splits are sized with it.
MIN_BLOCK = 64
# Row-wise kernels (positive logits, finalize): rows per program.
ROWS = 32


@dataclass(frozen=True)
class TileConfig:
    """Fixed launch parameters: for tests, the interpreter and FASTCLIP_AUTOTUNE=0.

    Every block is >= 16, the smallest shape ``tl.dot`` compiles. ``row_split`` and ``col_split``
    set how many programs share the rows and the columns; None sizes them to the device.
    """

    block_m: int = 64  # rows of x (or of the owned operand in the backward) per tile
    block_n: int = 64  # columns per tile
    block_k: int = 64  # feature chunk of the similarity product
    block_d: int = 64  # feature chunk of the gradient product and its accumulator
    num_warps: int = 4
    num_stages: int = 2
    row_split: int | None = None
    col_split: int | None = None


INTERPRETER_CONFIG = TileConfig(block_m=16, block_n=16, block_k=16, block_d=16, num_stages=1)


# ----------------------------------------------------------------------------------------------
# Triton building blocks
# ----------------------------------------------------------------------------------------------


@triton.jit
def similarity_tile(a_rows, b_rows, a_ok, b_ok, D, stride_ad, stride_bd, BK: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):  # fmt: skip
    """<a_i, b_j> for a tile in fp32, from row pointers a_rows (BM,) and b_rows (BN,)."""
    ks = tl.arange(0, BK)
    a_ptrs = a_rows[:, None] + ks[None, :] * stride_ad
    b_ptrs = b_rows[:, None] + ks[None, :] * stride_bd
    acc = tl.zeros((a_rows.shape[0], b_rows.shape[0]), dtype=tl.float32)
    for k0 in range(0, D, BK):
        a = tl.load(a_ptrs, mask=a_ok[:, None] & (ks[None, :] < D - k0), other=0.0)
        b = tl.load(b_ptrs, mask=b_ok[:, None] & (ks[None, :] < D - k0), other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        a_ptrs += BK * stride_ad
        b_ptrs += BK * stride_bd
    return acc


@triton.jit
def base2_affine(scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    """(s, b) times log2(e): the base-2 logits are <a_i, b_j> * scale2 + bias2."""
    scale2 = tl.load(scale_ptr).to(tl.float32) * LOG2E
    bias2 = 0.0
    if HAS_BIAS:
        bias2 = tl.load(bias_ptr).to(tl.float32) * LOG2E
    return scale2, bias2


@triton.jit
def column_chunk(n_cols, BN: tl.constexpr):
    """[start, end): the column blocks of this program's chunk (chunks along grid axis 1)."""
    n_blocks = tl.cdiv(n_cols, BN)
    per_chunk = tl.cdiv(n_blocks, tl.num_programs(1))
    start = tl.program_id(1) * per_chunk
    return start, tl.minimum(start + per_chunk, n_blocks)


@triton.jit
def accumulate_tile(g, b_ptr, cb, col_ok, acc_blk, row_ok, D, stride_b, stride_bd, fresh,
                    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):  # fmt: skip
    """acc (BM, D) += g (BM, BN) @ b's rows of column block cb (BN, D), BD features at a time.

    acc_blk points at the block's first row in an fp32 workspace of row stride D (a scalar 64-bit
    base plus small int32 offsets keeps the addressing cheap); ``fresh`` overwrites instead.
    """
    g = g.to(b_ptr.dtype.element_ty)
    b_blk = b_ptr + tl.cast(cb, tl.int64) * BN * stride_b
    b_offs = tl.arange(0, BN)[:, None] * stride_b + tl.arange(0, BD)[None, :] * stride_bd
    acc_offs = tl.arange(0, BM)[:, None] * D + tl.arange(0, BD)[None, :]
    for d0 in range(0, D, BD):
        d_ok = (d0 + tl.arange(0, BD)) < D
        b = tl.load(b_blk + d0 * stride_bd + b_offs, mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)  # fmt: skip
        acc_ptrs = acc_blk + d0 + acc_offs
        acc_ok = row_ok[:, None] & d_ok[None, :]
        if fresh:
            acc = tl.zeros((BM, BD), tl.float32)
        else:
            acc = tl.load(acc_ptrs, mask=acc_ok, other=0.0)
        acc = tl.dot(g, b, acc, input_precision=DOT_PRECISION)
        tl.store(acc_ptrs, acc, mask=acc_ok)
    # Other threads re-read these accumulators on the next tile: make the stores visible.
    tl.debug_barrier()


@triton.jit
def clear_rows(acc_blk, row_ok, D, BM: tl.constexpr, BD: tl.constexpr):
    """Zero a block's workspace rows: a program whose column chunk is empty still owes its
    partial to ``finalize_kernel``, which sums every chunk's (stale data otherwise, e.g. from
    a previous row slice or an autotuning trial)."""
    offs = tl.arange(0, BM)[:, None] * D + tl.arange(0, BD)[None, :]
    for d0 in range(0, D, BD):
        ok = row_ok[:, None] & ((d0 + tl.arange(0, BD)) < D)[None, :]
        tl.store(acc_blk + d0 + offs, tl.zeros((BM, BD), tl.float32), mask=ok)


@triton.jit
def finalize_kernel(
    # pointers
    acc_ptr,  # (col_split, n_a, D) fp32 partials of P b
    a_ptr,
    b_ptr,
    scale_ptr,
    w_a_ptr,
    w_b_ptr,  # loss weights, as in _backward_kernel
    grad_ptr,  # (n_a, D) contiguous gradient, written
    dscale_ptr,  # (n_a,) per-row terms of dL/ds, written
    # sizes
    n_a,
    n_b,
    D,
    offset,
    col_split,
    # strides
    stride_a,
    stride_ad,
    stride_b,
    stride_bd,
    # meta-parameters
    ROW_TERM: tl.constexpr,
    COL_TERM: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
):
    """(G b)_i = sum of the partials - (wa_i + wb_k) b_k for a_i's partner k = i + offset.

    Writes the gradient s (G b)_i and <(G b)_i, a_i>, whose sum over i is dL/ds. O(n_a D) work,
    no N^2 D pass.
    """
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < n_a
    partner = rows + offset
    paired = row_ok & (partner >= 0) & (partner < n_b)
    weight = tl.zeros((BM,), tl.float32)  # d_ij's weight wa_i + wb_k
    if ROW_TERM:
        weight += tl.load(w_a_ptr + rows, mask=paired, other=0.0)
    if COL_TERM:
        weight += tl.load(w_b_ptr + partner, mask=paired, other=0.0)
    scale = tl.load(scale_ptr).to(tl.float32)
    dscale = tl.zeros((BM,), tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        d_ok = ds[None, :] < D
        acc = tl.zeros((BM, BD), tl.float32)
        for c in range(0, col_split):
            partial = acc_ptr + (c * n_a + rows[:, None]) * D + ds[None, :]  # c * n_a < 2**31
            acc += tl.load(partial, mask=row_ok[:, None] & d_ok, other=0.0)
        b = tl.load(b_ptr + partner[:, None] * stride_b + ds[None, :] * stride_bd,
                    mask=paired[:, None] & d_ok, other=0.0)  # fmt: skip
        acc -= weight[:, None] * b.to(tl.float32)
        a = tl.load(a_ptr + rows[:, None] * stride_a + ds[None, :] * stride_ad,
                    mask=row_ok[:, None] & d_ok, other=0.0)  # fmt: skip
        dscale += tl.sum(acc * a.to(tl.float32), axis=1)
        grad = (acc * scale).to(grad_ptr.dtype.element_ty)
        tl.store(grad_ptr + rows[:, None] * D + ds[None, :], grad, mask=row_ok[:, None] & d_ok)
    tl.store(dscale_ptr + rows, dscale, mask=row_ok)


@triton.jit
def row_dot_kernel(
    x_ptr, y_ptr, out_ptr, n, D, stride_x, stride_xd, stride_y, stride_yd,
    BM: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """out_i = <x_i, y_i> in fp32, for the positive pairs' logits (y already offset by the
    caller). O(n D) work, no N^2 D pass."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < n
    dot = tl.zeros((BM,), tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        ok = row_ok[:, None] & (ds[None, :] < D)
        x = tl.load(x_ptr + rows[:, None] * stride_x + ds[None, :] * stride_xd, mask=ok, other=0.0)
        y = tl.load(y_ptr + rows[:, None] * stride_y + ds[None, :] * stride_yd, mask=ok, other=0.0)
        dot += tl.sum(x.to(tl.float32) * y.to(tl.float32), axis=1)
    tl.store(out_ptr + rows, dot, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def configs(blocks: tuple[str, ...], rows: list[tuple]) -> list[triton.Config]:
    """Autotune configs from rows of (*block sizes named by ``blocks``, num_warps, num_stages)."""
    return [
        triton.Config(
            dict(zip(blocks, row[:-2], strict=True)), num_warps=row[-2], num_stages=row[-1]
        )
        for row in rows
    ]


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs whose pipelined operand tiles would not fit the GPU's shared memory.

    The compiler rejects the rest anyway ("out of resources"); pruning saves the attempt. The
    smallest config is kept as a fallback for GPUs with little shared memory.
    """
    x = named_args.get("x_ptr", named_args.get("a_ptr"))
    budget = driver.active.utils.get_device_properties(x.device.index)["max_shared_mem"]
    kept = []
    for c in configs:
        kw = c.kwargs
        operands = (kw["BM"] + kw["BN"]) * kw["BK"] * c.num_stages + kw.get("BD", 0) * kw["BN"]
        if operands * x.element_size() <= 0.75 * budget:
            kept.append(c)
    return kept or [min(configs, key=lambda c: c.kwargs["BM"] * c.kwargs["BN"])]


def autotuning() -> bool:
    """Kernels without a given config autotune, but under the interpreter or FASTCLIP_AUTOTUNE=0."""
    return not interpreting() and os.environ.get("FASTCLIP_AUTOTUNE", "1") != "0"


def launch(kernel, tuned, grid, config: TileConfig | None, args: tuple, meta: dict, blocks):
    """Launch the autotuned kernel, or the plain one with a fixed config.

    Fixed configs: the one given; the interpreter's small tiles; ``TileConfig()`` when the
    environment sets FASTCLIP_AUTOTUNE=0 (no tuning runs, e.g. for short jobs).
    """
    if config is None and autotuning():
        tuned[grid](*args, **meta)
        return
    config = config or (INTERPRETER_CONFIG if interpreting() else TileConfig())
    sizes = {name: getattr(config, field) for name, field in blocks.items()}
    kernel[grid(sizes)](
        *args, **meta, **sizes, num_warps=config.num_warps, num_stages=config.num_stages
    )


def target_programs(device: torch.device) -> int:
    """Enough programs to keep every SM busy for a few waves (a handful under the interpreter)."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products follow torch's own matmul setting; 16-bit inputs are exact products anyway."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def row_block_d(D: int) -> int:
    return min(128, max(16, triton.next_power_of_2(D)))


def bucket(n: int) -> int:
    """Autotune key: powers of two from 1K to 64K rows, so a new batch size does not trigger a new
    search; past 64K rows every config fills the GPU many times over and the best one is settled."""
    return min(triton.next_power_of_2(max(n, 1024)), 65536)


# ----------------------------------------------------------------------------------------------
# Shared launchers
# ----------------------------------------------------------------------------------------------


def positive_logits(
    x: torch.Tensor, y: torch.Tensor, offset: int, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """S_i,i+offset = scale <x_i, y_i+offset> + bias for every row of x: (n_x,) fp32."""
    n, D = x.shape
    partners = y[offset : offset + n]
    dots = torch.empty(n, device=x.device, dtype=torch.float32)
    # fmt: off
    row_dot_kernel[(triton.cdiv(n, ROWS),)](
        x, partners, dots, n, D, x.stride(0), x.stride(1), partners.stride(0), partners.stride(1),
        BM=ROWS, BD=row_block_d(D),
    )
    # fmt: on
    logits = dots * scale.reshape(()).float()
    return logits + bias.reshape(()).float() if bias is not None else logits


def plan_workspace(
    n_a: int, n_b: int, D: int, device: torch.device, config: TileConfig | None, used: bool = True
) -> tuple[int, int, torch.Tensor]:
    """Column chunks per row block, rows per launch, and the fp32 workspace they need.

    Enough column chunks to fill the GPU when n_a is small; rows processed in slices so that the
    (col_split, slice_rows, D) workspace stays within WORKSPACE_BYTES. ``used=False``: a sweep
    that accumulates nothing, all rows at once and an empty workspace.
    """
    col_blocks = triton.cdiv(n_b, MIN_BLOCK)
    row_blocks = triton.cdiv(n_a, MIN_BLOCK)
    col_split = min(col_blocks, max(1, triton.cdiv(target_programs(device), row_blocks)))
    if config is not None and config.col_split:
        col_split = config.col_split
    slice_rows = min(n_a, max(MIN_BLOCK, WORKSPACE_BYTES // (4 * D * col_split)))
    if not used:
        slice_rows, D = n_a, 0
    workspace = torch.zeros((col_split, slice_rows, D), dtype=torch.float32, device=device)
    return col_split, slice_rows, workspace


def finalize(
    workspace: torch.Tensor,
    col_split: int,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    w_a: torch.Tensor | None,
    w_b: torch.Tensor | None,
    offset: int,
    grad: torch.Tensor,
    dscale: torch.Tensor,
) -> None:
    """Launch ``finalize_kernel`` on rows a (a slice, paired with b's row i + offset): writes
    grad (n_a, D) and the row terms dscale (n_a,). w_a/w_b weigh the pairing (None: absent)."""
    n_a, D = a.shape
    # fmt: off
    finalize_kernel[(triton.cdiv(n_a, ROWS),)](
        workspace, a, b, scale, a if w_a is None else w_a, a if w_b is None else w_b, grad, dscale,
        n_a, b.shape[0], D, offset, col_split, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        ROW_TERM=w_a is not None, COL_TERM=w_b is not None, BM=ROWS, BD=row_block_d(D),
    )
    # fmt: on
