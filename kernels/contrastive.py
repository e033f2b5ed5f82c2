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

- forward, 1 pass. A 2-D grid: program (a, b) walks row blocks a, a + row_split, ... against the
  column blocks of chunk b. It keeps each row block's running max and sum of exponentials in
  registers (the online logsumexp) and writes one partial r per column chunk; for the other
  direction it merges each tile's column logsumexp into a partial c owned by its row chunk. Partials
  (O((row_split + col_split) * N) floats) are combined on the host side with a logsumexp.
- backward, 2 + 2 passes. One launch per operand: each program owns a block of rows of that operand,
  recomputes the similarity tiles against a chunk of the other operand (1 pass), turns them into G
  with the saved logsumexps and accumulates G times the other operand in an fp32 workspace (1 pass).
  The workspace is private to its program, so the result is deterministic and needs no atomics. A
  single backward launch producing both gradients from one recomputation would need 3 passes, but
  either a register accumulator of D floats per row (not available for D >= 512) or atomic
  additions into both gradients on every tile, which cost more than the pass they save.

Total: 5 passes. Extra memory: the O(N) statistics above and an fp32 workspace of at most
``WORKSPACE_BYTES`` (the backward processes the rows in slices that fit it). Inputs in fp32, fp16
or bf16; all arithmetic in fp32; fp32 inputs use TF32 products only when torch allows TF32 matmuls.
Exponentials are taken in base 2 with log2(e) folded into the scale.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(math.log2(math.e))  # exp(x) = exp2(x * LOG2E)
LN2 = math.log(2.0)
# The backward's fp32 accumulator never exceeds this; larger problems run in row slices.
WORKSPACE_BYTES = 256 * 2**20
# Forward programs along rows; each owns a partial column logsumexp of length n_y.
MAX_ROW_SPLIT = 16
# Smallest block in any config: the splits below are sized with it.
MIN_BLOCK = 64


