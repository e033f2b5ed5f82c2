"""Similarity matrices and top-k retrieval: tiled Triton kernels, with PyTorch paths.

``similarity`` builds the score matrix for those who need it (evaluation, logging, small
batches); ``topk_similarity`` keeps only each query's best k and never builds it, so the keys
can number in the millions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastclip import backends
from fastclip.backends import check_config, choose
from fastclip.checks import as_scalar, check_features, check_index, check_same_dtype

if TYPE_CHECKING:
    from fastclip.kernels.launch import TileConfig

EPS = 1e-12  # F.normalize's default


def check_pair(a: object, b: object, names: tuple[str, str]) -> None:
    """check_features with this op's argument names in the messages; one dtype, as for
    ``a @ b.T``."""
    try:
        check_features(a, b)
        check_same_dtype(a, b)
    except (TypeError, ValueError) as e:
        message = str(e).replace("image_features", names[0]).replace("text_features", names[1])
        raise type(e)(message) from None


def similarity(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor | float = 1.0,
    bias: torch.Tensor | float = 0.0,
    *,
    normalize: bool = False,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    config: TileConfig | None = None,
) -> torch.Tensor:
    """scale * a @ b.T + bias as a tiled kernel, rows L2-normalized on the fly if ``normalize``.

    Args:
        a: (n_a, D) and b: (n_b, D), same floating dtype and device, any strides.
        scale, bias: numbers or one-element tensors (tensors may require grad); numbers and CPU
            tensors must be finite (one on a GPU is not read back).
        normalize: divide every row of a and b by max(||row||, 1e-12) first (F.normalize).
        out_dtype: dtype of the result; defaults to the inputs' (products accumulate in fp32).
        backend: "triton" (CUDA), "torch" or "auto".
        config: fixed Triton tiles (``fastclip.kernels.launch.TileConfig``); None autotunes.

    Returns:
        (n_a, n_b) scores, differentiable with respect to a, b, scale and bias.
    """
    check_pair(a, b, ("a", "b"))
    scale_t = as_scalar("scale", scale, a.device)
    bias_t = as_scalar("bias", bias, a.device)
    out_dtype = out_dtype or a.dtype
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype must be a floating torch.dtype, got {out_dtype!r}")
    check_config(config)
    method = choose("similarity", backend, a)
    return backends.similarity(
        a, b, scale_t, bias_t, normalize, out_dtype, EPS, method=method, config=config
    )


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
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best keys of every query by scale * q . key, without the n_q x n_k score matrix.

    Equal to ``torch.topk(scale * queries @ keys.T, k)`` (ties may come in another order; the
    values are the same). Memory O((n_q + n_k) D + n_q k), plus on the PyTorch path one block of
    at most ``chunked.TOPK_CHUNK_ELEMENTS`` scores (16 MiB in fp32). Inference only: no gradients.

    Args:
        queries: (n_q, D) and keys: (n_k, D), same floating dtype and device.
        k: 1 <= k <= n_k.
        scale: a number or one-element tensor multiplying every score.
        normalize: L2-normalize queries and keys first (cosine similarity).
        chunk: keys scored per step on the PyTorch path (None: blocks of about 4M scores, all
            the keys at once for few queries).
        backend: "triton" (CUDA), "torch" or "auto". The kernel keeps up to 128 scores per
            query; a larger k takes the PyTorch path.
        config: fixed Triton tiles (``fastclip.kernels.launch.TileConfig``); None picks them.

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
    check_config(config)
    method = choose("similarity", backend, queries)
    return backends.topk(
        queries, keys, k, scale_t, normalize, EPS, chunk, method=method, config=config
    )
