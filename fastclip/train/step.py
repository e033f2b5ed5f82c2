"""One optimizer step on a contrastive batch, and what it is made of: the loss, AdamW's groups,
the learning-rate schedule and locked towers.

One step sees a contrastive batch of ``--batch-size`` pairs over all processes:

  1. every micro-batch of ``--micro-batch`` rows is encoded without gradients (feature cache);
  2. the fused loss runs on the whole batch's features (gathered across processes with their
     gradients), and its backward gives d loss / d features for every row;
  3. every micro-batch is encoded again, with gradients, and back-propagates its rows' slice.

So the contrastive batch is the full batch, however small the micro-batches that fit in memory:
unlike naive gradient accumulation, every pair is scored against every other. Gradients are then
averaged across processes once per step, as DistributedDataParallel does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch

from fastclip.loss import ClipLoss
from fastclip.model import CLIP
from fastclip.siglip import SigLipLoss

PRECISIONS = ("auto", "fp32", "bf16")
MAX_LOGIT_SCALE = math.log(100)  # CLIP's clamp: a temperature below 1/100 destabilizes training


class Loss(NamedTuple):
    """A training loss: how to build it for (rank, world size), and the CLIPConfig fields a new
    model trained with it starts from."""

    build: Callable[[int, int], torch.nn.Module]
    model_fields: dict


LOSSES = {
    "clip": Loss(
        lambda rank, world: ClipLoss(
            local_loss=True, gather_with_grad=True, rank=rank, world_size=world
        ),
        {},
    ),
    "siglip": Loss(  # SigLIP's initial t' = log 10 and b = -10
        lambda rank, world: SigLipLoss(rank=rank, world_size=world),
        dict(logit_scale_init=math.log(10), logit_bias_init=-10.0),
    ),
}


def autocast_for(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """The autocast context of a PRECISIONS name: bf16 if asked, or by default on CUDA."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


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


def contrastive_step(
    model: CLIP,
    loss_fn: torch.nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    micro_batch: int,
    autocast: Callable[[], AbstractContextManager],
) -> torch.Tensor:
    """Forward and backward of this process's rows (B, ...) of the contrastive batch, in
    micro-batches of ``micro_batch`` rows with a feature cache (see the module docstring).
    Returns the loss (detached)."""
    if micro_batch <= 0 or micro_batch >= images.shape[0]:
        with autocast():
            loss = loss_fn(*model(images, tokens))
        loss.backward()
        return loss.detach()
    chunks = list(zip(images.split(micro_batch), tokens.split(micro_batch), strict=True))
    with torch.no_grad(), autocast():  # 1. the feature cache
        cached = [(model.encode_image(i), model.encode_text(t)) for i, t in chunks]
    image_features = torch.cat([f for f, _ in cached]).requires_grad_()  # (B, E)
    text_features = torch.cat([f for _, f in cached]).requires_grad_()  # (B, E)
    with autocast():  # 2. the loss over the whole batch: gradients for features and scale
        loss = loss_fn(image_features, text_features, *_scale_and_bias(model))
    loss.backward()
    grads = zip(
        image_features.grad.split(micro_batch), text_features.grad.split(micro_batch), strict=True
    )
    for (i, t), (d_image, d_text) in zip(chunks, grads, strict=True):  # 3. re-encode, backward
        with autocast():
            outputs = [model.encode_image(i), model.encode_text(t)]
        pairs = zip(outputs, (d_image, d_text), strict=True)
        live = [(f, g.to(f.dtype)) for f, g in pairs if f.requires_grad]  # not a locked tower's
        torch.autograd.backward(*zip(*live, strict=True))
    return loss.detach()


def _scale_and_bias(model: CLIP) -> list[torch.Tensor]:
    """The loss's remaining arguments, as the model's forward returns them."""
    return [model.logit_scale.exp()] + ([] if model.logit_bias is None else [model.logit_bias])


class Diverged(ArithmeticError):
    """The loss, or the learned temperature or bias, left the finite numbers: training diverged."""


def finite(model: CLIP, loss: torch.Tensor) -> bool:
    """Whether the loss and the model's logit scale and bias are all finite (one number read back
    from the device)."""
    values = [loss.detach().float(), *(t.detach().float() for t in _scale_and_bias(model))]
    return bool(torch.isfinite(torch.stack(values)).all())


def clamp_logit_scale(model: CLIP) -> None:
    """Keep the learned temperature within CLIP's bound after an update."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


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
