"""The host-side drivers of the pairwise kernels.

- ``sweep_blocks``: the bounded-block walk (``blocks.blocked_gradients``) with G formed by a
  Triton kernel, one BM x BN tile per program: the backward of both losses' "blocks" and
  "blocks-mm" implementations.
- ``sweep_rows``: a row-owning sweep accumulating G b in private fp32 workspaces: SigLIP's
  loss-only forward and the "fused" backwards (``finalize_kernel`` sums the partials).
- ``positive_dots``: the positive pairs' dots.
"""

from __future__ import annotations

import torch
import triton

from .blocks import blocked_gradients, default_block_bytes, matmul_f32, plan_blocks
from .jit import combine_kernel, finalize_kernel, row_dot_kernel, side_stats_kernel
from .launch import (
    BLOCKS_MIN,
    MIN_BLOCK,
    ROWS,
    STATS,
    TileConfig,
    bucket,
    dot_precision,
    launch,
    persistent_programs,
    row_block_d,
    target_programs,
    tma,
)


def positive_dots(x: torch.Tensor, y: torch.Tensor, offset: int) -> torch.Tensor:
    """<x_i, y_i+offset> for every row of x: (n_x,) fp32."""
    n, D = x.shape
    partners = y[offset : offset + n]
    dots = torch.empty(n, device=x.device, dtype=torch.float32)
    row_dot_kernel[(triton.cdiv(n, ROWS),)](
        x_ptr=x,
        y_ptr=partners,
        out_ptr=dots,
        n=n,
        D=D,
        stride_x=x.stride(0),
        stride_xd=x.stride(1),
        stride_y=partners.stride(0),
        stride_yd=partners.stride(1),
        BM=ROWS,
        BD=row_block_d(D),
    )
    return dots


def combine(part: torch.Tensor) -> torch.Tensor:
    """The natural log-sum-exp over dim 0 of (splits, n) fp32 base-2 partials: (n,), one launch
    (where ``torch.logsumexp(part * ln 2, 0)`` takes several)."""
    splits, n = part.shape
    out = torch.empty(n, dtype=torch.float32, device=part.device)
    combine_kernel[(triton.cdiv(n, STATS),)](part, out, splits, n, BLOCK=STATS)
    return out


def side_stats(pdot: torch.Tensor, m: torch.Tensor, w: torch.Tensor, w_scale: float,
               offset: int | None = None) -> torch.Tensor:  # fmt: skip
    """(4, n) fp32 statistics of one softmax (``jit.side_stats_kernel``), one launch: the rows'
    (offset None; n = n_x) or the columns' (n = len(m), the column j's positive row j - offset)."""
    n = m.shape[0]
    out = torch.empty((4, n), dtype=torch.float32, device=m.device)
    side_stats_kernel[(triton.cdiv(n, STATS),)](
        pdot, m, w, out, n, pdot.shape[0], offset or 0, W_SCALE=w_scale,
        COLUMNS=offset is not None, BLOCK=STATS,
    )  # fmt: skip
    return out


def split_columns(n_a: int, n_b: int, device: torch.device, config: TileConfig | None) -> int:
    """Column chunks per row block: enough programs to fill the GPU when n_a is small."""
    if config is not None and config.col_split:
        return config.col_split
    col_blocks = triton.cdiv(n_b, MIN_BLOCK)
    row_blocks = triton.cdiv(n_a, MIN_BLOCK)
    return min(col_blocks, max(1, triton.cdiv(target_programs(device), row_blocks)))


