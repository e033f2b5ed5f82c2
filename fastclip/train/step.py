"""One optimizer step on a contrastive batch, and the checks after it: a finite loss and
temperature, the temperature within CLIP's bound.

One step sees a contrastive batch of ``--batch-size`` pairs over all processes:

  1. every micro-batch of ``--micro-batch`` rows is encoded without gradients (feature cache);
  2. the fused loss runs on the whole batch's features (gathered across processes with their
     gradients), and its backward gives d loss / d features for every row;
  3. every micro-batch is encoded again, with gradients, and back-propagates its rows' slice.

So the contrastive batch is the full batch, however small the micro-batches that fit in memory:
unlike naive gradient accumulation, every pair is scored against every other. Gradients are then
averaged across processes once per step, as DistributedDataParallel does.

In fp16 (``precision``) a GradScaler multiplies the loss by its scale before the backward of
step 2, so the cached features' gradients carry the scale into every micro-batch's backward of
step 3; the gradients are unscaled once, after averaging and before clipping.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from fastclip.model import CLIP
from fastclip.train.processes import average_gradients

MAX_LOGIT_SCALE = math.log(100)  # CLIP's clamp: a temperature below 1/100 destabilizes training


def contrastive_step(
    model: CLIP,
    loss_fn: torch.nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    micro_batch: int,
    autocast: Callable[[], AbstractContextManager],
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Forward and backward of this process's rows (B, ...) of the contrastive batch, in
    micro-batches of ``micro_batch`` rows with a feature cache (see the module docstring). With
    a ``scaler`` the gradients are those of the scaled loss. Returns the loss (detached,
    unscaled)."""
    scale = scaler.scale if scaler is not None else lambda loss: loss
    if micro_batch <= 0 or micro_batch >= images.shape[0]:
        with autocast():
            loss = loss_fn(*model(images, tokens))
        scale(loss).backward()
        return loss.detach()
    chunks = list(zip(images.split(micro_batch), tokens.split(micro_batch), strict=True))
    with torch.no_grad(), autocast():  # 1. the feature cache
        cached = [(model.encode_image(i), model.encode_text(t)) for i, t in chunks]
    image_features = torch.cat([f for f, _ in cached]).requires_grad_()  # (B, E)
    text_features = torch.cat([f for _, f in cached]).requires_grad_()  # (B, E)
    with autocast():  # 2. the loss over the whole batch: gradients for features and scale
        loss = loss_fn(image_features, text_features, *_scale_and_bias(model))
    scale(loss).backward()  # the features' gradients carry the scale into step 3
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


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    grad_clip: float,
    world: int,
) -> bool:
    """The update from ``contrastive_step``'s gradients: averaged over the processes, unscaled,
    clipped to a global norm of ``grad_clip`` (0: not), then the optimizer's step unless the
    scaler finds an inf or NaN. Returns whether the step was taken.

    Every process holds the same scale, so the average of the scaled gradients is the scaled
    average; unscaled after it, an inf or NaN of any process is in every process's average, and
    every process skips the step and halves its scale alike."""
    average_gradients(model, world)
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= scale  # a skipped step lowers the scale (disabled: always 1)


def _scale_and_bias(model: CLIP) -> list[torch.Tensor]:
    """The loss's remaining arguments, as the model's forward returns them."""
    return [model.logit_scale.exp()] + ([] if model.logit_bias is None else [model.logit_bias])


class Diverged(ArithmeticError):
    """The loss, or the learned temperature or bias, left the finite numbers: training diverged."""


def finite(model: CLIP, loss: torch.Tensor) -> tuple[bool, bool]:
    """Whether the loss is finite, and whether the model's logit scale and bias are (one read
    back from the device)."""
    values = [loss.detach().float(), *(t.detach().float() for t in _scale_and_bias(model))]
    ok = torch.isfinite(torch.stack(values)).tolist()
    return ok[0], all(ok[1:])


def clamp_logit_scale(model: CLIP) -> None:
    """Keep the learned temperature within CLIP's bound after an update."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
