"""CLIP-Adapter (Gao et al. 2021): a bottleneck MLP blended into frozen image features, classified
by cosine against the zero-shot class embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastclip.checks import check_number
from fastclip.finetune.base import FewShot, Method, optimize, save_adapter


def _bottleneck(width: int, reduction: int) -> nn.Sequential:
    """width -> width // reduction -> width, ReLU between; the output layer starts at zero."""
    mlp = nn.Sequential(
        nn.Linear(width, width // reduction), nn.ReLU(), nn.Linear(width // reduction, width)
    )
    nn.init.zeros_(mlp[2].weight), nn.init.zeros_(mlp[2].bias)
    return mlp


class ClipAdapter(nn.Module):
    """CLIP-Adapter on frozen features, classified by cosine against class embeddings:

        f' = ratio · mlp(f) + (1 - ratio) · f        mlp: E -> E // reduction -> E, ReLU
        logits = logit_scale · normalize(f') @ normalize(t')ᵀ       (N, C)

    t' is the (C, E) ``class_embeddings`` (the zero-shot classifier), adapted the same way by a
    second MLP if ``adapt_text``. The MLPs' output layers start at zero, so a fresh adapter
    classifies as zero-shot does. ``logit_scale`` is the model's, exponentiated. Its state dict
    holds the class embeddings, scale and ratio too: a saved adapter is a whole classifier.
    """

    def __init__(
        self,
        class_embeddings: torch.Tensor,
        logit_scale: float | torch.Tensor,
        *,
        ratio: float = 0.2,
        reduction: int = 4,
        adapt_text: bool = False,
    ):
        super().__init__()
        if class_embeddings.dim() != 2:
            raise ValueError(
                f"class_embeddings must be (C, E), got {tuple(class_embeddings.shape)}"
            )
        check_number("ratio", ratio, 0, 1)
        width, like = class_embeddings.shape[1], dict(device=class_embeddings.device)
        check_number("reduction", reduction, 1, width, integer=True)
        self.register_buffer("class_embeddings", class_embeddings.detach().float().clone())
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale), **like))
        self.register_buffer("ratio", torch.tensor(float(ratio), **like))
        self.image = _bottleneck(width, reduction).to(**like)
        self.text = _bottleneck(width, reduction).to(**like) if adapt_text else None

    def _blend(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.ratio * mlp(x) + (1 - self.ratio) * x, dim=-1)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, E) image features -> (N, C) logits."""
        classes = self.class_embeddings
        if self.text is not None:
            classes = self._blend(self.text, classes)  # (C, E)
        return self.logit_scale * self._blend(self.image, image_features.float()) @ classes.T


def train_adapter(
    features: torch.Tensor,
    labels: torch.Tensor,
    class_embeddings: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    ratio: float = 0.2,
    adapt_text: bool = False,
    steps: int = 200,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
) -> ClipAdapter:
    """A ClipAdapter trained with cross-entropy on (N, E) few-shot ``features``, (N,) labels."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = ClipAdapter(class_embeddings, logit_scale, ratio=ratio, adapt_text=adapt_text)
    x, y = features.detach().float(), labels.long()
    loss = lambda: F.cross_entropy(adapter(x), y)  # noqa: E731
    optimize(adapter.parameters(), loss, steps=steps, lr=lr, weight_decay=weight_decay)
    return adapter.eval()


def _fit(task: FewShot, *, seed: int = 0, **options) -> ClipAdapter:
    scale = task.model.logit_scale.exp().detach()
    train = task.train
    return train_adapter(train.features, train.labels, task.classifier, scale, seed=seed, **options)


METHOD = Method(
    fit=_fit, test_logits=lambda task, adapter: adapter(task.test.features), save=save_adapter
)