def sweep_rows(
    kernel,
    tuned,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    config: TileConfig | None,
    args_of,
    *,
    n_parts: int,
    grad_scale: torch.Tensor | None = None,
    workspace_bytes: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Drive a row-owning sweep of a's rows against b: the fused backward of both losses, and
    SigLIP's loss alone.

    Each program owns a block of a's rows and a chunk of b's column blocks (``split_columns``),
    and accumulates G b over its chunk in a private slice of an fp32 workspace: deterministic,
    no atomics. Rows run in slices whose (col_split, rows, D) workspace stays within
    ``workspace_bytes`` (``blocks.default_block_bytes`` when None); ``finalize_kernel`` then
    sums each slice's partials into the gradient.

    ``args_of(rows)`` returns the kernel's own arguments for the row slice ``rows`` (its loss
    statistics, pairing, flags); the driver adds a, b, scale, the workspace and a buffer of
    ``n_parts`` per-row partial sums (``store_parts``) as ``a_ptr``, ``b_ptr``, ``scale_ptr``,
    ``acc_ptr``, ``parts_ptr``, with sizes, strides and DOT_PRECISION. ``grad_scale`` (one
    element: the logit scale times the factor the loss kept out of G) scales the gradient;
    None: a sweep that accumulates nothing (its sums alone), all rows at once.

    Returns dL/da = grad_scale * G b (n_a, D) in a's dtype, or None, and the (n_parts,) totals
    of the partial sums.
    """
    gradient = grad_scale is not None
    n_a, D = a.shape
    n_b = b.shape[0]
    col_split = split_columns(n_a, n_b, a.device, config)
    workspace_bytes = workspace_bytes or default_block_bytes(a.device)
    slice_rows = min(n_a, max(MIN_BLOCK, workspace_bytes // (4 * D * col_split)))
    if not gradient:
        slice_rows = n_a
    f32 = {"dtype": torch.float32, "device": a.device}
    workspace = torch.zeros((col_split, slice_rows, D if gradient else 0), **f32)
    grad = torch.empty((n_a, D), dtype=a.dtype, device=a.device) if gradient else None
    totals = torch.zeros(n_parts, **f32)
    for start in range(0, n_a, slice_rows):
        rows = slice(start, min(start + slice_rows, n_a))
        n_rows = rows.stop - start
        parts = torch.empty((n_parts, col_split, n_rows), **f32)
        common = dict(
            a_ptr=a[rows],
            b_ptr=b,
            scale_ptr=scale,
            acc_ptr=workspace,
            parts_ptr=parts,
            n_a=n_rows,
            n_b=n_b,
            D=D,
            n_bucket=bucket(max(n_a, n_b)),
            stride_a=a.stride(0),
            stride_ad=a.stride(1),
            stride_b=b.stride(0),
            stride_bd=b.stride(1),
            DOT_PRECISION=dot_precision(a.dtype),
        )
        grid = lambda meta, n=n_rows: (triton.cdiv(n, meta["BM"]), col_split)  # noqa: E731
        launch(kernel, tuned, grid, config, {**common, **args_of(rows)})
        totals += parts.sum(dim=(1, 2))
        if gradient:
            finalize_kernel[(triton.cdiv(n_rows, ROWS),)](
                acc_ptr=workspace,
                scale_ptr=grad_scale,
                grad_ptr=grad[rows],
                n_a=n_rows,
                D=D,
                col_split=col_split,
                BM=ROWS,
                BD=row_block_d(D),
            )
    return grad, totals


def sweep_blocks(
    kernel,
    tuned,
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    grad_scale: torch.Tensor,
    config: TileConfig | None,
    args_of,
    n_sums: int,
    need_dx: bool,
    need_dy: bool,
    dots_by_gemm: bool = False,
    block_bytes: int | None = None,
    persistent: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Drive a bounded-block gradient (``blocks.blocked_gradients``) whose G comes from a
    Triton kernel, one BM x BN tile per program: the fast backward of both losses.

    The driver owns the buffers (G in x's dtype, the fp32 dots when ``dots_by_gemm`` lets cuBLAS
    compute them, the programs' partial sums) and passes the kernel the block's operands as
    ``a_ptr`` (x's rows) and ``b_ptr`` (y's rows), ``dots_ptr``, ``scale_ptr``, ``g_ptr`` and
    ``sums_ptr`` (n_sums, programs; its row stride ``stride_sums`` where n_sums > 1) with
    sizes, strides, DOTS_GIVEN and DOT_PRECISION;
    ``args_of(r0, r1, c0, c1)`` adds the loss's own (statistics, pairing, flags).
    ``persistent``: the kernel runs as one wave of ``launch.persistent_programs`` programs that
    share the block's tiles (``persistent.py``), each writing its sums at ``sums_ptr`` +
    program; it reads and writes through TMA descriptors (G's rows padded to 16 bytes for
    them) and takes no dots (no ``dots_ptr``, ``stride_dots``, DOTS_GIVEN, TMA).

    Returns grad_scale * G y, grad_scale * G^T x (each None unless needed) and the (n_sums,)
    totals of the sums.
    """
    n_x, D = x.shape
    n_y = y.shape[0]
    element = x.element_size() + (4 if dots_by_gemm else 0)
    R, C = plan_blocks(n_x, n_y, element, block_bytes or default_block_bytes(x.device))
    f32 = {"dtype": torch.float32, "device": x.device}
    pad = 16 // x.element_size() if persistent else 1  # G's rows: a multiple of 16 bytes
    g_buffer = torch.empty(R * triton.cdiv(C, pad) * pad, dtype=x.dtype, device=x.device)
    dots_buffer = torch.empty(R * C if dots_by_gemm else 0, **f32)
    if persistent:
        programs = persistent_programs(x.device, config)
    else:
        programs = triton.cdiv(R, BLOCKS_MIN) * triton.cdiv(C, BLOCKS_MIN)
    sums = torch.empty((n_sums, programs), **f32)

    def form(r0: int, r1: int, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_a, n_b = r1 - r0, c1 - c0
        a, b = x[r0:r1], y[c0:c1]
        ld = triton.cdiv(n_b, pad) * pad
        g = g_buffer[: n_a * ld].view(n_a, ld)[:, :n_b]
        dots = dots_buffer[: n_a * n_b].view(n_a, n_b) if dots_by_gemm else g
        if dots_by_gemm:
            matmul_f32(a, b.T, out=dots)
        common = dict(
            a_ptr=a,
            b_ptr=b,
            scale_ptr=scale,
            g_ptr=g,
            sums_ptr=sums,
            n_a=n_a,
            n_b=n_b,
            D=D,
            n_bucket=bucket(max(n_x, n_y)),
            stride_a=a.stride(0),
            stride_ad=a.stride(1),
            stride_b=b.stride(0),
            stride_bd=b.stride(1),
            stride_g=g.stride(0),
            DOT_PRECISION=dot_precision(x.dtype),
        )
        if n_sums > 1:
            common["stride_sums"] = sums.stride(0)
        if persistent:  # every program writes its sums
            grid = lambda meta: (programs,)  # noqa: E731
        else:
            common.update(dots_ptr=dots, stride_dots=dots.stride(0), DOTS_GIVEN=dots_by_gemm,
                          TMA=not dots_by_gemm and tma(a, b))  # fmt: skip
            grid = lambda meta: (triton.cdiv(n_a, meta["BM"]), triton.cdiv(n_b, meta["BN"]))  # noqa: E731
            sums.zero_()  # the launched config's programs write the first of them
        launch(kernel, tuned, grid, config, {**common, **args_of(r0, r1, c0, c1)})
        return g, sums.sum(dim=1)

    return blocked_gradients(x, y, grad_scale, form, need_dx, need_dy, n_sums, (R, C))
