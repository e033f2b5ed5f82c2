"""Where a run's model comes from: a new ``--model`` (with a BPE learned from the captions), the
checkpoint ``--init`` names (a new run from its weights), or the run directory's latest
checkpoint (``--resume``: the same run, continued).

``--model``, ``--loss`` and ``--vocab-size`` left unset take the checkpoint's; given, they must
agree with it, or the run is refused in one line naming both: nothing is silently ignored. A new
run from ``--init`` may change the loss: a checkpoint without a logit bias (trained with InfoNCE)
gets SigLIP's initial bias, -10, for ``--loss siglip`` and keeps its own logit scale, which
fits its features; a SigLIP checkpoint's bias is dropped for ``--loss clip``. A resumed run
keeps its loss and its locked towers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastclip.checkpoint import load_pretrained
from fastclip.model import CLIP, PRESETS, CLIPConfig
from fastclip.tokenizer import Tokenizer
from fastclip.train.config import NEW_RUN, FlagError, TrainConfig
from fastclip.train.directory import latest_checkpoint
from fastclip.train.losses import LOSSES
from fastclip.train.state import read_trainer, saved_config

# The CLIPConfig fields that make a preset's architecture; the tokenizer sets the vocabulary and
# the context, the loss the initial scale and bias, and OpenAI's weights QuickGELU.
ARCHITECTURE = ("embed_dim", "image_size", "vision_layers", "vision_width", "vision_heads",
                "patch_size", "text_width", "text_heads", "text_layers", "mlp_ratio",
                "proj_bias")  # fmt: skip


@dataclass
class Origin:
    """What a run starts from: a pretrained model and its tokenizer (None for a new ``--model``,
    built once the tokenizer is learned), and a resumed checkpoint's trainer state."""

    model: CLIP | None = None
    tokenizer: Tokenizer | None = None
    source: str = ""  # the checkpoint, in words: "--init <path>", "<out>/step-000300"
    trainer: dict | None = None  # --resume's: step, optimizer, loss scaling, RNGs, config
    notes: list[str] = field(default_factory=list)  # what was adapted, a line each

    @property
    def start(self) -> int:
        """The first step to take: 0, or the resumed checkpoint's."""
        return self.trainer["step"] if self.trainer else 0


def preset_of(config: CLIPConfig) -> str | None:
    """The preset whose architecture ``config`` has, if any."""
    same = lambda preset: all(getattr(preset, f) == getattr(config, f) for f in ARCHITECTURE)  # noqa: E731
    return next((name for name, preset in PRESETS.items() if same(preset)), None)


def described(config: CLIPConfig) -> str:
    """A model's architecture in words: its preset's name, else its widths."""
    return preset_of(config) or (
        f"a model of no preset (embed_dim {config.embed_dim}, vision width "
        f"{config.vision_width}, text width {config.text_width})"
    )


def start(cfg: TrainConfig, checkpoint: Path | None) -> tuple[TrainConfig, Origin]:
    """The run's origin: ``checkpoint`` (``--resume``'s), else ``--init``'s, else a new model;
    and ``cfg`` with ``model``, ``loss`` and ``vocab_size`` as the run uses them. A FlagError
    if a flag given conflicts with the checkpoint."""
    if checkpoint is None and not cfg.init:
        defaults = {name: getattr(cfg, name) or value for name, value in NEW_RUN.items()}
        return dataclasses.replace(cfg, **defaults), Origin()
    path = checkpoint or latest_checkpoint(Path(cfg.init)) or cfg.init  # a Hub name stays a str
    origin = Origin(trainer=read_trainer(path) if checkpoint else None)
    origin.model = load_pretrained(path).train()
    origin.tokenizer = Tokenizer.from_pretrained(path)
    origin.source = str(path) if checkpoint else f"--init {cfg.init}"
    whose = "the run's" if checkpoint else "the checkpoint's"
    architecture = described(origin.model.config)
    if cfg.model and preset_of(origin.model.config) != cfg.model:
        raise FlagError(
            f"--model {cfg.model} conflicts with {whose} {architecture} ({path}): drop --model "
            f"to {'continue' if checkpoint else 'start from'} it"
        )
    saved = origin.trainer.get("config", {}) if origin.trainer else saved_config(Path(path))
    size, asked = origin.tokenizer.vocab_size, saved.get("vocab_size")  # a BPE may learn fewer
    vocab = asked or size
    if cfg.vocab_size and cfg.vocab_size != vocab:
        learned = f"learned with --vocab-size {asked}: " if asked else ""
        raise FlagError(
            f"--vocab-size {cfg.vocab_size} conflicts with {whose} tokenizer ({learned}{size} "
            f"tokens, {path}): drop --vocab-size to use it"
        )
    has_bias = origin.model.logit_bias is not None
    if checkpoint is not None:
        loss = _check_resumed(cfg, saved, has_bias, checkpoint)
    else:
        loss = cfg.loss or saved.get("loss") or ("siglip" if has_bias else "clip")
        origin.notes += _fit_loss(origin.model, loss, cfg.init)
    resolved = dict(model=preset_of(origin.model.config) or "", loss=loss, vocab_size=vocab)
    return dataclasses.replace(cfg, **resolved), origin


def _check_resumed(cfg: TrainConfig, saved: dict, has_bias: bool, checkpoint: Path) -> str:
    """The loss of the run ``--resume`` continues; a FlagError if the flags change its loss or
    its locked towers."""
    loss = saved.get("loss") or ("siglip" if has_bias else "clip")
    if cfg.loss and cfg.loss != loss:
        raise FlagError(
            f"--loss {cfg.loss} conflicts with the run's {loss} ({checkpoint}): a resumed run "
            f"keeps its loss; drop --loss, or start a new run from it with --init {checkpoint} "
            f"--loss {cfg.loss}"
        )
    for tower in ("image", "text"):
        locked = saved.get(f"lock_{tower}", False)
        if getattr(cfg, f"lock_{tower}") != locked:
            given, run = ("no ", "locks") if locked else ("", "trains")
            raise FlagError(
                f"{given}--lock-{tower} conflicts with the run's, which {run} its {tower} tower "
                f"({checkpoint}): resume it {'with' if locked else 'without'} --lock-{tower}"
            )
    return loss


def _fit_loss(model: CLIP, loss: str, init: str) -> list[str]:
    """Give ``--init``'s model the logit bias ``loss`` trains (SigLIP's) or drop the one it
    does not (InfoNCE's); returns what was done, in a line."""
    bias = LOSSES[loss].model_fields.get("logit_bias_init")
    if (bias is None) == (model.logit_bias is None):
        return []
    model.config = dataclasses.replace(model.config, logit_bias_init=bias)
    if bias is None:
        model.logit_bias = None
        return [f"--init {init}: its logit bias is dropped: --loss clip (InfoNCE) has none"]
    device = model.logit_scale.device
    model.logit_bias = torch.nn.Parameter(torch.tensor(float(bias), device=device))
    scale = model.logit_scale.exp().item()
    return [
        f"--init {init}: its model has no logit bias (trained with InfoNCE); --loss siglip starts "
        f"one at {bias:g} as SigLIP does, and keeps the checkpoint's logit scale ({scale:.3g})"
    ]
