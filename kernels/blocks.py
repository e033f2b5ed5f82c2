"""Bounded-block gradients: G = dL/dS one block of S at a time, then tensor-core GEMMs.

Both losses have gradients of one shape. With S = s * x y^T + b and G = dL/dS,

    dL/dx = s * G y,   dL/dy = s * G^T x,   dL/ds = sum_ij G_ij <x_i, y_j>,

so once a block G[rows, cols] is formed (by a loss-specific ``form`` callback: a Triton kernel
that recomputes S and writes G, or PyTorch on the CPU), the products are plain GEMMs, which
cuBLAS runs near the tensor cores' peak. This module walks the blocks and owns the accumulators;
it imports only torch, so the PyTorch path uses it too.

Memory. The block buffer G (R x C, in the features' dtype; fp32 for fp32 inputs) is bounded by
``block_bytes``; the other extras are a row panel's fp32 dL/dx accumulator (R x D) and one fp32
dL/dy accumulator (n_y x D, the output itself for fp32 inputs): O(N D) + the buffer at any N.
Blocks are walked row panel by row panel, so only the current panel's dL/dx accumulator is live.

Precision. G is formed in fp32 with the positive pairs' -d_ij already folded in (see the
losses), so its one rounding, to the storage dtype, is relative to each entry; the GEMMs
accumulate in fp32, within a block (cuBLAS) and across blocks (the accumulators).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

# The G buffer's default size on a GPU: bf16 blocks of 8192 x 16384 (see ``plan_blocks``).
BLOCK_BYTES = 256 * 2**20
# On a CPU: about 16 MB, a block whose products stay cache-friendly.
CPU_BLOCK_BYTES = 16 * 2**20
# The smallest side of a block, whatever the bound (small bounds are for tests).
MIN_SIDE = 16

# (rows, cols) -> (G block, fp32 sums): the loss forms G[r0:r1, c0:c1] and the block's share of
# the scalar sums it reports (dL/ds first; SigLIP adds its loss and dL/db).
FormBlock = Callable[[int, int, int, int], tuple[torch.Tensor, torch.Tensor]]


def default_block_bytes(device: torch.device) -> int:
    """The G buffer's bound when none is given: BLOCK_BYTES on CUDA, CPU_BLOCK_BYTES elsewhere."""
    return BLOCK_BYTES if device.type == "cuda" else CPU_BLOCK_BYTES


def _power_of_two(n: int) -> int:
    """The largest power of two <= n, at least MIN_SIDE."""
    return max(MIN_SIDE, 1 << (max(n, 1).bit_length() - 1))


