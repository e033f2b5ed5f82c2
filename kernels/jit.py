"""Triton building blocks of fastclip's pairwise kernels: similarity tiles, the bounded-block
tile, the fused sweeps' accumulators, the persistent sweeps' epilogue pieces, and the row-wise
kernels (positive dots, finalize, the statistics' combine).

The pairwise losses (InfoNCE in ``contrastive.py``, SigLIP in ``siglip.py``) score every row of
``a`` (n_a, D) against every row of ``b`` (n_b, D) tile by tile. Their gradients have the shape
dL/da = s G b, with G = dL/dS formed per tile in fp32 with the positive pairs' -d_ij already
folded in. Launch configuration is in ``launch.py``, the host-side drivers in ``sweeps.py``.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

LOG2E = tl.constexpr(math.log2(math.e))  # exp(x) = exp2(x * LOG2E)
LN2_C = tl.constexpr(math.log(2.0))
# A finite "minus infinity" for running maxima: max(-inf, -inf) - -inf would be NaN, and a row
# whose every logit is masked (a lone pair) must come out as an empty sum, 2^NEG = 0.
NEG = tl.constexpr(-1e30)
# The one-exponential paths' guard (base-2 logits): a tile whose rows' and columns' largest
# logits all lie within RANGE of its largest keeps every term within 2^-62 of its row's or
# column's largest above fp32's smallest normal number, 2^-126.
RANGE = tl.constexpr(64.0)


@triton.jit
def similarity_tile(a_rows, b_rows, a_ok, b_ok, D, stride_ad, stride_bd, BK: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):  # fmt: skip
    """<a_i, b_j> for a tile in fp32, from row pointers a_rows (BM,) and b_rows (BN,).

    Each step loads from the fixed pointer tiles plus k0 rather than from pointer tiles carried
    and advanced through the loop: the software pipeline then holds one set of addresses."""
    ks = tl.arange(0, BK)
    a_ptrs = a_rows[:, None] + ks[None, :] * stride_ad
    b_ptrs = b_rows[:, None] + ks[None, :] * stride_bd
    acc = tl.zeros((a_rows.shape[0], b_rows.shape[0]), dtype=tl.float32)
    for k0 in range(0, D, BK):
        a = tl.load(a_ptrs + k0 * stride_ad, mask=a_ok[:, None] & (ks[None, :] < D - k0), other=0.0)
        b = tl.load(b_ptrs + k0 * stride_bd, mask=b_ok[:, None] & (ks[None, :] < D - k0), other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def operand(ptr, n, D, stride, BR: tl.constexpr, BK: tl.constexpr, TMA: tl.constexpr):
    """How a kernel reads an operand's (n, D) rows: with TMA a tensor descriptor of (BR, BK)
    boxes (the copy engine fetches them, rows and features past the ends read as 0), else the
    base pointer itself."""
    if TMA:  # one return: the compiler types every return of a function alike
        rows = tl.make_tensor_descriptor(ptr, shape=[n, D], strides=[stride, 1],
                                         block_shape=[BR, BK])  # fmt: skip
    else:
        rows = ptr
    return rows


@triton.jit
def tile_dots(a, b, row0, col0, D, stride_a, stride_ad, stride_b, stride_bd, row_ok, col_ok,
              BK: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """<a_i, b_j> (fp32) for the tile of rows row0 + arange(BM) of a (``row_ok`` their mask)
    and rows col0 + arange(BN) of b, the operands as ``operand`` returned them: through their
    descriptors with TMA, else ``similarity_tile``."""
    if TMA:  # one return (see ``operand``); the other branch is not even compiled
        acc = tl.zeros((row_ok.shape[0], col_ok.shape[0]), dtype=tl.float32)
        for k0 in range(0, D, BK):
            a_tile = a.load([row0, k0])
            b_tile = b.load([col0, k0])
            acc = tl.dot(a_tile, tl.trans(b_tile), acc, input_precision=DOT_PRECISION)
    else:
        a_rows = a + (row0 + tl.arange(0, row_ok.shape[0])).to(tl.int64) * stride_a
        b_rows = b + (col0 + tl.arange(0, col_ok.shape[0])).to(tl.int64) * stride_b
        acc = similarity_tile(a_rows, b_rows, row_ok, col_ok, D, stride_ad, stride_bd, BK=BK,
                              DOT_PRECISION=DOT_PRECISION)  # fmt: skip
    return acc


@triton.jit
def pairs_of(rows, cols, offset):
    """(BM, BN) mask of the positive pairs among rows (BM,) and columns (BN,), int32 indices:
    row i's partner is column i + offset. Indices that change from tile to tile keep the
    compiler from holding a tile-sized constant in registers across the loops."""
    return cols[None, :] == (rows + offset)[:, None]


@triton.jit
def tile_offsets(BM: tl.constexpr, BN: tl.constexpr, stride):
    """(BM, BN) int32 offsets of a row-major tile with row stride ``stride``, to add to the
    tile's 64-bit base pointer: 32-bit arithmetic per element rather than 64-bit."""
    return tl.arange(0, BM)[:, None] * stride + tl.arange(0, BN)[None, :]


