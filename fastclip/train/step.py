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

In fp16 (GPUs without bf16: T4, V100) a GradScaler multiplies the loss by its scale before the
backward of step 2, so the cached features' gradients carry the scale into every micro-batch's
backward of step 3; the gradients are unscaled once, after averaging and before clipping. A step
whose gradients hold an inf or NaN is skipped (no update, the scale halved) and counted. The
learning rate follows the step counter whether a step was skipped or not, so a resumed run, which
restores the scale and the counts, takes the steps of an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fastclip.loss import ClipLoss
from fastclip.model import CLIP
from fastclip.siglip import SigLipLoss
from fastclip.train.processes import average_gradients

AUTOCAST = {  # --precision: autocast's dtype (None: fp32 throughout), under open_clip's names too
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,  # with a GradScaler: CUDA only
    "amp": torch.float16,  # open_clip's name for fp16 with a GradScaler
    "amp_bf16": torch.bfloat16,  # open_clip's name for bf16
}
PRECISIONS = ("auto", *AUTOCAST)  # auto: bf16 on CUDA, fp32 on a CPU
MAX_LOGIT_SCALE = math.log(100)  # CLIP's clamp: a temperature below 1/100 destabilizes training
# Steps in a row whose loss is inf or NaN, each skipped by the GradScaler, that make a diverged
# run: one bad batch costs a step, a loss that stays NaN would skip every step to the end.
MAX_NONFINITE_LOSSES = 10


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


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype of a PRECISIONS name on a device type ("cuda", "cpu"); None for fp32."""
    if precision == "auto":
        return torch.bfloat16 if device_type == "cuda" else None
    return AUTOCAST[precision]


def check_precision(precision: str, device: str) -> None:
    """A ValueError if ``precision`` is fp16 and ``device`` (one of processes.DEVICES) resolves to
    a CPU: fp16 autocast with a GradScaler is for GPUs without bf16."""
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if cpu and AUTOCAST.get(precision) == torch.float16:
        raise ValueError(
            f"--precision {precision} needs a CUDA device: fp16 training with a GradScaler is "
            "for GPUs without bf16 (T4, V100); on a CPU use fp32 or bf16"
        )


def autocast_for(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """The autocast context of a PRECISIONS name on ``device`` (disabled for fp32)."""
    dtype = autocast_dtype(precision, device.type)
    return lambda: torch.autocast(
        device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
    )


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16's GradScaler; a disabled one for the other precisions, whose calls pass through."""
    fp16 = autocast_dtype(precision, device.type) == torch.float16
    return torch.amp.GradScaler(device.type, enabled=fp16)


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


@dataclass
class Scaling:
    """A run's loss scaling: the GradScaler (disabled but for fp16) and the steps it skipped for
    inf/NaN gradients. Checkpointed: a resumed run goes on with the uninterrupted one's scale
    and counts."""

    scaler: torch.amp.GradScaler
    skipped: int = 0  # steps skipped, in all
    nonfinite: int = 0  # the latest steps in a row whose loss was inf or NaN

    def count(self, taken: bool, finite_loss: bool) -> bool:
        """Count a step, taken or skipped; returns whether the run diverged: a non-finite loss
        on a step that was taken (without a scaler every step is), or on MAX_NONFINITE_LOSSES
        steps in a row. Skipped steps with a finite loss (the scale was too high) are not."""
        self.skipped += not taken
        self.nonfinite = 0 if finite_loss else self.nonfinite + 1
        return self.nonfinite > 0 and (taken or self.nonfinite >= MAX_NONFINITE_LOSSES)

    def record(self) -> dict[str, float]:
        """The metrics of a loss record: the skipped steps and the scale (none without fp16)."""
        if not self.scaler.is_enabled():
            return {}
        return dict(skipped_steps=self.skipped, loss_scale=self.scaler.get_scale())

    def state_dict(self) -> dict:
        """The scaler's state and the counts, for a checkpoint."""
        return dict(scaler=self.scaler.state_dict(), skipped=self.skipped, nonfinite=self.nonfinite)

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s values; a checkpoint of another precision has no scale (the
        scaler then starts anew)."""
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.skipped, self.nonfinite = state.get("skipped", 0), state.get("nonfinite", 0)


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
