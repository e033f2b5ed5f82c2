"""Similarity matrices and top-k retrieval: tiled Triton kernels, with PyTorch paths.

``similarity`` builds the score matrix for those who need it (evaluation, logging, small
batches); ``topk_similarity`` keeps only each query's best k and never builds it, so the keys
can number in the millions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastclip.backends import choose
from fastclip.checks import as_scalar, check_features, check_index

try:
    from fastclip.kernels import similarity as triton_similarity
except ImportError:  # no Triton on this platform: the PyTorch path serves everything
    triton_similarity = None

EPS = 1e-12  # F.normalize's default
# The PyTorch top-k scores at most about this many query-key pairs at once (16 MiB in fp32): its
# working memory beyond the (n_q, k) result, whatever n_q and n_k (k wider than a block aside).
TOPK_CHUNK_ELEMENTS = 2**22
# Where the scores do not fit one block, a block spans at least TOPK_CHUNK_ELEMENTS // TOPK_ROWS
# = 8,192 keys (or all of them): torch's CPU top-k takes about half the time per score on rows
# that wide as on rows of 2,048.
TOPK_ROWS = 512


def check_pair(a: object, b: object, names: tuple[str, str]) -> None:
    """check_features with this op's argument names in the messages."""
    try:
        check_features(a, b)
    except (TypeError, ValueError) as e:
        message = str(e).replace("image_features", names[0]).replace("text_features", names[1])
        raise type(e)(message) from None


