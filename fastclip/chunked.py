"""The PyTorch path of every op (``backend="torch"``), for any device and float64 too.

The losses: the kernels' algorithm in blocks, with the same statistics, losses and gradients as
``fastclip.kernels.contrastive`` and ``fastclip.kernels.siglip`` (their docstrings have the
math). Scores are built a block at a time (``fastclip.kernels.blocks``), so memory is one
bounded block beyond the features and their gradients; fp16/bf16 inputs are computed in fp32,
float64 in float64. Top-k scores bounded blocks too; similarity and the projection are eager
PyTorch, their backwards written out (``similarity_backward``, ``normalized_linear_backward``)
as the custom operators of ``fastclip.backends`` need them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastclip.kernels.blocks import (
    blocked_gradients,
    column_references,
    default_block_bytes,
    plan_blocks,
)

# The PyTorch top-k scores at most about this many query-key pairs at once (16 MiB in fp32): its
# working memory beyond the (n_q, k) result, whatever n_q and n_k (k wider than a block aside).
TOPK_CHUNK_ELEMENTS = 2**22
# Where the scores do not fit one block, a block spans at least TOPK_CHUNK_ELEMENTS // TOPK_ROWS
# = 8,192 keys (or all of them): torch's CPU top-k takes about half the time per score on rows
# that wide as on rows of 2,048.
TOPK_ROWS = 512


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where features of ``dtype`` are computed: fp32, or float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _plan(x: torch.Tensor, y: torch.Tensor, block_bytes: int | None) -> tuple[int, int]:
    """Blocks whose fp32 arrays fit ``block_bytes`` (``default_block_bytes`` if None)."""
    # About four fp32 (R, C) arrays are live at once: the scores, their exponentials and the
    # temporaries of logsumexp.
    return plan_blocks(x.shape[0], y.shape[0], 16, block_bytes or default_block_bytes(x.device))


def _positions(r0: int, r1: int, c0: int, c1: int, offset: int, device: torch.device):
    """Row i's positive pair sits at column i + offset: the block's (rows, cols) of such pairs,
    as indices into the block."""
    lo, hi = max(r0, c0 - offset), min(r1, c1 - offset)
    rows = torch.arange(lo, max(hi, lo), device=device)
    return rows - r0, rows + offset - c0


def positive_dots(x: torch.Tensor, y: torch.Tensor, offset: int) -> torch.Tensor:
    """<x_i, y_i+offset> for every row of x: (n_x,) in the compute dtype."""
    cdt = compute_dtype(x.dtype)
    return torch.linalg.vecdot(x.to(cdt), y[offset : offset + x.shape[0]].to(cdt))


def contrastive_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    offset: int,
    both_directions: bool,
    *,
    block_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(pdot, row, col): positive dots, and each row's (column's) log-sum-exp of the other
    logits relative to its positive, m_i = log sum_{j != i+off} exp(S_ij - S_i,i+off) (col None
    for one direction). See ``fastclip.kernels.contrastive``."""
    cdt = compute_dtype(x.dtype)
    s = scale.to(cdt).reshape(())
    n_x, n_y = x.shape[0], y.shape[0]
    xs, yc = x.to(cdt) * s, y.to(cdt)  # the scale folded into x: S = xs y^T
    pdot = positive_dots(x, y, offset)
    row_ref, col_ref = pdot * s, column_references(pdot, n_y, offset) * s  # S at the pairs
    row = torch.full((n_x,), float("-inf"), dtype=cdt, device=x.device)
    col = torch.full((n_y,), float("-inf"), dtype=cdt, device=x.device)
    R, C = _plan(x, y, block_bytes)
    for r0 in range(0, n_x, R):
        r1 = min(r0 + R, n_x)
        for c0 in range(0, n_y, C):
            c1 = min(c0 + C, n_y)
            i, j = _positions(r0, r1, c0, c1, offset, x.device)
            # S_ij - S_i,pos by one GEMM, the subtraction in its epilogue: (R, C)
            u = torch.addmm(-row_ref[r0:r1, None], xs[r0:r1], yc[c0:c1].T)
            u[i, j] = float("-inf")
            torch.logaddexp(row[r0:r1], torch.logsumexp(u, dim=1), out=row[r0:r1])
            if both_directions:  # S_ij - S_pos,j = (S_ij - S_i,pos) + (S_i,pos - S_pos,j)
                u.add_(row_ref[r0:r1, None] - col_ref[None, c0:c1])
                torch.logaddexp(col[c0:c1], torch.logsumexp(u, dim=0), out=col[c0:c1])
    return pdot, row, (col if both_directions else None)