@dataclass(frozen=True)
class TileConfig:
    """Fixed launch parameters (tests, the interpreter, GPUs without tuned configs).

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
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _similarity_tile(
    a_ptr,
    b_ptr,
    rows,
    cols,
    n_a,
    n_b,
    D,
    stride_a,
    stride_ad,
    stride_b,
    stride_bd,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """<a_i, b_j> for a (BM, BN) tile in fp32; rows and cols are int64 index vectors."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        a = tl.load(
            a_ptr + rows[:, None] * stride_a + ks[None, :] * stride_ad,
            mask=(rows[:, None] < n_a) & (ks[None, :] < D),
            other=0.0,
        )
        b = tl.load(
            b_ptr + cols[:, None] * stride_b + ks[None, :] * stride_bd,
            mask=(cols[:, None] < n_b) & (ks[None, :] < D),
            other=0.0,
        )
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


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
    pos_ptr,  # (n_x,) positive logits S_i,i+off, written
    # sizes
    n_x,
    n_y,
    D,
    offset,
    n_bucket,
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
    """Forward statistics: one pass over S = s x y^T + b, see the module docstring.

    Program (a, b) handles row blocks a, a + row_split, ... and the b-th contiguous chunk of
    column blocks. All outputs are in base 2: log2-sum-exp2 of S * log2(e), and S * log2(e).
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    row_split = tl.num_programs(0)
    col_split = tl.num_programs(1)
    scale2 = tl.load(scale_ptr).to(tl.float32) * LOG2E
    bias2 = 0.0
    if HAS_BIAS:
        bias2 = tl.load(bias_ptr).to(tl.float32) * LOG2E

    n_cb = tl.cdiv(n_y, BN)
    per_chunk = tl.cdiv(n_cb, col_split)
    cb_start = pid_c * per_chunk
    cb_end = tl.minimum(cb_start + per_chunk, n_cb)

    for rb in range(pid_r, tl.cdiv(n_x, BM), row_split):
        rows = (rb * BM + tl.arange(0, BM)).to(tl.int64)
        row_ok = rows < n_x
        row_max = tl.full((BM,), float("-inf"), tl.float32)  # running max of each row
        row_sum = tl.zeros((BM,), tl.float32)  # running sum of 2^(S - row_max)
        for cb in range(cb_start, cb_end):
            cols = (cb * BN + tl.arange(0, BN)).to(tl.int64)
            col_ok = cols < n_y
            s = _similarity_tile(
                x_ptr,
                y_ptr,
                rows,
                cols,
                n_x,
                n_y,
                D,
                stride_x,
                stride_xd,
                stride_y,
                stride_yd,
                BM,
                BN,
                BK,
                DOT_PRECISION,
            )
            s = s * scale2 + bias2
            s = tl.where(row_ok[:, None] & col_ok[None, :], s, float("-inf"))

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
                tl.debug_barrier()

            first_pos = rb * BM + offset
            if (cb * BN < first_pos + BM) & (cb * BN + BN > first_pos):
                is_pos = cols[None, :] == rows[:, None] + offset
                pos = tl.sum(tl.where(is_pos, s, 0.0), axis=1)
                has_pos = row_ok & (rows + offset >= cb * BN) & (rows + offset < cb * BN + BN)
                tl.store(pos_ptr + rows, pos, mask=has_pos)

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
    offset,
    n_bucket,
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
    """Accumulate (G b) for a block of rows of a over one chunk of b's rows: 2 passes.

    S_ij = s <a_i, b_j> + b is recomputed tile by tile, G_ij is the module docstring's gradient
    (rows of a positive with b-row i + offset), and the program's private slice of the workspace
    collects G_ij b_j over its chunk. Called with (x, y) for dL/dx and (y, x, -offset) for dL/dy.
    """
    rb = tl.program_id(0)
    pid_c = tl.program_id(1)
    col_split = tl.num_programs(1)
    scale2 = tl.load(scale_ptr).to(tl.float32) * LOG2E
    bias2 = 0.0
    if HAS_BIAS:
        bias2 = tl.load(bias_ptr).to(tl.float32) * LOG2E

    rows = (rb * BM + tl.arange(0, BM)).to(tl.int64)
    row_ok = rows < n_a
    w_a = tl.zeros((BM,), tl.float32)
    if ROW_TERM:
        lse_a = tl.load(lse_a_ptr + rows, mask=row_ok, other=float("inf")) * LOG2E
        w_a = tl.load(w_a_ptr + rows, mask=row_ok, other=0.0)
    acc_rows = acc_ptr + (pid_c.to(tl.int64) * n_a + rows[:, None]) * D

    n_cb = tl.cdiv(n_b, BN)
    per_chunk = tl.cdiv(n_cb, col_split)
    cb_start = pid_c * per_chunk
    cb_end = tl.minimum(cb_start + per_chunk, n_cb)
    for cb in range(cb_start, cb_end):
        cols = (cb * BN + tl.arange(0, BN)).to(tl.int64)
        col_ok = cols < n_b
        s = _similarity_tile(
            a_ptr,
            b_ptr,
            rows,
            cols,
            n_a,
            n_b,
            D,
            stride_a,
            stride_ad,
            stride_b,
            stride_bd,
            BM,
            BN,
            BK,
            DOT_PRECISION,
        )
        s = s * scale2 + bias2

        g = tl.zeros((BM, BN), tl.float32)
        w_b = tl.zeros((BN,), tl.float32)
        if ROW_TERM:
            g += w_a[:, None] * tl.exp2(s - lse_a[:, None])
        if COL_TERM:
            lse_b = tl.load(lse_b_ptr + cols, mask=col_ok, other=float("inf"))
            w_b = tl.load(w_b_ptr + cols, mask=col_ok, other=0.0)
            g += w_b[None, :] * tl.exp2(s - lse_b[None, :] * LOG2E)
        first_pos = rb * BM + offset
        if (cb * BN < first_pos + BM) & (cb * BN + BN > first_pos):
            is_pos = cols[None, :] == rows[:, None] + offset
            g -= tl.where(is_pos, w_a[:, None] + w_b[None, :], 0.0)
        g = tl.where(col_ok[None, :], g, 0.0)

        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            d_ok = ds < D
            b = tl.load(
                b_ptr + cols[:, None] * stride_b + ds[None, :] * stride_bd,
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            acc_ptrs = acc_rows + ds[None, :]
            acc_ok = row_ok[:, None] & d_ok[None, :]
            if cb == cb_start:  # the chunk's first tile starts the accumulator afresh
                acc = tl.zeros((BM, BD), tl.float32)
            else:
                acc = tl.load(acc_ptrs, mask=acc_ok, other=0.0)
            acc = tl.dot(g.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
            tl.store(acc_ptrs, acc, mask=acc_ok)
        tl.debug_barrier()


@triton.jit
def _finalize_kernel(
    # pointers
    acc_ptr,  # (col_split, n_a, D) fp32 partials of G b
    a_ptr,
    scale_ptr,
    grad_ptr,  # (n_a, D) contiguous gradient, written as s * sum of the partials
    dscale_ptr,  # (n_a,) per-row contribution to dL/ds, written
    # sizes
    n_a,
    D,
    col_split,
    # strides
    stride_a,
    stride_ad,
    # meta-parameters
    BM: tl.constexpr,
    BD: tl.constexpr,
):
    """Sum the workspace partials, scale them into the gradient, and emit <(G b)_i, a_i>."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < n_a
    scale = tl.load(scale_ptr).to(tl.float32)
    dscale = tl.zeros((BM,), tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        ok = row_ok[:, None] & (ds[None, :] < D)
        acc = tl.zeros((BM, BD), tl.float32)
        for c in range(0, col_split):
            partial = acc_ptr + (c * n_a + rows[:, None]) * D + ds[None, :]  # c * n_a < 2**31
            acc += tl.load(partial, mask=ok, other=0.0)
        a = tl.load(a_ptr + rows[:, None] * stride_a + ds[None, :] * stride_ad, mask=ok, other=0.0)
        dscale += tl.sum(acc * a.to(tl.float32), axis=1)
        grad_ptrs = grad_ptr + rows[:, None] * D + ds[None, :]
        tl.store(grad_ptrs, (acc * scale).to(grad_ptr.dtype.element_ty), mask=ok)
    tl.store(dscale_ptr + rows, dscale, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _smem_ok(config: triton.Config, elem_bytes: int = 2) -> bool:
    """Keep configs whose pipelined operand tiles fit in Hopper's 228 KB of shared memory."""
    kw = config.kwargs
    tile = (kw["BM"] + kw["BN"]) * kw["BK"] * elem_bytes * config.num_stages
    return tile <= 160 * 1024


def _prune(configs, named_args, **kwargs):
    elem_bytes = named_args["a_ptr" if "a_ptr" in named_args else "x_ptr"].element_size()
    kept = [c for c in configs if _smem_ok(c, elem_bytes)]
    return kept or configs[:1]


_FORWARD_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 4, 3),
        (64, 128, 64, 4, 3),
        (64, 64, 64, 4, 4),
        (128, 256, 32, 8, 3),
    ]
]
_BACKWARD_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk, "BD": bd}, num_warps=w, num_stages=st)
    for bm, bn, bk, bd, w, st in [
        (64, 128, 64, 128, 8, 3),
        (128, 64, 64, 128, 8, 3),
        (128, 128, 64, 64, 8, 3),
        (64, 128, 64, 64, 4, 3),
        (64, 64, 64, 128, 4, 3),
        (128, 256, 32, 64, 8, 3),
    ]
]
_KEY = ["D", "n_bucket", "HAS_BIAS", "DOT_PRECISION"]
_forward_tuned = triton.autotune(
    _FORWARD_CONFIGS, key=_KEY + ["COL_STATS"], prune_configs_by={"early_config_prune": _prune}
)(_forward_kernel)
_backward_tuned = triton.autotune(
    _BACKWARD_CONFIGS,
    key=_KEY + ["ROW_TERM", "COL_TERM"],
    prune_configs_by={"early_config_prune": _prune},
)(_backward_kernel)