@triton.jit
def block_tile(a_ptr, b_ptr, dots_ptr, n_a, n_b, D, stride_a, stride_ad, stride_b, stride_bd,
               stride_dots, DOTS_GIVEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               TMA: tl.constexpr):  # fmt: skip
    """The tile of a G block that program (m, n) owns: its rows and columns (int32), the mask
    of its valid entries, and its dots <a_i, b_j> in fp32, computed (1 matmul pass over the
    grid) or, with DOTS_GIVEN, read from a GEMM's fp32 output (row stride ``stride_dots``)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < n_a
    col_ok = cols < n_b
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if DOTS_GIVEN:
        dots_tile = dots_ptr + (pid_m * BM).to(tl.int64) * stride_dots + pid_n * BN
        dots = tl.load(dots_tile + tile_offsets(BM, BN, stride_dots), mask=tile_ok, other=0.0)
    else:
        a = operand(a_ptr, n_a, D, stride_a, BM, BK, TMA)
        b = operand(b_ptr, n_b, D, stride_b, BN, BK, TMA)
        dots = tile_dots(a, b, pid_m * BM, pid_n * BN, D, stride_a=stride_a, stride_ad=stride_ad,
                         stride_b=stride_b, stride_bd=stride_bd, row_ok=row_ok, col_ok=col_ok,
                         BK=BK, DOT_PRECISION=DOT_PRECISION, TMA=TMA)  # fmt: skip
    return rows, cols, tile_ok, dots


@triton.jit
def store_tile(out_ptr, values, stride, tile_ok, BM: tl.constexpr, BN: tl.constexpr):
    """Store program (m, n)'s (BM, BN) tile of ``values`` in out's dtype (row stride
    ``stride``)."""
    base = out_ptr + (tl.program_id(0) * BM).to(tl.int64) * stride + tl.program_id(1) * BN
    tl.store(base + tile_offsets(BM, BN, stride), values.to(out_ptr.dtype.element_ty), mask=tile_ok)


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
    base plus int32 row and column offsets, not a 64-bit pointer per row or element, keeps the
    addresses held across the column loop few); ``fresh`` overwrites instead.
    """
    g = g.to(b_ptr.dtype.element_ty)
    b_blk = b_ptr + tl.cast(cb, tl.int64) * BN * stride_b
    b_offs = tl.arange(0, BN)[:, None] * stride_b + tl.arange(0, BD)[None, :] * stride_bd
    acc_rows = tl.arange(0, BM) * D
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        d_ok = ds < D
        b = tl.load(b_blk + d0 * stride_bd + b_offs, mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)  # fmt: skip
        acc_ptrs = acc_blk + (acc_rows[:, None] + ds[None, :])
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
    acc_rows = tl.arange(0, BM) * D
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        ok = row_ok[:, None] & (ds < D)[None, :]
        tl.store(acc_blk + (acc_rows[:, None] + ds[None, :]), tl.zeros((BM, BD), tl.float32),
                 mask=ok)  # fmt: skip


