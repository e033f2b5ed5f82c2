"""Eager PyTorch references: the loss exactly as written, full score matrix and all.

Tests call these on float64 copies of their inputs; benchmarks and the demo call them in the input
dtype as the "eager PyTorch" baseline. They are deliberately naive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _logits(image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
    """S = logit_scale * I T^T (+ logit_bias): (n_img, n_txt)."""
    logits = logit_scale * image_features @ text_features.T
    return logits if logit_bias is None else logits + logit_bias


def clip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
    offset: int = 0,
    both_directions: bool = True,
) -> torch.Tensor:
    """InfoNCE over S = logit_scale * I T^T + logit_bias, image i paired with text i + offset.

    Args:
        image_features: (n_img, D). text_features: (n_txt, D) with n_img + offset <= n_txt.
        both_directions: average the image->text cross-entropy with the text->image one, taken
            over the n_img columns that hold a positive; False gives image->text only.

    Returns:
        The 0-dim loss in the features' dtype.
    """
    n = image_features.shape[0]
    logits = _logits(image_features, text_features, logit_scale, logit_bias)  # (n_img, n_txt)
    labels = torch.arange(n, device=logits.device)
    loss = F.cross_entropy(logits, labels + offset)
    if not both_directions:
        return loss
    return 0.5 * (loss + F.cross_entropy(logits[:, offset : offset + n].T, labels))


def clip_loss_exact(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
    offset: int = 0,
    both_directions: bool = True,
) -> torch.Tensor:
    """``clip_loss_reference`` in a form without cancellation, the one tests compare against.

    Each cross-entropy is log(1 + sum_{j != i} exp(S_ij - S_i,i+off)) = softplus(m_i), never
    logsumexp_j S_ij - S_i,i+off: the two agree in exact arithmetic, but the difference of two
    nearly equal numbers loses a confident row's loss (1 - p_ii ~ 1e-20 vanishes even in
    float64), while this form, and autograd through it, keeps full relative precision.
    """
    n = image_features.shape[0]
    logits = _logits(image_features, text_features, logit_scale, logit_bias)  # (n_img, n_txt)
    rows = torch.arange(n, device=logits.device)
    positives = logits[rows, rows + offset]  # (n_img,)
    others = (logits - positives[:, None]).index_put(
        (rows, rows + offset), logits.new_tensor(-torch.inf)
    )
    loss = F.softplus(torch.logsumexp(others, dim=1)).mean()
    if not both_directions:
        return loss
    square = logits[:, offset : offset + n] - positives[None, :]  # column j's positive: row j
    others = square.index_put((rows, rows), logits.new_tensor(-torch.inf))
    return 0.5 * (loss + F.softplus(torch.logsumexp(others, dim=0)).mean())


def siglip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
    offset: int | None = 0,
) -> torch.Tensor:
    """SigLIP: -sum_ij log sigmoid(z_ij S_ij) / n_img, z = +1 for image i with text i + offset,
    -1 elsewhere (offset None: negatives only, every z = -1). Returns the loss in the inputs'
    dtype."""
    n = image_features.shape[0]
    logits = _logits(image_features, text_features, logit_scale, logit_bias)  # (n_img, n_txt)
    labels = -torch.ones_like(logits)
    if offset is not None:
        rows = torch.arange(n, device=logits.device)
        labels[rows, rows + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / n


def similarity_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor | float = 1.0,
    bias: torch.Tensor | float = 0.0,
    normalize: bool = False,
) -> torch.Tensor:
    """scale * a @ b.T + bias, rows L2-normalized first if ``normalize``: (n_a, n_b)."""
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return scale * a @ b.T + bias


def normalized_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """The normalized projection: each row of x W^T + b divided by max(its norm, eps)."""
    return F.normalize(F.linear(x, weight, bias), dim=-1, eps=eps)