def plan_blocks(n_x: int, n_y: int, element_bytes: int, block_bytes: int) -> tuple[int, int]:
    """(R, C): block rows and columns with R * C * element_bytes <= block_bytes.

    One block when all of n_x x n_y fits. Otherwise R is the largest power of two whose square
    fits and C = 2R where that fits too, else R; where that covers all of n_y (whole rows) or
    n_x, the other side grows into the buffer, still a power of two. Small bounds, for tests,
    give small blocks, at least MIN_SIDE on a side.

    Why powers of two: each block feeds two cuBLAS GEMMs with N = D, G y (M = R, K = C) and
    G^T x (M = C, K = R), whose output tiles number M / 128 * D / 256 (128 x 256 tiles) or
    M / 128 * D / 128. A side of 2^k >= 8192 fills 97% of whole waves on 132 SMs: at D = 512,
    128 or 256 tiles of 128 x 256 (one or two waves); at D = 768, 384 or 768 of 128 x 128.
    The squarest fit of 256 MiB of bf16, 11,520, gives 180 tiles at D = 512: two waves, 68%
    full. Powers of two also divide the usual batch sizes: no ragged edge blocks.

    Accumulator traffic: each block's GEMMs read and write the fp32 rows they add to, R x D of
    dL/dx and C x D of dL/dy: (R + C) D 8 bytes for 4 R C D FLOPs. Bf16 in 256 MiB (2^27
    entries) gives 8192 x 16,384: one block up to N = 11,585, whole rows up to 16,384, 32
    blocks at N = 65,536 and 8192 at 2^20, at any D 2731 FLOPs per accumulator byte (96 MiB a
    block at D = 512, 144 at 768), 5% of the GEMMs' time at 700 TFLOP/s and 4.8 TB/s (H200),
    7% at 600 and 3.35 (H100). Whole rows at 65,536 (2048 x 65,536) give 993 FLOPs per byte
    (15%, 18%), rewrite the whole fp32 dL/dy (128 MiB at D = 512, 192 at 768) every block, and
    G y only 32 tiles at D = 512. The dL/dx panel is R D 4 bytes: 16 MiB at D = 512, 24 at 768.
    """
    elements = max(1, block_bytes // element_bytes)
    if n_x * n_y <= elements:
        return n_x, n_y
    R = min(n_x, _power_of_two(math.isqrt(elements)))
    C = min(n_y, _power_of_two(elements // R))
    if C == n_y:  # whole rows: as many as fit
        R = min(n_x, _power_of_two(elements // C))
    return R, C


def column_references(pdot: torch.Tensor, n_y: int, offset: int) -> torch.Tensor:
    """InfoNCE's column references: each column's positive dot (row j - offset's, from
    ``pdot``), 0 for columns without a positive."""
    ref = torch.zeros(n_y, dtype=pdot.dtype, device=pdot.device)
    ref[offset : offset + pdot.shape[0]] = pdot
    return ref


@functools.cache
def out_dtype_products(device_type: str) -> bool:
    """Does torch multiply 16-bit operands into an fp32 output here (``mm``/``addmm`` with
    ``out_dtype``, cuBLAS writing fp32 straight from its fp32 accumulators)?

    Probed once per device type on tiny operands, since the docstrings are no guide: torch 2.8
    and 2.9 document ``addmm(..., out_dtype=)`` but require its input to have the operands'
    dtype, older torch lacks the argument, and CPUs lack the kernels. A refusal is raised before
    anything runs, so the probe reads nothing back from the device.
    """
    if device_type == "meta":
        return False
    a = torch.zeros((16, 16), dtype=torch.bfloat16, device=device_type)
    acc = torch.zeros((16, 16), dtype=torch.float32, device=device_type)
    try:
        torch.mm(a, a, out_dtype=torch.float32, out=acc)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (m, n) += a (m, k) @ b (k, n), accumulated in acc's dtype (fp32 or fp64).

    16-bit operands go straight to cuBLAS with an fp32 output where torch can
    (``out_dtype_products``); elsewhere they are widened first (exact: a widened 16-bit value is
    an fp32 value), which costs a copy but never a rounding.
    """
    if a.dtype == b.dtype != acc.dtype == torch.float32 and out_dtype_products(acc.device.type):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def matmul_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out (m, n) = a (m, k) @ b (k, n) in fp32, for 16-bit operands straight from cuBLAS where
    torch can (``out_dtype_products``; else widened first, exactly)."""
    if a.dtype != torch.float32 and out_dtype_products(a.device.type):
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        torch.mm(a.float(), b.float(), out=out)


def blocked_gradients(
    x: torch.Tensor,
    y: torch.Tensor,
    grad_scale: torch.Tensor,
    form: FormBlock,
    need_dx: bool,
    need_dy: bool,
    n_sums: int,
    plan: tuple[int, int],
    accumulate: torch.dtype = torch.float32,
    pair_sum: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """dL/dx = grad_scale * G y (n_x, D) and dL/dy = grad_scale * G^T x (n_y, D) in the
    features' dtype (each None unless needed), and the (n_sums,) totals of ``form``'s sums,
    walking the blocks of ``plan`` = (R, C). ``grad_scale`` (one element) is the logit scale
    times whatever factor the loss kept out of G so that G's entries are O(1): in a 16-bit
    buffer, small entries stay above fp16's subnormals.

    ``form`` is called for every block even when neither gradient is needed (the sums alone).
    Its G is in the features' dtype (16-bit inputs feed the GEMMs at tensor-core rate) or in
    ``accumulate``. ``pair_sum``: also sum_ij G_ij <x_i, y_j> = sum_i <(G y)_i, x_i>, from the
    fp32 products (for forms that do not sum it themselves), appended to the totals.
    """
    n_x, D = x.shape
    n_y = y.shape[0]
    R, C = plan
    s = grad_scale.reshape(()).to(accumulate)
    rows_product = need_dx or (pair_sum and not need_dy)  # G y, for dL/dx or for the pair sum
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else None
    dy_acc = torch.zeros((n_y, D), dtype=accumulate, device=x.device) if need_dy else None
    sums = torch.zeros(n_sums + pair_sum, dtype=accumulate, device=x.device)
    for r0 in range(0, n_x, R):
        r1 = min(r0 + R, n_x)
        panel = (
            torch.zeros((r1 - r0, D), dtype=accumulate, device=x.device) if rows_product else None
        )
        for c0 in range(0, n_y, C):
            c1 = min(c0 + C, n_y)
            g, block_sums = form(r0, r1, c0, c1)  # (r1 - r0, c1 - c0)
            sums[:n_sums] += block_sums
            if rows_product:
                accumulate_mm(panel, g, y[c0:c1])
            if need_dy:
                accumulate_mm(dy_acc[c0:c1], g.T, x[r0:r1])
        if pair_sum and rows_product:
            sums[n_sums] += torch.linalg.vecdot(panel, x[r0:r1].to(accumulate)).sum()
        if need_dx:
            dx[r0:r1] = panel.mul_(s)
    if pair_sum and not rows_product:
        sums[n_sums] = torch.linalg.vecdot(dy_acc, y.to(accumulate)).sum()
    dy = dy_acc.mul_(s).to(y.dtype) if need_dy else None
    return dx, dy, sums