@triton.jit
def finalize_kernel(
    # pointers
    acc_ptr,  # (col_split, n_a, D) fp32 partials of G b
    scale_ptr,  # the gradient's scale
    grad_ptr,  # (n_a, D) contiguous gradient, written
    # sizes
    n_a,
    D,
    col_split,
    # meta-parameters
    BM: tl.constexpr,
    BD: tl.constexpr,
):
    """The gradient s (G b)_i, (G b)_i the sum of the column chunks' partials, cast to the
    gradient's dtype. O(n_a D) work, no N^2 D pass."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < n_a
    scale = tl.load(scale_ptr).to(tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        ok = row_ok[:, None] & (ds[None, :] < D)
        acc = tl.zeros((BM, BD), tl.float32)
        for c in range(0, col_split):
            partial = acc_ptr + (c * n_a + rows[:, None]) * D + ds[None, :]  # c * n_a < 2**31
            acc += tl.load(partial, mask=ok, other=0.0)
        grad = (acc * scale).to(grad_ptr.dtype.element_ty)
        tl.store(grad_ptr + rows[:, None] * D + ds[None, :], grad, mask=ok)


@triton.jit
def store_parts(parts_ptr, sums, k, rows, row_ok, n_a):
    """Store a program's per-row partial sum number k, (BM,), in the (n_parts, col_split, n_a)
    buffer of ``sweep_rows``."""
    chunk = tl.program_id(1).to(tl.int64)
    tl.store(parts_ptr + (k * tl.num_programs(1) + chunk) * n_a + rows, sums, mask=row_ok)


@triton.jit
def row_dot_kernel(
    x_ptr, y_ptr, out_ptr, n, D, stride_x, stride_xd, stride_y, stride_yd,
    BM: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """out_i = <x_i, y_i> in fp32, for the positive pairs' dots (y already offset by the
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


@triton.jit
def logaddexp2(a, b):
    """log2(2^a + 2^b), -inf when both are."""
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return tl.where(hi == float("-inf"), hi, hi + tl.log2(1.0 + tl.exp2(lo - hi)))


@triton.jit
def merge_lse(row_max, row_sum, tile_max, tile_sum):
    """The online log-sum-exp: running (max, sum of 2^(x - max)) with a tile's."""
    new_max = tl.maximum(row_max, tile_max)
    return new_max, row_sum * tl.exp2(row_max - new_max) + tile_sum * tl.exp2(tile_max - new_max)


@triton.jit
def two_exp_statistics(dots, pairs, row_ok, col_ok, x_ref, y_ref, scale2, row_max, row_sum,
                        COL_STATS: tl.constexpr):  # fmt: skip
    """A tile's rows merged into the running (max, sum) and its columns' log-sum-exp, each
    relative to its own positive and maximum (base 2): S_ij - S_i,pos as the difference of
    the dots first, then one rounding; the positive and padding entries masked out."""
    u = (dots - x_ref[:, None]) * scale2
    u = tl.where(pairs | ~col_ok[None, :], float("-inf"), u)
    tile_max = tl.maximum(tl.max(u, axis=1), NEG)
    row_max, row_sum = merge_lse(row_max, row_sum, tile_max,
                              tl.sum(tl.exp2(u - tile_max[:, None]), axis=1))  # fmt: skip
    c_lse = tl.full(y_ref.shape, float("-inf"), tl.float32)
    if COL_STATS:
        v = (dots - y_ref[None, :]) * scale2
        v = tl.where(pairs | ~row_ok[:, None], float("-inf"), v)
        c_max = tl.maximum(tl.max(v, axis=0), NEG)
        c_lse = c_max + tl.log2(tl.sum(tl.exp2(v - c_max[None, :]), axis=0))
    return row_max, row_sum, c_lse


