"""``--precision``: the autocast dtype, and fp16's loss scaling.

In fp16 (GPUs without bf16: T4, V100) a GradScaler scales the loss (``step`` says how the scale
reaches every micro-batch). A step whose gradients hold an inf or NaN is skipped (no update, the
scale halved) and counted. The learning rate follows the step counter whether a step was skipped
or not, so a resumed run, which restores the scale and the counts, takes the steps of an
uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

AUTOCAST = {  # --precision: autocast's dtype (None: fp32 throughout), under open_clip's names too
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,  # with a GradScaler: CUDA only
    "amp": torch.float16,  # open_clip's name for fp16 with a GradScaler
    "amp_bf16": torch.bfloat16,  # open_clip's name for bf16
}
PRECISIONS = ("auto", *AUTOCAST)  # auto: bf16 on CUDA, fp32 on a CPU
# Steps in a row whose loss is inf or NaN, each skipped by the GradScaler, that make a diverged
# run: one bad batch costs a step, a loss that stays NaN would skip every step to the end.
MAX_NONFINITE_LOSSES = 10


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
