"""The settings of a training run: one dataclass whose fields carry their defaults, their help
text and their allowed values (``settings.setting``). The command line (``fastclip train
--help``) is built from it, and every value is checked when a config is made, before a run
starts; what only the run's data, checkpoint or processes can tell (a batch larger than the
dataset, a ``--model`` other than the resumed checkpoint's) is checked as the run starts, before
it writes anything (``FlagError``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from fastclip.data import column_keywords, described, find
from fastclip.hub import repo_id
from fastclip.model import PRESETS
from fastclip.tokenizer import MIN_VOCAB_SIZE
from fastclip.train.losses import LOSSES
from fastclip.train.precision import PRECISIONS, check_precision
from fastclip.train.processes import DEVICES, check_available
from fastclip.train.reporting import REPORTERS, reporter_names
from fastclip.train.settings import check_setting, setting

# What a new run takes where --model, --loss or --vocab-size is not given (the fields' unset
# defaults); --resume and --init take their checkpoint's (fastclip.train.origin).
NEW_RUN = dict(model="tiny", loss="clip", vocab_size=1024)


class FlagError(ValueError):
    """A flag that the run's data, checkpoint or processes refuse, found as the run starts and
    before it writes anything: like a value out of range, one line and exit status 2."""


@dataclass
class TrainConfig:
    """Every field is a command-line flag: ``batch_size`` is ``--batch-size``, with the field's
    help (``dataclasses.fields(TrainConfig)[i].metadata["help"]``)."""

    out: str = setting("runs/shapes", "run directory: checkpoints, metrics.jsonl, metrics.png")
    data: str = setting("shapes", described("training"))
    image_column: str = setting("", "images' column of hf: or csv: data (empty: image, filepath)")
    caption_column: str = setting("", "captions' column of hf: or csv: data (empty: text, caption)")
    model: str = setting(
        "",
        f"a preset of fastclip.model.PRESETS; if not given, {NEW_RUN['model']}, or the "
        "checkpoint's with --resume or --init",
        choices=tuple(PRESETS),
    )
    init: str = setting("", "start from this checkpoint (and its tokenizer): fine-tuning")
    lock_image: bool = setting(False, "freeze the image tower and its head (LiT: train the text)")
    lock_text: bool = setting(False, "freeze the text tower and its head")
    loss: str = setting(
        "",
        f"the loss: clip is InfoNCE, siglip the sigmoid loss; if not given, {NEW_RUN['loss']}, "
        "or the checkpoint's with --resume or --init; siglip from a CLIP checkpoint (--init) "
        "adds SigLIP's logit bias, -10, and keeps the checkpoint's logit scale",
        choices=tuple(LOSSES),
    )
    steps: int = setting(1500, "optimizer steps", low=1)
    batch_size: int = setting(
        256, "contrastive batch: pairs per step, all processes together", low=1
    )
    micro_batch: int = setting(
        0, "rows per forward with gradients, per process (0: all; else feature cache)", low=0
    )
    lr: float = setting(
        2e-3, "peak learning rate (AdamW, betas 0.9/0.98, eps 1e-6)", low=0, above=True
    )
    weight_decay: float = setting(
        0.1, "on weight matrices only; none on biases, norms, scalars", low=0
    )
    warmup: int = setting(100, "linear warm-up steps, then cosine decay to 0", low=0)
    grad_clip: float = setting(1.0, "max global gradient norm (0: off)", low=0)
    precision: str = setting(
        "auto",
        "autocast: bf16, or fp16 with a GradScaler (CUDA only); open_clip's amp is fp16, "
        "amp_bf16 bf16; auto is bf16 on CUDA, fp32 on CPU",
        choices=PRECISIONS,
    )
    device: str = setting(
        "auto",
        "auto: CUDA (one GPU per process, NCCL) when present, else CPU (gloo)",
        choices=DEVICES,
    )
    grad_checkpointing: bool = setting(False, "recompute transformer blocks in backward")
    augment: bool = setting(True, "random resized crops (area 0.9-1) while training")
    vocab_size: int = setting(
        0,
        f"size of the BPE a new run learns from the captions, 0: {NEW_RUN['vocab_size']}; "
        "--resume and --init use the checkpoint's tokenizer",
        low=MIN_VOCAB_SIZE,
    )
    samples: int = setting(0, "generated training images (0: the dataset's default)", low=0)
    workers: int = setting(0, "DataLoader worker processes", low=0)
    log_every: int = setting(10, "steps between metric records", low=1)
    eval_every: int = setting(250, "steps between evaluations (0: at the end only)", low=0)
    save_every: int = setting(500, "steps between checkpoints (0: at the end only)", low=0)
    resume: bool = setting(False, "continue from the run directory's latest checkpoint")
    overwrite: bool = setting(
        False,
        "delete the run directory's earlier run first: what its manifest lists, no other file",
    )
    seed: int = setting(0, "model initialization, data order and augmentation", low=0)
    report_to: str = setting(
        "", f"also log the records to {' and/or '.join(REPORTERS)}, comma-separated"
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            check_setting(f, getattr(self, f.name), f.name)
        column_keywords(find(self.data)[0], self.image_column, self.caption_column)
        reporter_names(self.report_to)
        check_available(self.device)
        check_precision(self.precision, self.device)
        if self.init and not (Path(self.init).exists() or repo_id(self.init)):
            raise ValueError(
                f"--init names no checkpoint: {self.init!r} is neither a path nor a Hub name"
            )
        if self.lock_image and self.lock_text:
            raise ValueError("--lock-image and --lock-text together leave nothing to train")
        if self.resume and self.overwrite:
            raise ValueError(
                "--resume continues the run in --out, --overwrite deletes it: not both"
            )