@triton.jit
def one_exp_statistics(t, top, x_ref, y_ref, scale2, row_max, row_sum):
    """``two_exp_statistics`` from one exponential, e = 2^(t - top), t the tile's masked base-2
    logits and top their maximum (see RANGE): the tile's log-sum-exps of S_ij - S_i,pos over j
    and of S_ij - S_pos,j over i are top - S_pos + log2(sum e)."""
    e = tl.exp2(t - top)
    r_lse = top - x_ref * scale2 + tl.log2(tl.sum(e, axis=1))
    row_max, row_sum = merge_lse(row_max, row_sum, r_lse, 1.0)
    return row_max, row_sum, top - y_ref * scale2 + tl.log2(tl.sum(e, axis=0))


@triton.jit
def atanh_series(t):
    """2 atanh(t) = log((1 + t) / (1 - t)) for t in [0, 1/3] (log(1 + e) at t = e / (2 + e)):
    a series in t^2 <= 1/9 whose 8 terms reach fp32 precision."""
    w = t * t
    p = 1.0 / 15.0
    p = p * w + 1.0 / 13.0
    p = p * w + 1.0 / 11.0
    p = p * w + 1.0 / 9.0
    p = p * w + 1.0 / 7.0
    p = p * w + 1.0 / 5.0
    p = p * w + 1.0 / 3.0
    p = p * w + 1.0
    return 2.0 * t * p


@triton.jit
def log1p_unit(e):
    """log(1 + e) for e in [0, 1] to a few ulps, without log1p (the interpreter lacks libdevice,
    and a fast log2(1 + e) loses e's low bits when e is small): ``atanh_series`` of
    e / (2 + e)."""
    return atanh_series(e / (2.0 + e))


@triton.jit
def column_reference(pdot_ptr, cols, col_ok, n_x, offset):
    """Column j's positive dot, <x_{j - offset}, y_j> from the rows' ``pdot``; 0 for a column
    without a positive (its weight is 0 too)."""
    src = cols - offset
    return tl.load(pdot_ptr + src, mask=col_ok & (src >= 0) & (src < n_x), other=0.0)