def contrastive_backward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    w_x: torch.Tensor,
    w_y: torch.Tensor | None,
    weight: torch.Tensor,
    offset: int,
    need_dx: bool,
    need_dy: bool,
    *,
    block_bytes: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """dL/dx and dL/dy (each None unless needed) and dL/ds, from ``contrastive_forward``'s
    stats, the relative loss weights w_x (n_x,), w_y (n_y,) or None, and their common factor
    ``weight`` (see ``fastclip.kernels.contrastive.contrastive_backward``)."""
    cdt = compute_dtype(x.dtype)
    s = scale.to(cdt).reshape(())
    xs = x.to(cdt) * s
    pdot, row, col = stats
    # A softmax term w exp(S - S_pos - softplus(m)) = exp(S - shift), with the weight's log in
    # the shift (a zero weight gives a huge shift, never -log 0 = inf, so no inf - inf).
    row_shift = pdot * s + F.softplus(row) - w_x.log().clamp(min=-1e30)
    row_gap = w_x * torch.sigmoid(row)  # w (1 - p_pair)
    if col is not None:
        col_ref = column_references(pdot, y.shape[0], offset) * s
        col_shift = col_ref + F.softplus(col) - w_y.log().clamp(min=-1e30)
        col_gap = w_y * torch.sigmoid(col)

    def form(r0: int, r1: int, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.addmm(-row_shift[r0:r1, None], xs[r0:r1], y[c0:c1].to(cdt).T)  # (R, C)
        g = z.exp() if col is not None else z.exp_()
        if col is not None:  # S - col_shift = z + (row_shift - col_shift), exponentiated
            g.add_(z.add_(row_shift[r0:r1, None] - col_shift[None, c0:c1]).exp_())
        i, j = _positions(r0, r1, c0, c1, offset, x.device)
        # G at a positive pair: -(w (1 - p_ii)) per direction, 1 - p_ii = sigmoid(m_i) exactly.
        diagonal = row_gap[r0 + i]
        if col is not None:
            diagonal = diagonal + col_gap[c0 + j]
        g[i, j] = -diagonal
        return g, g.new_zeros(0)

    plan = _plan(x, y, block_bytes)
    weight = weight.to(cdt)
    dx, dy, sums = blocked_gradients(x, y, s * weight, form, need_dx, need_dy, 0, plan, cdt,
                                     pair_sum=True)  # fmt: skip
    return dx, dy, sums[0] * weight


def siglip_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    offset: int | None,
    need_dx: bool,
    need_dy: bool,
    need_dparams: bool,
    *,
    block_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
           torch.Tensor | None]:  # fmt: skip
    """SigLIP loss and requested gradients in one blocked sweep (``kernels/siglip.py`` has the
    math): loss, dx, dy, dscale, dbias, each None when not requested. offset None: no pairs."""
    cdt = compute_dtype(x.dtype)
    s = scale.to(cdt).reshape(())
    xs = x.to(cdt) * s
    bias = (bias if bias is not None else scale.new_zeros(())).to(cdt).reshape(1, 1)
    n_x = x.shape[0]

    def form(r0: int, r1: int, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.addmm(bias, xs[r0:r1], y[c0:c1].to(cdt).T)  # S; z_ij S_ij: -S at the pairs
        if offset is not None:
            i, j = _positions(r0, r1, c0, c1, offset, x.device)
            z[i, j] = -z[i, j]
        loss = F.softplus(z).sum()  # -log sigmoid(-z S), never a difference
        g = torch.sigmoid_(z)  # n_x G = sigmoid(S) - d: -sigmoid(-S) at a pair
        if offset is not None:
            g[i, j] = -g[i, j]
        return g, torch.stack([loss, g.sum()])

    plan = _plan(x, y, block_bytes)
    dx, dy, sums = blocked_gradients(x, y, s / n_x, form, need_dx, need_dy, 2, plan, cdt,
                                     pair_sum=need_dparams)  # fmt: skip
    loss, dbias, *dscale = (sums / n_x).unbind()
    if not need_dparams:
        return loss, dx, dy, None, None
    return loss, dx, dy, dscale[0], dbias


def similarity(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    normalize: bool,
    out_dtype: torch.dtype,
    eps: float,
) -> torch.Tensor:
    """scale * a @ b.T + bias, rows normalized first if ``normalize`` (``F.normalize``)."""
    if normalize:
        a, b = F.normalize(a, dim=-1, eps=eps), F.normalize(b, dim=-1, eps=eps)
    return (scale * (a @ b.T) + bias).to(out_dtype)


def _through_norm(
    d_hat: torch.Tensor, hat: torch.Tensor, norm: torch.Tensor, eps: float
) -> torch.Tensor:
    """d/dx of F.normalize(x) = x / max(||x||, eps) applied to d_hat, from hat = that result:
    (d_hat - hat <hat, d_hat>) / ||x|| where ||x|| >= eps, d_hat / eps where it was clamped."""
    along = torch.where(norm >= eps, torch.linalg.vecdot(hat, d_hat), 0.0)
    return (d_hat - hat * along[:, None]) / norm.clamp(min=eps)[:, None]


def similarity_backward(
    grad: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    normalize: bool,
    eps: float,
    need_a: bool,
    need_b: bool,
    need_scale: bool,
    need_bias: bool,
) -> tuple[torch.Tensor | None, ...]:
    """da, db, dscale, dbias (each None unless needed) of S = scale * a_hat @ b_hat.T + bias
    from dS: two products of dS (one where only the scale needs it), in fp32 (float64 for
    float64), whichever implementation computed S."""
    cdt = compute_dtype(a.dtype)
    g = grad.to(cdt)
    a_hat, b_hat = a.to(cdt), b.to(cdt)  # the rows as multiplied
    if normalize:
        norm_a, norm_b = (
            torch.linalg.vector_norm(a_hat, dim=1),
            torch.linalg.vector_norm(b_hat, dim=1),
        )
        a_hat, b_hat = (
            a_hat / norm_a.clamp(min=eps)[:, None],
            b_hat / norm_b.clamp(min=eps)[:, None],
        )
    s = scale.to(cdt).reshape(())
    ga = g @ b_hat if need_a or need_scale else None  # (n_a, D): dS/d(a_hat) / scale
    gb = g.T @ a_hat if need_b else None  # (n_b, D)
    da = db = dscale = dbias = None
    if need_a:
        da = s * ga if not normalize else _through_norm(s * ga, a_hat, norm_a, eps)
        da = da.to(a.dtype)
    if need_b:
        db = s * gb if not normalize else _through_norm(s * gb, b_hat, norm_b, eps)
        db = db.to(b.dtype)
    if need_scale:  # sum_ij dS_ij <a_hat_i, b_hat_j>
        dscale = torch.linalg.vecdot(ga, a_hat).sum().to(scale.dtype).reshape(scale.shape)
    if need_bias:
        dbias = g.sum()
    return da, db, dscale, dbias


def topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    scale: torch.Tensor,
    normalize: bool,
    eps: float,
    chunk: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best keys of every query by scale * q . key (rows L2-normalized first if
    ``normalize``): values (n_q, k) and int64 indices, best first.

    Blocks of ``rows`` queries x ``cols`` keys, rows x cols <= TOPK_CHUNK_ELEMENTS (or rows x k
    where k is wider; ``chunk`` keys per block where given): each block's top-k merged into its
    rows' running top-k. Memory: the (n_q, k) result, one block of scores and its rows' (rows,
    2k) merge."""
    if normalize:
        queries, keys = F.normalize(queries, dim=-1, eps=eps), F.normalize(keys, dim=-1, eps=eps)
    scale = scale.to(queries.dtype)
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


def normalized_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """F.normalize(F.linear(x, weight, bias), dim=-1, eps=eps), eager, and the rows' norms
    ||x W^T + b|| (fp32, float64 for float64) that ``normalized_linear_backward`` needs."""
    z = F.linear(x, weight, bias)  # (n_rows, n_out)
    norm = torch.linalg.vector_norm(z, dim=-1, dtype=compute_dtype(x.dtype))
    return F.normalize(z, dim=-1, eps=eps), norm


def normalized_linear_backward(
    grad: torch.Tensor,
    y: torch.Tensor,
    norm: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dL/dx, dL/dW, dL/db of y = normalize(x W^T + b) from dL/dy, y and the norms, each None
    unless needed: dz = (g - <y, g> y) / ||z|| (g / eps where the norm was clamped), formed in
    fp32 and rounded to y's dtype for its products, as the kernels do
    (``fastclip.kernels.projection`` has the math)."""
    dz = _through_norm(grad.to(norm.dtype), y.to(norm.dtype), norm, eps)  # (n_rows, n_out)
    db = dz.sum(dim=0).to(y.dtype) if need_db else None
    dz = dz.to(y.dtype)
    dx = dz @ weight if need_dx else None  # (n_rows, n_in)
    dw = dz.T @ x if need_dw else None  # (n_out, n_in)
    return dx, dw, db
