"""Linear probe: multinomial logistic regression on frozen image features (L-BFGS, L2 penalty)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastclip.checks import check_number
from fastclip.finetune.base import FewShot, Method, save_adapter


class LinearProbe(nn.Linear):
    """Logistic regression on frozen image features: (N, E) -> (N, C) logits."""


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    weight_decay: float = 1e-3,
    max_iter: int = 100,
) -> LinearProbe:
    """Multinomial logistic regression on (N, E) ``features`` and (N,) ``labels`` in [0, C),
    C = ``num_classes`` or max(labels) + 1: full-batch L-BFGS from zero on the mean cross-entropy
    + weight_decay / 2 · ||W||² (the bias is not penalized)."""
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"features must be (N, E) and labels (N,), got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    check_number("weight_decay", weight_decay, 0)
    check_number("max_iter", max_iter, 1, integer=True)
    x, y = features.detach().float(), labels.long()
    probe = LinearProbe(x.shape[1], num_classes or int(y.max()) + 1, device=x.device)
    nn.init.zeros_(probe.weight), nn.init.zeros_(probe.bias)
    lbfgs = torch.optim.LBFGS(
        probe.parameters(), max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = F.cross_entropy(probe(x), y) + weight_decay / 2 * probe.weight.square().sum()
        loss.backward()
        return loss

    lbfgs.step(closure)
    return probe.eval()


def _fit(task: FewShot, *, seed: int = 0, **options) -> LinearProbe:
    """L-BFGS is deterministic: ``seed`` draws nothing."""
    train = task.train
    return fit_linear_probe(
        train.features, train.labels, num_classes=len(task.classnames), **options
    )


METHOD = Method(
    fit=_fit, test_logits=lambda task, probe: probe(task.test.features), save=save_adapter
)