@triton.jit
def combine_kernel(part_ptr, out_ptr, splits, n, BLOCK: tl.constexpr):
    """out_j = ln(sum_k 2^(p_kj)) of a sweep's (splits, n) base-2 partial statistics p, in one
    launch (-inf where every partial is). O(splits n) work, no N^2 D pass."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    top = tl.full((BLOCK,), float("-inf"), tl.float32)
    ptrs = part_ptr + cols
    for _ in range(0, splits):
        top = tl.maximum(top, tl.load(ptrs, mask=ok, other=float("-inf")))
        ptrs += n
    ref = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros((BLOCK,), tl.float32)
    ptrs = part_ptr + cols
    for _ in range(0, splits):
        total += tl.exp2(tl.load(ptrs, mask=ok, other=float("-inf")) - ref)
        ptrs += n
    tl.store(out_ptr + cols, (ref + tl.log2(total)) * LN2_C, mask=ok)


@triton.jit
def side_stats_kernel(pdot_ptr, m_ptr, w_ptr, out_ptr, n, n_x, offset, W_SCALE: tl.constexpr,
                      COLUMNS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """(4, n) statistics of one softmax for the gradient kernels, in one launch: the reference
    dot (row i's positive, ``pdot``; for COLUMNS, ``column_reference``), softplus(m) / ln 2,
    the weight w times W_SCALE, and that times sigmoid(m) = 1 - p_pair. softplus and
    sigmoid share e = exp(-|m|): max(m, 0) + log1p(e) and (1 or e) / (1 + e), exact in both
    tails (m = -inf, a row without other logits: 0 and 0)."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = j < n
    if COLUMNS:
        ref = column_reference(pdot_ptr, j, ok, n_x, offset)
    else:
        ref = tl.load(pdot_ptr + j, mask=ok, other=0.0)
    m = tl.load(m_ptr + j, mask=ok, other=0.0)
    w = tl.load(w_ptr + j, mask=ok, other=0.0) * W_SCALE
    e = tl.exp2(-tl.abs(m) * LOG2E)
    softplus = tl.maximum(m, 0.0) + log1p_unit(e)
    sigmoid = tl.where(m >= 0, 1.0, e) / (1.0 + e)
    tl.store(out_ptr + j, ref, mask=ok)
    tl.store(out_ptr + n + j, softplus / LN2_C, mask=ok)
    tl.store(out_ptr + 2 * n + j, w, mask=ok)
    tl.store(out_ptr + 3 * n + j, w * sigmoid, mask=ok)


@triton.jit
def reciprocal_unit(d):
    """1 / d for d in [1, 2] on the FMA units, no special-function operation: the linear
    minimax start 24/17 - 8/17 d (relative error <= 1/17), then three Newton steps
    r <- r + r (1 - d r), each squaring the error (1/17 -> 3.5e-3 -> 1.2e-5 -> 1.5e-10)."""
    r = 24.0 / 17.0 - (8.0 / 17.0) * d
    r = r + r * (1.0 - d * r)
    r = r + r * (1.0 - d * r)
    return r + r * (1.0 - d * r)


@triton.jit
def holds_pairs(row0, col0, offset, BM: tl.constexpr, BN: tl.constexpr):
    """Does the tile of rows [row0, row0 + BM) and columns [col0, col0 + BN) hold a positive
    pair (row i's partner is column i + offset)?"""
    return (row0 + offset < col0 + BN) & (col0 < row0 + BM + offset)


@triton.jit
def halves(tile, BM: tl.constexpr, BN: tl.constexpr):
    """A (BM, BN) tile's two (BM, BN / 2) column halves: an epilogue run half by half keeps half
    its temporaries live (a 128 x 128 tile on 8 warps then needs no spill)."""
    return tl.split(tl.permute(tl.reshape(tile, (BM, 2, BN // 2)), (0, 2, 1)))


@triton.jit
def dead_of(rows, cols, offset, row_ok, col_ok):
    """(BM, BN) mask of a tile's entries outside the softmaxes: positive pairs and padding."""
    return pairs_of(rows, cols, offset) | ~(row_ok[:, None] & col_ok[None, :])


@triton.jit
def store_g(g_ptr, g, row0, col0, n_a, n_b, stride_g, BM: tl.constexpr, BN: tl.constexpr):
    """Store a tile of G in g's dtype through a TMA descriptor, which clips the edges."""
    desc = tl.make_tensor_descriptor(g_ptr, shape=[n_a, n_b], strides=[stride_g, 1],
                                     block_shape=[BM, BN])  # fmt: skip
    desc.store([row0, col0], g.to(g_ptr.dtype.element_ty))


@triton.jit
def persistent_tile(a, b, t, tiles_n, n_a, n_b, D, stride_a, stride_ad, stride_b, stride_bd,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):  # fmt: skip
    """Tile t of a persistent G kernel's row-major schedule (tiles_n column tiles a row panel),
    its operands through TMA descriptors: (row0, col0, rows, row_ok) and its dots' two
    column halves (``halves``), for an epilogue run half by half."""
    rb = t // tiles_n
    row0 = rb * BM
    col0 = (t - rb * tiles_n) * BN
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < n_a
    col_ok = col0 + tl.arange(0, BN) < n_b
    dots = tile_dots(a, b, row0, col0, D, stride_a=stride_a, stride_ad=stride_ad,
                     stride_b=stride_b, stride_bd=stride_bd, row_ok=row_ok, col_ok=col_ok, BK=BK,
                     DOT_PRECISION=DOT_PRECISION, TMA=True)  # fmt: skip
    d0, d1 = halves(dots, BM, BN)
    return row0, col0, rows, row_ok, d0, d1


@triton.jit
def base2_affine(scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    """(s, b) times log2(e): the base-2 logits are <a_i, b_j> * scale2 + bias2."""
    scale2 = tl.load(scale_ptr).to(tl.float32) * LOG2E
    bias2 = 0.0
    if HAS_BIAS:
        bias2 = tl.load(bias_ptr).to(tl.float32) * LOG2E
    return scale2, bias2
