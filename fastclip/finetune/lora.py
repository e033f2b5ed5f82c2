"""LoRA as a few-shot method: low-rank adapters (``fastclip.lora``) on a copy of the model's
towers, trained with cross-entropy against the prompt templates' class embeddings."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastclip.finetune.base import FewShot, Method, check_text_tower, optimize
from fastclip.lora import apply_lora, lora_parameters, save_lora
from fastclip.tokenizer import Tokenizer
from fastclip.zeroshot import TEMPLATES, build_zero_shot_classifier, encode_images


def _class_embeddings(model: nn.Module, tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C · P, T) class-major prompt tokens -> (C, E) unit class embeddings, with gradients (as
    build_zero_shot_classifier: the mean of each class's normalized prompts, renormalized)."""
    features = model.encode_text(tokens).float()  # (C · P, E)
    return F.normalize(features.view(num_classes, -1, features.shape[1]).mean(1), dim=-1)


def train_lora(
    model: nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    templates: Sequence[str] = TEMPLATES,
    towers: Sequence[str] = ("visual",),
    rank: int = 4,
    alpha: float = 8.0,
    steps: int = 40,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[str]:
    """Add LoRA to ``model``'s ``towers`` **in place** (copy the model to keep the original) and
    train it with cross-entropy on (N, 3, S, S) preprocessed few-shot ``images``, (N,) labels,
    against the templates' class embeddings (recomputed each step if the text tower has LoRA).
    Returns the adapted layers' names."""
    check_text_tower(model, "LoRA's classifier")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        names = apply_lora(model, rank=rank, alpha=alpha, towers=tuple(towers))
    model.eval()  # batch norms keep their statistics; the adapters have no dropout here
    prompts = [t.replace("{}", name) for name in classnames for t in templates]
    tokens = tokenizer(prompts, context_length=model.config.context_length).to(images.device)
    with torch.no_grad():
        fixed = _class_embeddings(model, tokens, len(classnames))  # (C, E)
    scale, y = model.logit_scale.exp().detach().float(), labels.long()

    def loss() -> torch.Tensor:
        classes = _class_embeddings(model, tokens, len(classnames)) if "text" in towers else fixed
        return F.cross_entropy(scale * model.encode_image(images).float() @ classes.T, y)

    optimize(lora_parameters(model), loss, steps=steps, lr=lr)
    return names


def _fit(task: FewShot, *, seed: int = 0, **options) -> nn.Module:
    """A copy of the model with trained LoRA layers: the task's model stays as it is."""
    part = copy.deepcopy(task.model)
    train = task.train
    train_lora(part, task.tokenizer, task.classnames, train.images, train.labels,
               templates=task.templates, seed=seed, **options)  # fmt: skip
    return part


def _test_logits(task: FewShot, part: nn.Module) -> torch.Tensor:
    classes = build_zero_shot_classifier(part, task.tokenizer, task.classnames, task.templates)
    return encode_images(part, task.test.images).float() @ classes.float().T


METHOD = Method(fit=_fit, test_logits=_test_logits, save=save_lora)
