"""PyTorch path of the contrastive loss: the kernels' algorithm in row chunks.

Same statistics and gradients as ``fastclip.kernels.contrastive`` (its docstring has the math),
for CPUs and machines without Triton. Scores are built ``chunk_rows`` rows at a time, so memory is
O(chunk_rows * n_y) beyond the features; forward and backward together make 4 matmul passes
(forward: S; backward: S again, G y and G^T x). fp16/bf16 inputs are computed in fp32.
"""

from __future__ import annotations

import torch

# About 16 MB of fp32 scores per chunk: small enough for the cache-friendly sizes of a CPU,
# large enough that each matmul stays efficient.
CHUNK_ELEMENTS = 2**22


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(n_x: int, n_y: int, chunk_rows: int | None):
    step = chunk_rows or max(1, CHUNK_ELEMENTS // max(n_y, 1))
    for start in range(0, n_x, step):
        yield start, min(start + step, n_x)


def _scores(x_chunk, y, scale, bias):
    """S = scale * x_chunk @ y.T + bias, built in place in the product's buffer."""
    s = torch.mm(x_chunk, y.T).mul_(scale)
    return s.add_(bias) if bias is not None else s


def _products(g, xc, yc, scale, dx, dy, rows: slice, need_dx: bool, need_dy: bool):
    """A chunk's share of the gradients from dL/dS = G (rows, n_y): dx[rows] = s G y, dy +=
    G^T x (scaled at the end). Returns its share of dL/ds = sum_ij G_ij <x_i, y_j>, which is
    sum_i <(G y)_i, x_i> when the x side runs (else 0: ``_finish_dy`` takes it from dy)."""
    share = torch.zeros((), dtype=g.dtype, device=g.device)
    if need_dx or not need_dy:
        gy = g @ yc  # (rows, D)
        share = torch.linalg.vecdot(gy, xc).sum()
        if need_dx:
            dx[rows] = gy.mul_(scale)
    if need_dy:
        dy.addmm_(g.T, xc)
    return share


def _finish_dy(dy, yc, scale, dtype: torch.dtype, dscale, need_dx: bool):
    """dy scaled and cast; dL/ds from the y side (sum_j <(G^T x)_j, y_j>) if the x side did not
    run."""
    if not need_dx:
        dscale = torch.linalg.vecdot(dy, yc).sum()
    return dy.mul_(scale).to(dtype), dscale


def contrastive_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    offset: int,
    both_directions: bool,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Row logsumexps, column logsumexps (or None) and positive logits of S, in fp32 (fp64)."""
    cdt = _compute_dtype(x.dtype)
    yc, scale_c = y.to(cdt), scale.to(cdt).reshape(())
    bias_c = bias.to(cdt).reshape(()) if bias is not None else None
    n_x, n_y = x.shape[0], y.shape[0]
    row_lse = torch.empty(n_x, dtype=cdt, device=x.device)
    positives = torch.empty(n_x, dtype=cdt, device=x.device)
    col_lse = torch.full((n_y,), float("-inf"), dtype=cdt, device=x.device)
    for start, stop in _chunks(n_x, n_y, chunk_rows):
        s = _scores(x[start:stop].to(cdt), yc, scale_c, bias_c)
        row_lse[start:stop] = torch.logsumexp(s, dim=1)
        idx = torch.arange(stop - start, device=x.device)
        positives[start:stop] = s[idx, idx + start + offset]
        if both_directions:
            torch.logaddexp(col_lse, torch.logsumexp(s, dim=0), out=col_lse)
    return row_lse, (col_lse if both_directions else None), positives


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
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """dL/dx and dL/dy (each or None) and dL/dscale, recomputing S chunk by chunk."""
    cdt = _compute_dtype(x.dtype)
    yc, scale_c = y.to(cdt), scale.to(cdt).reshape(())
    bias_c = bias.to(cdt).reshape(()) if bias is not None else None
    n_x, n_y = x.shape[0], y.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else None
    dy = torch.zeros(y.shape, dtype=cdt, device=x.device) if need_dy else None
    dscale = torch.zeros((), dtype=cdt, device=x.device)
    for start, stop in _chunks(n_x, n_y, chunk_rows):
        xc = x[start:stop].to(cdt)
        s = _scores(xc, yc, scale_c, bias_c)
        g = torch.sub(s, row_lse[start:stop, None]).exp_().mul_(w_x[start:stop, None])
        if col_lse is not None:
            g.add_(s.sub_(col_lse[None, :]).exp_().mul_(w_y[None, :]))
        idx = torch.arange(stop - start, device=x.device)
        pos = idx + start + offset
        g[idx, pos] -= w_x[start:stop] + (w_y[pos] if col_lse is not None else 0)
        dscale += _products(g, xc, yc, scale_c, dx, dy, slice(start, stop), need_dx, need_dy)
    if need_dy:
        dy, dscale = _finish_dy(dy, yc, scale_c, y.dtype, dscale, need_dx)
    return dx, dy, dscale


def siglip_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    offset: int | None,
    need_dx: bool,
    need_dy: bool,
    need_dparams: bool,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
           torch.Tensor | None]:  # fmt: skip
    """SigLIP loss and requested gradients in one chunked sweep (``kernels/siglip.py`` has the
    math): loss, dx, dy, dscale, dbias, each None when not requested. offset None: no pairs."""
    cdt = _compute_dtype(x.dtype)
    yc, scale_c = y.to(cdt), scale.to(cdt).reshape(())
    bias_c = bias.to(cdt).reshape(()) if bias is not None else None
    n_x, n_y = x.shape[0], y.shape[0]
    zero = torch.zeros((), dtype=cdt, device=x.device)
    loss, dscale, dbias = zero.clone(), zero.clone(), zero.clone()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else None
    dy = torch.zeros(y.shape, dtype=cdt, device=x.device) if need_dy else None
    for start, stop in _chunks(n_x, n_y, chunk_rows):
        xc = x[start:stop].to(cdt)
        s = _scores(xc, yc, scale_c, bias_c)
        loss += torch.logaddexp(s, zero).sum()  # softplus(S), stable for any S
        idx = torch.arange(stop - start, device=x.device)
        if offset is not None:
            loss -= s[idx, idx + start + offset].sum()
        if not (need_dx or need_dy or need_dparams):
            continue
        g = torch.sigmoid_(s).div_(n_x)  # G = (sigmoid(S) - d) / n_x
        if offset is not None:
            g[idx, idx + start + offset] -= 1 / n_x
        dbias += g.sum()
        dscale += _products(g, xc, yc, scale_c, dx, dy, slice(start, stop), need_dx, need_dy)
    if need_dy:
        dy, dscale = _finish_dy(dy, yc, scale_c, y.dtype, dscale, need_dx)
    if not need_dparams:
        dscale = dbias = None
    return loss / n_x, dx, dy, dscale, dbias
