"""What every fine-tuning method shares: the task it trains on, its interface, the optimizer
loop, the checks, and saving and loading the parts it trains."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from fastclip.files import read_weights, require_match, write_weights
from fastclip.tokenizer import Tokenizer
from fastclip.zeroshot import accuracy


@dataclass
class Split:
    """A classification split, ready for every method."""

    images: torch.Tensor  # (N, 3, S, S) preprocessed
    labels: torch.Tensor  # (N,) class ids
    features: torch.Tensor  # (N, E) normalized image features of the frozen model

    def rows(self, ids: torch.Tensor) -> Split:
        """The rows ``ids`` of every tensor."""
        return Split(self.images[ids], self.labels[ids], self.features[ids])


@dataclass
class FewShot:
    """A frozen CLIP and a classification task: both splits encoded once, the zero-shot
    classifier. A method trains on ``train`` (k shots per class) and is scored on ``test``."""

    model: nn.Module
    tokenizer: Tokenizer
    classnames: list[str]
    templates: list[str]
    train: Split
    test: Split
    classifier: torch.Tensor  # (C, E) zero-shot class embeddings


class Method(NamedTuple):
    """A fine-tuning method: what each one exposes to the task, the command line and the
    comparison."""

    fit: Callable[..., nn.Module]  # (task, *, seed, **options) -> the trained part
    test_logits: Callable[[FewShot, nn.Module], torch.Tensor]  # (task, part) -> (N_test, C)
    save: Callable[[nn.Module, str | os.PathLike], None]  # (part, path): a safetensors file


def optimize(
    params: Iterable[nn.Parameter],
    loss_fn: Callable[[], torch.Tensor],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
) -> None:
    """Full-batch AdamW for ``steps`` steps on a cosine schedule."""
    optimizer = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
        schedule.step()


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of (N, C) scores against (N,) labels."""
    return accuracy(logits.argmax(dim=1).cpu(), labels.cpu(), ks=(1,))["top1"]


def check_text_tower(model: nn.Module, user: str) -> None:
    """ValueError naming ``user`` if the model has no text tower."""
    if getattr(model, "text", None) is None or not hasattr(model, "encode_text"):
        raise ValueError(f"{user} needs the model's text tower (model.text), which it lacks")


def save_adapter(module: nn.Module, path: str | os.PathLike) -> None:
    """Write every tensor of ``module``'s state dict (a LinearProbe, ClipAdapter, PromptLearner)
    to a safetensors file, atomically, with the module's class name in the metadata."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_weights(path, module.state_dict(), {"module": type(module).__name__})


def load_adapter(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load ``save_adapter``'s file into ``module``, built as the saved one was (same class and
    shapes), exactly. Returns the module, in eval mode."""
    state, metadata = read_weights(path, "adapter")
    saved, kind = metadata.get("module"), type(module).__name__
    if saved != kind:
        raise ValueError(f"{path} holds a {saved or 'file not from save_adapter'}, not a {kind}")
    require_match(module.state_dict(), state, f"{path} does not fit the {kind}")
    module.load_state_dict(state)
    return module.eval()
