"""Experiment trackers that ``--report-to`` names: the records ``metrics.jsonl`` holds, logged to
TensorBoard (event files in ``out/tensorboard``) or Weights & Biases (``out/wandb``; offline
with ``WANDB_MODE=offline``, project from ``WANDB_PROJECT``, default "fastclip").

Each is a sink of ``fastclip.train.metrics`` (``write(record)``, ``close()``) and an optional
extra of the same name, checked when the config is made; a new tracker is one more class in
``REPORTERS``.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastclip.checks import one_of
from fastclip.extras import require
from fastclip.train.metrics import Sink


class TensorBoard:
    """Scalars in TensorBoard event files under ``out/tensorboard``, one tag per metric. A
    resumed run hides the events after its checkpoint's step, which it logs again."""

    module = "tensorboard"
    folder = "tensorboard"  # what it writes in the run directory

    def __init__(self, out: Path, start: int, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(out / self.folder, purge_step=start + 1 if start else None)

    def write(self, record: dict[str, float]) -> None:
        """Every metric of the record as a scalar at its step."""
        for name, value in record.items():
            if name != "step":
                self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        """Flush the event file."""
        self.writer.close()


class WandB:
    """A Weights & Biases run in ``out/wandb``, named after the run directory, with the config."""

    module = "wandb"
    folder = "wandb"  # what it writes in the run directory (wandb.init's dir=out makes it)

    def __init__(self, out: Path, start: int, config: dict):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "fastclip"),
            name=out.resolve().name,
            dir=out,
            config=config,
        )

    def write(self, record: dict[str, float]) -> None:
        """The record's metrics at its step."""
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        """Finish the run (an offline run's files are complete then)."""
        self.run.finish()


REPORTERS = {"tensorboard": TensorBoard, "wandb": WandB}


def reporter_names(report_to: str) -> list[str]:
    """The trackers a comma-separated ``report_to`` names ("": none), each checked to be known
    and installed: a ValueError, or an ImportError naming the extra, before a run starts."""
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    for name in names:
        if name not in REPORTERS:
            raise ValueError(f"report_to must name {one_of(list(REPORTERS))}, got {name!r}")
        require(REPORTERS[name].module, f"--report-to {name}", f'"fastclip-triton[{name}]"')
    return names


def open_reporters(report_to: str, out: Path, start: int, config: dict) -> list[Sink]:
    """A sink per tracker ``report_to`` names, for a run in ``out`` from step ``start`` on."""
    return [REPORTERS[name](out, start, config) for name in reporter_names(report_to)]
