"""What trains and how fast: locked towers, CLIP's AdamW and its parameter groups, and the
learning-rate schedule."""

from __future__ import annotations

import math

import torch

from fastclip.model import CLIP


def lock_towers(model: CLIP, image: bool, text: bool) -> None:
    """Freeze whole towers with their heads: their weights stay bit for bit what they were."""
    for locked, tower, head in (
        (image, model.visual, model.visual_proj),
        (text, model.text, model.text_proj),
    ):
        for p in (*tower.parameters(), *head.parameters()):
            p.requires_grad_(not locked)
        if locked:
            tower.eval()  # batch norms keep their statistics


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """CLIP's AdamW groups: weight decay on matrices, none on biases, norms' gains, embeddings'
    class token, the logit scale and bias (every parameter of < 2 dimensions)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    rest = [p for p in trainable if p.ndim < 2]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """CLIP's optimizer: AdamW with betas (0.9, 0.98) and eps 1e-6 over ``param_groups``."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)


def cosine_schedule(step: int, warmup: int, steps: int) -> float:
    """The learning rate's multiplier: linear warm-up over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
