"""Tiled similarity matrices and fused top-k retrieval.

Math. For a (n_a, D) and b (n_b, D), optionally normalized row-wise (x / max(||x||, eps), as
``F.normalize``),

    S_ij = scale * <a_i, b_j> + bias.

``similarity_forward`` writes S tile by tile (1 matmul pass of n_a n_b D; the normalization is a
per-row and per-column factor in the epilogue, from O(N D) row norms). Its backward is two plain
products of the given dS (G y and G^T x) and runs on torch's matmul.

``topk_forward`` never writes S: each program walks its query block over a chunk of the keys,
keeping each query's best K_PAD (k rounded up to a power of two) scores in registers. A tile
that holds no score above a query block's current k-th best is skipped after its product; the
others are sorted and merged: a score and its key index are packed into one int64 whose order
is the score's (an order-preserving map of the float's bits in the high word, the bit-inverted
index in the low word, so that equal scores keep the lower index), and a descending sort of the
packed row keeps the best. The chunks' top-k lists are merged by ``torch.topk`` afterwards.
1 matmul pass of n_q n_k D; memory O((n_q + n_k) D + n_q k splits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .jit import (
    column_chunk,
    row_dot_kernel,
    similarity_tile,
)
from .launch import (
    INTERPRETER_CONFIG,
    ROWS,
    TileConfig,
    configs,
    dot_precision,
    interpreting,
    launch,
    prune_configs,
    row_block_d,
    target_programs,
)


@triton.jit
def _similarity_kernel(
    # pointers
    a_ptr,
    b_ptr,
    out_ptr,  # (n_a, n_b), written
    scale_ptr,
    bias_ptr,
    inv_a_ptr,
    inv_b_ptr,  # (n_a,), (n_b,) inverse row norms (NORMALIZE)
    # sizes
    n_a,
    n_b,
    D,
    # strides
    stride_a,
    stride_ad,
    stride_b,
    stride_bd,
    stride_o,
    stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP: tl.constexpr,
):
    """S = scale * a b^T + bias for one (BM, BN) output tile: 1 matmul pass of n_a n_b D overall.

    Programs run in groups of GROUP row blocks sweeping the same columns, so that the b tiles
    they share stay in L2 (the Triton matmul tutorial's ordering).
    """
    pid = tl.program_id(0)
    n_rb, n_cb = tl.cdiv(n_a, BM), tl.cdiv(n_b, BN)
    group = pid // (GROUP * n_cb)
    first_rb = group * GROUP
    rows_in_group = tl.minimum(n_rb - first_rb, GROUP)
    rb = first_rb + (pid % (GROUP * n_cb)) % rows_in_group
    cb = (pid % (GROUP * n_cb)) // rows_in_group

    rows = (rb * BM + tl.arange(0, BM)).to(tl.int64)
    cols = (cb * BN + tl.arange(0, BN)).to(tl.int64)
    row_ok, col_ok = rows < n_a, cols < n_b
    s = similarity_tile(a_ptr + rows * stride_a, b_ptr + cols * stride_b, row_ok, col_ok, D,
                        stride_ad, stride_bd, BK=BK, DOT_PRECISION=DOT_PRECISION)  # fmt: skip
    if NORMALIZE:
        inv_a = tl.load(inv_a_ptr + rows, mask=row_ok, other=0.0)
        inv_b = tl.load(inv_b_ptr + cols, mask=col_ok, other=0.0)
        s = s * inv_a[:, None] * inv_b[None, :]
    s = s * tl.load(scale_ptr).to(tl.float32)
    if HAS_BIAS:
        s += tl.load(bias_ptr).to(tl.float32)
    out = out_ptr + rows[:, None] * stride_o + cols[None, :] * stride_on
    tl.store(out, s.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _pack(score, index):
    """int64 keys ordered as (score, -index): the float's bits mapped to an order-preserving int32
    in the high word, the bit-inverted index in the low word."""
    bits = score.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(score != score, 0x7FFFFFFF, key)  # every NaN ranks first, as in torch.topk
    return (key.to(tl.int64) << 32) | (index.to(tl.int64) ^ 0xFFFFFFFF)


@triton.jit
def _top_k_of_sorted(sorted_rows, BM: tl.constexpr, WIDTH: tl.constexpr, K: tl.constexpr):
    """The first K columns of rows sorted in descending order: in a descending row, column j of
    the first K-wide chunk is >= column j of every later chunk, so it is their maximum."""
    return tl.max(tl.reshape(sorted_rows, (BM, WIDTH // K, K)), axis=1)


@triton.jit
def _topk_kernel(
    # pointers
    q_ptr,
    k_ptr,
    scale_ptr,
    inv_q_ptr,
    inv_k_ptr,  # (n_q,), (n_k,) inverse row norms (NORMALIZE)
    out_ptr,  # (col_split, n_q, K) packed int64 top-K of each chunk, descending, written
    # sizes
    n_q,
    n_k,
    D,
    k,  # the k wanted; the kernel keeps K >= k
    # strides
    stride_q,
    stride_qd,
    stride_k,
    stride_kd,
    # meta-parameters
    NORMALIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """The best K scores (and key indices) of BM queries over one chunk of the keys: 1 matmul
    pass of n_q n_k D overall. BN >= K, both powers of two; a tile merges only if it beats a
    query's k-th best (beyond the k-th, the list may miss scores: only the first k are read)."""
    rb = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = (rb * BM + tl.arange(0, BM)).to(tl.int64)
    row_ok = rows < n_q
    scale = tl.load(scale_ptr).to(tl.float32)
    if NORMALIZE:
        inv_q = tl.load(inv_q_ptr + rows, mask=row_ok, other=0.0)
    # Placeholders: -inf with the lowest low word, so that any real score, -inf too, beats them.
    best = _pack(
        tl.full((BM, K), float("-inf"), tl.float32), tl.full((BM, K), 0xFFFFFFFF, tl.int64)
    )
    threshold = tl.full((BM,), float("-inf"), tl.float32)  # each query's k-th best score so far
    kth_column = tl.arange(0, K)[None, :] == k - 1
    cb_start, cb_end = column_chunk(n_k, BN)
    for cb in range(cb_start, cb_end):
        cols = (cb * BN + tl.arange(0, BN)).to(tl.int64)
        col_ok = cols < n_k
        s = similarity_tile(q_ptr + rows * stride_q, k_ptr + cols * stride_k, row_ok, col_ok, D,
                            stride_qd, stride_kd, BK=BK, DOT_PRECISION=DOT_PRECISION)  # fmt: skip
        if NORMALIZE:
            inv_k = tl.load(inv_k_ptr + cols, mask=col_ok, other=0.0)
            s = s * inv_q[:, None] * inv_k[None, :]
        s = tl.where(col_ok[None, :], s * scale, float("-inf"))
        # Merge only when some query of the block gains (NaN scores always merge, as in topk).
        gains = (s > threshold[:, None]) | (s != s)
        if tl.max(gains.to(tl.int32)) > 0:
            tile = _pack(s, tl.broadcast_to(cols[None, :], (BM, BN)))
            tile = _top_k_of_sorted(tl.sort(tile, dim=1, descending=True), BM, BN, K)
            both = tl.reshape(tl.join(best, tile), (BM, 2 * K))
            best = _top_k_of_sorted(tl.sort(both, dim=1, descending=True), BM, 2 * K, K)
            kth = (tl.sum(tl.where(kth_column, best, 0), axis=1) >> 32).to(tl.int32)
            threshold = tl.where(kth >= 0, kth, kth ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    out = out_ptr + (pid_c.to(tl.int64) * n_q + rows[:, None]) * K + tl.arange(0, K)[None, :]
    tl.store(out, best, mask=row_ok[:, None])


_SIMILARITY_CONFIGS = configs(
    ("BM", "BN", "BK"),
    [  # (BM, BN, BK, warps, stages)
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 32, 4, 2),
    ],
)
_similarity_tuned = triton.autotune(
    _SIMILARITY_CONFIGS,
    key=["n_a", "n_b", "D", "HAS_BIAS", "NORMALIZE", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_similarity_kernel)


# Largest k the top-k kernel keeps in registers (the caller takes the PyTorch path beyond).
MAX_TOPK = 128


def topk_config(width: int) -> TileConfig:
    """Fixed tiles for a top-k of padded width ``width``: the packed (BM, BN) int64 tiles and
    their sorts weigh on the registers as much as the product, so the row block shrinks (and the
    warps grow) as the width does; all compile for Hopper without spilling."""
    if width <= 32:
        return TileConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)
    if width == 64:
        return TileConfig(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=3)
    return TileConfig(block_m=32, block_n=width, block_k=64, num_warps=8, num_stages=3)


def inverse_norms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / max(||x_i||, eps) for every row, fp32: the factor F.normalize applies."""
    n, D = x.shape
    squares = torch.empty(n, device=x.device, dtype=torch.float32)
    # fmt: off
    row_dot_kernel[(triton.cdiv(n, ROWS),)](
        x, x, squares, n, D, x.stride(0), x.stride(1), x.stride(0), x.stride(1),
        BM=ROWS, BD=row_block_d(D),
    )
    # fmt: on
    return squares.sqrt_().clamp_(min=eps).reciprocal_()


def similarity_forward(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    inv_a: torch.Tensor | None,
    inv_b: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """S = scale * (a * inv_a) (b * inv_b)^T + bias, (n_a, n_b) in ``out_dtype``.

    Args:
        a (n_a, D), b (n_b, D): same dtype (fp32/fp16/bf16) and device; any strides.
        scale, bias: one-element tensors on that device (bias may be None).
        inv_a (n_a,), inv_b (n_b,): fp32 row factors (``inverse_norms``), or both None.
        config: fixed tiles; None autotunes (fixed small tiles under the interpreter).
    """
    n_a, D = a.shape
    n_b = b.shape[0]
    out = torch.empty((n_a, n_b), device=a.device, dtype=out_dtype)
    normalize = inv_a is not None
    args = dict(
        a_ptr=a,
        b_ptr=b,
        out_ptr=out,
        scale_ptr=scale,
        bias_ptr=bias,
        inv_a_ptr=inv_a,
        inv_b_ptr=inv_b,
        n_a=n_a,
        n_b=n_b,
        D=D,
        stride_a=a.stride(0),
        stride_ad=a.stride(1),
        stride_b=b.stride(0),
        stride_bd=b.stride(1),
        stride_o=out.stride(0),
        stride_on=out.stride(1),
        HAS_BIAS=bias is not None,
        NORMALIZE=normalize,
        DOT_PRECISION=dot_precision(a.dtype),
        GROUP=8,
    )

    def grid(meta):
        return (triton.cdiv(n_a, meta["BM"]) * triton.cdiv(n_b, meta["BN"]),)

    launch(_similarity_kernel, _similarity_tuned, grid, config, args)
    return out


def topk_forward(
    q: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    scale: torch.Tensor,
    inv_q: torch.Tensor | None,
    inv_k: torch.Tensor | None,
    *,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest S_ij = scale * (q_i * inv_q_i) . (keys_j * inv_k_j) of each query.

    Args:
        q (n_q, D), keys (n_k, D): same dtype and device; 1 <= k <= min(n_k, MAX_TOPK).
        scale: one-element tensor; inv_q, inv_k: fp32 row factors or both None.
        config: fixed block_m/block_n/block_k and col_split (block_n is raised to k's padded
            width if smaller); None picks blocks and splits for the device.

    Returns:
        values (n_q, k) fp32, descending, and indices (n_q, k) int64.
    """
    n_q, D = q.shape
    n_k = keys.shape[0]
    width = max(16, triton.next_power_of_2(k))
    if config is None:
        config = INTERPRETER_CONFIG if interpreting() else topk_config(width)
    block_n = max(width, config.block_n)
    col_split = config.col_split or min(
        triton.cdiv(n_k, block_n),
        max(1, triton.cdiv(target_programs(q.device), triton.cdiv(n_q, config.block_m))),
    )
    packed = torch.empty((col_split, n_q, width), device=q.device, dtype=torch.int64)
    normalize = inv_q is not None
    _topk_kernel[(triton.cdiv(n_q, config.block_m), col_split)](
        q_ptr=q,
        k_ptr=keys,
        scale_ptr=scale,
        inv_q_ptr=inv_q,
        inv_k_ptr=inv_k,
        out_ptr=packed,
        n_q=n_q,
        n_k=n_k,
        D=D,
        k=k,
        stride_q=q.stride(0),
        stride_qd=q.stride(1),
        stride_k=keys.stride(0),
        stride_kd=keys.stride(1),
        NORMALIZE=normalize,
        DOT_PRECISION=dot_precision(q.dtype),
        K=width,
        BM=config.block_m,
        BN=block_n,
        BK=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    # The chunks' lists merged in the packed order, which ranks ties (-inf included) by index.
    packed = packed.permute(1, 0, 2).reshape(n_q, col_split * width).topk(k, dim=1).values
    key = (packed >> 32).to(torch.int32)
    values = torch.where(key >= 0, key, key ^ 0x7FFFFFFF).view(torch.float32)
    return values, (packed & 0xFFFFFFFF) ^ 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# The top-k op's launcher
# ----------------------------------------------------------------------------------------------


def topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    scale: torch.Tensor,
    normalize: bool,
    eps: float,
    *,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fastclip.topk_similarity`` on the kernel (k <= MAX_TOPK): values (n_q, k) in the
    queries' dtype, best first, and indices (n_q, k) int64."""
    inv_q = inverse_norms(queries, eps) if normalize else None
    inv_k = inverse_norms(keys, eps) if normalize else None
    values, indices = topk_forward(queries, keys, k, scale, inv_q, inv_k, config=config)
    return values.to(queries.dtype), indices
