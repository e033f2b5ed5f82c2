"""The settings of a training run: one dataclass whose fields carry their defaults, their help
text and their allowed values. The command line (``fastclip train --help``) is built from it, and
every value is checked when a config is made, before a run starts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from fastclip.checks import check_choice
from fastclip.data import column_keywords, described, find
from fastclip.model import PRESETS
from fastclip.train.processes import DEVICES
from fastclip.train.reporting import REPORTERS, reporter_names
from fastclip.train.step import LOSSES, PRECISIONS


def setting(default: Any, help: str, choices: Sequence[str] = ()) -> Any:
    """A config field: its default, its ``--flag``'s help and, for a str, its allowed values."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices)})


@dataclass
class TrainConfig:
    """Every field is a command-line flag: ``batch_size`` is ``--batch-size``, with the field's
    help (``dataclasses.fields(TrainConfig)[i].metadata["help"]``)."""

    out: str = setting("runs/shapes", "run directory: checkpoints, metrics.jsonl, metrics.png")
    data: str = setting("shapes", described("training"))
    image_column: str = setting("", "images' column of hf: or csv: data (empty: image, filepath)")
    caption_column: str = setting("", "captions' column of hf: or csv: data (empty: text, caption)")
    model: str = setting("tiny", f"preset: {', '.join(PRESETS)}")
    init: str = setting("", "start from this checkpoint (and its tokenizer): fine-tuning")
    lock_image: bool = setting(False, "freeze the image tower and its head (LiT: train the text)")
    lock_text: bool = setting(False, "freeze the text tower and its head")
    loss: str = setting("clip", "clip (InfoNCE) | siglip", choices=tuple(LOSSES))
    steps: int = setting(1500, "optimizer steps")
    batch_size: int = setting(256, "contrastive batch: pairs per step, all processes together")
    micro_batch: int = setting(
        0, "rows per forward with gradients, per process (0: all; else feature cache)"
    )
    lr: float = setting(2e-3, "peak learning rate (AdamW, betas 0.9/0.98, eps 1e-6)")
    weight_decay: float = setting(0.1, "on weight matrices only; none on biases, norms, scalars")
    warmup: int = setting(100, "linear warm-up steps, then cosine decay to 0")
    grad_clip: float = setting(1.0, "max global gradient norm (0: off)")
    precision: str = setting(
        "auto", "fp32 | bf16 (autocast) | auto: bf16 on CUDA, fp32 on CPU", choices=PRECISIONS
    )
    device: str = setting(
        "auto",
        "cuda | cpu | auto: CUDA (one GPU per process, NCCL) when present, else CPU (gloo)",
        choices=DEVICES,
    )
    grad_checkpointing: bool = setting(False, "recompute transformer blocks in backward")
    augment: bool = setting(True, "random resized crops (area 0.9-1) while training")
    vocab_size: int = setting(1024, "size of the BPE trained on the captions (a new run)")
    samples: int = setting(0, "generated training images (0: the dataset's default)")
    workers: int = setting(0, "DataLoader worker processes")
    log_every: int = setting(10, "steps between metric records")
    eval_every: int = setting(250, "steps between evaluations (0: at the end only)")
    save_every: int = setting(500, "steps between checkpoints (0: at the end only)")
    resume: bool = setting(False, "continue from the run directory's latest checkpoint")
    seed: int = setting(0, "model initialization, data order and augmentation")
    report_to: str = setting(
        "", f"also log the records to {' and/or '.join(REPORTERS)}, comma-separated"
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.metadata["choices"]:
                check_choice(f.name, getattr(self, f.name), f.metadata["choices"])
        column_keywords(find(self.data)[0], self.image_column, self.caption_column)
        reporter_names(self.report_to)
        if self.lock_image and self.lock_text:
            raise ValueError("lock_image and lock_text together leave nothing to train")
