"""A run's records and where they go. Every record (a step's loss, learning rate, throughput;
an evaluation's metrics) goes to each sink: ``metrics.jsonl``, one JSON object per line, the
progress bar, and the experiment trackers that ``--report-to`` names: TensorBoard (event files in
``out/tensorboard``) or Weights & Biases (``out/wandb``; offline with ``WANDB_MODE=offline``,
project from ``WANDB_PROJECT``, default "fastclip"). Another destination is one more class with
``write(record)`` and ``close()``; a tracker is an optional extra of the same name, checked when
the config is made, and one more class in ``REPORTERS``. At the end, ``plot`` draws
``metrics.png`` from the JSONL file and ``summary`` words the final evaluation."""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from fastclip.checks import one_of
from fastclip.extras import require
from fastclip.files import write_text


class Sink(Protocol):
    """Where records go."""

    def write(self, record: dict[str, float]) -> None:
        """Take one record: its "step", then metric names and values."""

    def close(self) -> None:
        """The run has ended: flush and release what is held."""


class JsonlFile:
    """Records appended to a JSONL file. Opened at ``start`` > 0 (a resumed run), it first drops
    the records after that step, which the run writes again: none is duplicated. A last line
    that a kill cut short is dropped too."""

    def __init__(self, path: Path, start: int):
        self.path = path
        if path.is_file():
            kept = [r for r in read_records(path) if r["step"] <= start]
            write_text(path, "".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: dict[str, float]) -> None:
        """Append the record as one line."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """Nothing is held open between records."""


class ProgressBar:
    """The step counter on stderr, showing the last loss record (in fp16 with the skipped steps)
    and printing evaluations."""

    def __init__(self, steps: int, start: int, enabled: bool):
        self.bar = tqdm(
            total=steps,
            initial=start,
            disable=not enabled,
            desc="train",
            dynamic_ncols=True,
            mininterval=0.2 if sys.stderr.isatty() else 30,  # in a log file: a line per 30 s
        )

    def write(self, record: dict[str, float]) -> None:
        """Show a loss record beside the bar; print an evaluation's metrics above it."""
        if "loss" in record:
            skipped = {"skipped": record["skipped_steps"]} if "skipped_steps" in record else {}
            self.bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                samples_s=f"{record['samples_per_s']:.0f}",
                lr=f"{record['lr']:.1e}",
                **skipped,  # steps fp16's GradScaler skipped, so far
            )
        else:
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in record.items() if k != "step")
            self.bar.write(f"step {record['step']}: {metrics}")

    def update(self) -> None:
        """One more step done."""
        self.bar.update(1)

    def close(self) -> None:
        """End the bar's line."""
        self.bar.close()


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


def read_records(path: Path) -> list[dict[str, float]]:
    """The records of a JSONL file. A torn last line (a write cut short by a kill) is dropped with
    a warning; any other line that is not a record is a ValueError naming the file and line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record with a step")
        except ValueError as e:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}, is not a metrics record: {e}") from None
            warnings.warn(f"{path}: dropped its torn last line ({line[:40]!r})", stacklevel=2)
            continue
        records.append(record)
    return records


def plot(metrics_path: Path, png: Path) -> None:
    """Loss and evaluation metrics over steps, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    records = read_records(metrics_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "loss" not in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train])
    left.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
    for key in sorted(k for k in {k for r in evals for k in r} if k.endswith(("top1", "R@1"))):
        points = [(r["step"], r[key]) for r in evals if key in r]
        right.plot(*zip(*points, strict=True), marker="o", label=key)
    right.set(xlabel="step", ylabel="top-1 accuracy / recall@1", title="evaluation", ylim=(0, 1.02))
    if right.lines:
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def summary(
    metrics: dict[str, float], out: Path, skipped: Mapping[str, int], world: int = 1
) -> str:
    """The run's last lines: where its files are, the samples it skipped (by reason, as rank 0
    counted them) and the final evaluation."""
    lines = [f"done: checkpoints, metrics.jsonl and metrics.png in {out}"]
    if skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in Counter(skipped).most_common())
        where = " on rank 0" if world > 1 else ""
        lines.append(f"bad samples skipped{where}: {sum(skipped.values())} ({reasons})")
    lines += [f"  {k:<28} {v:6.1%}" for k, v in metrics.items()]
    return "\n".join(lines)