def _launch(kernel, tuned, grid, config: TileConfig | None, args: tuple, meta: dict, blocks):
    """Launch the autotuned kernel, or the plain one with a fixed config (tests, interpreter)."""
    if config is None and not interpreting():
        tuned[grid](*args, **meta)
        return
    config = config or INTERPRETER_CONFIG
    sizes = {name: getattr(config, field) for name, field in blocks.items()}
    kernel[grid(sizes)](
        *args, **meta, **sizes, num_warps=config.num_warps, num_stages=config.num_stages
    )


def _target_programs(device: torch.device) -> int:
    """Enough programs to keep every SM busy for a few waves (a handful under the interpreter)."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 products follow torch's own matmul setting; 16-bit inputs are exact products anyway."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _bucket(n: int) -> int:
    """Autotune key: powers of two, so a new batch size does not trigger a new search."""
    return triton.next_power_of_2(max(n, 1024))


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
    target = _target_programs(x.device)
    row_blocks, col_blocks = triton.cdiv(n_x, MIN_BLOCK), triton.cdiv(n_y, MIN_BLOCK)
    if both_directions:
        row_split = min(row_blocks, MAX_ROW_SPLIT)
    else:
        row_split = row_blocks
    col_split = min(col_blocks, max(1, triton.cdiv(target, row_split)))
    if config is not None:
        row_split = config.row_split or row_split
        col_split = config.col_split or col_split

    kw = {"device": x.device, "dtype": torch.float32}
    row_part = torch.full((col_split, n_x), float("-inf"), **kw)
    col_part = torch.full((row_split, n_y), float("-inf"), **kw) if both_directions else None
    positives = torch.empty(n_x, **kw)
    args = (
        x,
        y,
        scale,
        scale if bias is None else bias,
        row_part,
        row_part if col_part is None else col_part,
        positives,
        n_x,
        n_y,
        D,
        offset,
        _bucket(max(n_x, n_y)),
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
    )
    meta = {
        "HAS_BIAS": bias is not None,
        "COL_STATS": both_directions,
        "DOT_PRECISION": _dot_precision(x.dtype),
    }
    blocks = {"BM": "block_m", "BN": "block_n", "BK": "block_k"}
    _launch(
        _forward_kernel,
        _forward_tuned,
        lambda _: (row_split, col_split),
        config,
        args,
        meta,
        blocks,
    )

    row_lse = torch.logsumexp(row_part * LN2, dim=0)
    col_lse = torch.logsumexp(col_part * LN2, dim=0) if col_part is not None else None
    return row_lse, col_lse, positives * LN2


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
    """s * G b for every row of a (the gradient of a) and the per-row terms of dL/ds."""
    n_a, D = a.shape
    n_b = b.shape[0]
    grad = torch.empty((n_a, D), dtype=a.dtype, device=a.device)
    dscale = torch.empty(n_a, dtype=torch.float32, device=a.device)

    target = _target_programs(a.device)
    col_blocks = triton.cdiv(n_b, MIN_BLOCK)
    col_split = min(col_blocks, max(1, triton.cdiv(target, triton.cdiv(n_a, MIN_BLOCK))))
    if config is not None and config.col_split:
        col_split = config.col_split
    # Rows per launch, so that the workspace stays within its budget.
    slice_rows = min(n_a, max(MIN_BLOCK, WORKSPACE_BYTES // (4 * D * col_split)))
    workspace = torch.zeros((col_split, slice_rows, D), dtype=torch.float32, device=a.device)

    meta = {
        "HAS_BIAS": bias is not None,
        "ROW_TERM": lse_a is not None,
        "COL_TERM": lse_b is not None,
        "DOT_PRECISION": _dot_precision(a.dtype),
    }
    blocks = {"BM": "block_m", "BN": "block_n", "BK": "block_k", "BD": "block_d"}
    finalize_rows = 32
    for start in range(0, n_a, slice_rows):
        stop = min(start + slice_rows, n_a)
        rows = stop - start
        a_rows = a[start:stop]
        dummy = a_rows
        args = (
            a_rows,
            b,
            scale,
            scale if bias is None else bias,
            dummy if lse_a is None else lse_a[start:stop],
            dummy if w_a is None else w_a[start:stop],
            dummy if lse_b is None else lse_b,
            dummy if w_b is None else w_b,
            workspace,
            rows,
            n_b,
            D,
            offset + start,
            _bucket(max(n_a, n_b)),
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
        )
        _launch(
            _backward_kernel,
            _backward_tuned,
            lambda meta, rows=rows: (triton.cdiv(rows, meta["BM"]), col_split),
            config,
            args,
            meta,
            blocks,
        )
        _finalize_kernel[(triton.cdiv(rows, finalize_rows),)](
            workspace,
            a_rows,
            scale,
            grad[start:stop],
            dscale[start:stop],
            rows,
            D,
            col_split,
            a.stride(0),
            a.stride(1),
            BM=finalize_rows,
            BD=min(128, max(16, triton.next_power_of_2(D))),
        )
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