class _Similarity(torch.autograd.Function):
    """Triton forward; the backward is two products of the given dS, on torch's matmul."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, normalize: bool, out_dtype: torch.dtype):
        inv_a = triton_similarity.inverse_norms(a, EPS) if normalize else None
        inv_b = triton_similarity.inverse_norms(b, EPS) if normalize else None
        ctx.save_for_backward(a, b, scale, bias, inv_a, inv_b)
        return triton_similarity.similarity_forward(a, b, scale, bias, inv_a, inv_b, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        a, b, scale, bias, inv_a, inv_b = ctx.saved_tensors
        need_a, need_b, need_scale, need_bias = ctx.needs_input_grad[:4]
        g = grad.float()
        a_hat, b_hat = a.float(), b.float()  # the rows as multiplied
        if inv_a is not None:
            a_hat, b_hat = a_hat * inv_a[:, None], b_hat * inv_b[:, None]
        s = scale.float().reshape(())
        ga = g @ b_hat if need_a or need_scale else None  # (n_a, D): dS/d(a_hat) / scale
        gb = g.T @ a_hat if need_b or (need_scale and ga is None) else None

        def through_norm(d_hat, hat, inv):  # d/dx of x / ||x|| applied to d_hat
            if inv is None:
                return d_hat
            return (d_hat - hat * torch.linalg.vecdot(hat, d_hat)[:, None]) * inv[:, None]

        da = through_norm(s * ga, a_hat, inv_a).to(a.dtype) if need_a else None
        db = through_norm(s * gb, b_hat, inv_b).to(b.dtype) if need_b else None
        dscale = None
        if need_scale:  # sum_ij dS_ij <a_hat_i, b_hat_j>
            rows, hat = (ga, a_hat) if ga is not None else (gb, b_hat)
            dscale = torch.linalg.vecdot(rows, hat).sum().to(scale.dtype).reshape(scale.shape)
        dbias = g.sum().to(bias.dtype).reshape(bias.shape) if need_bias else None
        return da, db, dscale, dbias, None, None


def similarity(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor | float = 1.0,
    bias: torch.Tensor | float = 0.0,
    *,
    normalize: bool = False,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """scale * a @ b.T + bias as a tiled kernel, rows L2-normalized on the fly if ``normalize``.

    Args:
        a: (n_a, D) and b: (n_b, D), same floating dtype and device, any strides.
        scale, bias: numbers or one-element tensors (tensors may require grad); numbers and CPU
            tensors must be finite (one on a GPU is not read back).
        normalize: divide every row of a and b by max(||row||, 1e-12) first (F.normalize).
        out_dtype: dtype of the result; defaults to the inputs' (products accumulate in fp32).
        backend: "triton" (CUDA), "torch" or "auto".

    Returns:
        (n_a, n_b) scores, differentiable with respect to a, b, scale and bias.
    """
    check_pair(a, b, ("a", "b"))
    scale_t = as_scalar("scale", scale, a.device)
    bias_t = as_scalar("bias", bias, a.device)
    out_dtype = out_dtype or a.dtype
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype must be a floating torch.dtype, got {out_dtype!r}")
    if choose("similarity", backend, a).triton:
        return _Similarity.apply(a, b, scale_t, bias_t, normalize, out_dtype)
    if normalize:
        a, b = F.normalize(a, dim=-1, eps=EPS), F.normalize(b, dim=-1, eps=EPS)
    return (scale_t * (a @ b.T) + bias_t).to(out_dtype)


def _topk_torch(
    queries: torch.Tensor, keys: torch.Tensor, k: int, scale: torch.Tensor, chunk: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of ``rows`` queries x ``cols`` keys, rows x cols <= TOPK_CHUNK_ELEMENTS (or rows x k
    where k is wider): each block's top-k merged into its rows' running top-k. Memory: the
    (n_q, k) result, one block of scores and its rows' (rows, 2k) merge."""
    n_q, n_k = queries.shape[0], keys.shape[0]
    if chunk is None and n_q * n_k <= TOPK_CHUNK_ELEMENTS:  # one block
        rows, cols = n_q, n_k
    elif chunk is None:  # wide blocks: all the keys at once where the queries are few
        cols = max(k, min(n_k, TOPK_CHUNK_ELEMENTS // min(n_q, TOPK_ROWS)))
        rows = min(n_q, max(1, TOPK_CHUNK_ELEMENTS // cols))
    else:
        cols = chunk
        rows = min(n_q, max(1, TOPK_CHUNK_ELEMENTS // max(chunk, k)))
    best_values = queries.new_empty(n_q, k)
    best_indices = torch.empty(n_q, k, dtype=torch.int64, device=queries.device)
    for r in range(0, n_q, rows):
        block_queries, running = queries[r : r + rows], None
        for start in range(0, n_k, cols):
            scores = block_queries @ keys[start : start + cols].T  # (<= rows, <= cols)
            scores.mul_(scale)  # in place: one block of scores at a time, rounded as scale * (q.k)
            values, indices = scores.topk(min(k, scores.shape[1]), dim=1)
            del scores  # before the next block is allocated
            indices += start
            if running is not None:
                values = torch.cat([running[0], values], dim=1)
                indices = torch.cat([running[1], indices], dim=1)
                values, where = values.topk(min(k, values.shape[1]), dim=1)
                indices = indices.gather(1, where)
            running = values, indices
        best_values[r : r + rows], best_indices[r : r + rows] = running
    return best_values, best_indices


@torch.no_grad()
def topk_similarity(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    scale: torch.Tensor | float = 1.0,
    normalize: bool = False,
    chunk: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best keys of every query by scale * q . key, without the n_q x n_k score matrix.

    Equal to ``torch.topk(scale * queries @ keys.T, k)`` (ties may come in another order; the
    values are the same). Memory O((n_q + n_k) D + n_q k), plus on the PyTorch path one block of
    at most ``TOPK_CHUNK_ELEMENTS`` scores (16 MiB in fp32). Inference only: no gradients.

    Args:
        queries: (n_q, D) and keys: (n_k, D), same floating dtype and device.
        k: 1 <= k <= n_k.
        scale: a number or one-element tensor multiplying every score.
        normalize: L2-normalize queries and keys first (cosine similarity).
        chunk: keys scored per step on the PyTorch path (None: blocks of about 4M scores, all
            the keys at once for few queries).
        backend: "triton" (CUDA), "torch" or "auto". The kernel keeps up to 128 scores per
            query; a larger k takes the PyTorch path.

    Returns:
        values (n_q, k) in the inputs' dtype, best first, and indices (n_q, k) int64 into keys.
        The kernel scores in fp32 (fp32 accumulation) before rounding to the inputs' dtype.
    """
    check_pair(queries, keys, ("queries", "keys"))
    k = check_index("k", k, low=None)
    if not 1 <= k <= keys.shape[0]:
        raise ValueError(f"k must be between 1 and the number of keys ({keys.shape[0]}), got {k}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    scale_t = as_scalar("scale", scale, queries.device)
    if choose("similarity", backend, queries).triton and k <= triton_similarity.MAX_TOPK:
        inv_q = triton_similarity.inverse_norms(queries, EPS) if normalize else None
        inv_k = triton_similarity.inverse_norms(keys, EPS) if normalize else None
        values, indices = triton_similarity.topk_forward(queries, keys, k, scale_t, inv_q, inv_k)
        return values.to(queries.dtype), indices
    if normalize:
        queries, keys = F.normalize(queries, dim=-1, eps=EPS), F.normalize(keys, dim=-1, eps=EPS)
    return _topk_torch(queries, keys, k, scale_t.to(queries.dtype), chunk)
