"""A run's checkpoints: ``<out>/step-NNNNNN`` directories in the ``save_pretrained`` layout plus
``trainer.pt`` (step, optimizer, loss scaling, RNG states, config), each complete before it is
named, and ``<out>/latest`` naming the newest. A save cut short (a kill, a full disk, Ctrl-C)
leaves the previous checkpoint and ``latest`` as they were; one that fails removes what it
wrote. What ``save_checkpoint`` writes, ``restore`` reads back, so a resumed run continues bit
for bit. Every entry is recorded in the run's manifest before it is written
(``fastclip.train.directory``), and pruning deletes only the run's own checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
from pathlib import Path

import torch

from fastclip.checkpoint import save_pretrained
from fastclip.files import disk_full, write_text, write_torch
from fastclip.model import CLIP
from fastclip.tokenizer import Tokenizer
from fastclip.train.config import TrainConfig
from fastclip.train.directory import (
    TRAINER,
    RunFiles,
    checkpoint_name,
    latest_checkpoint,
    temporary,
)
from fastclip.train.precision import Scaling

KEEP = 2  # checkpoints kept in a run directory; older ones are deleted after each save


def rng_states() -> dict:
    """The host's random generators, torch's and Python's, as a checkpoint stores them. (A step
    draws nothing from the GPU's generator, which a save reads as it is.)"""
    return dict(torch_rng=torch.get_rng_state(), python_rng=list(random.getstate()[1]))


def save_checkpoint(
    files: RunFiles,
    step: int,
    model: CLIP,
    tokenizer: Tokenizer,
    optimizer: torch.optim.Optimizer,
    scaling: Scaling,
    cfg: TrainConfig,
    rng: dict | None = None,
) -> Path:
    """Write ``<out>/step-NNNNNN`` under a temporary name, rename it, point ``latest`` at it and
    delete all of the run's checkpoints but the newest KEEP; ``rng``: the RNG states at the end
    of the step (default: now). Returns the checkpoint's directory. A save that fails removes its
    temporary directory; on a full disk the error is one OSError saying so."""
    out = files.out
    final = out / checkpoint_name(step)
    tmp = out / temporary(final.name)
    state = dict(
        step=step,
        optimizer=optimizer.state_dict(),
        scaling=scaling.state_dict(),
        config=dataclasses.asdict(cfg),
        **(rng or rng_states()),
    )
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    try:
        files.add(tmp.name, final.name, "latest")
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, tmp, tokenizer)
        write_torch(tmp / TRAINER, state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text(out / "latest", final.name + "\n")
        files.discard(tmp.name)
        for old in outdated(files, step):
            shutil.rmtree(old)
            files.discard(old.name)
    except BaseException as e:  # Ctrl-C too: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):  # the deletion freed the little space this takes
            files.discard(*(path.name for path in (tmp, final) if not path.exists()))
        if isinstance(e, Exception) and disk_full(e):
            raise OSError(f"no space left on device while saving step {step} to {out}; "
                          f"{_kept(out)}") from e  # fmt: skip
        raise
    return final


def _kept(out: Path) -> str:
    """What a failed save left to continue from, in words."""
    try:
        latest = latest_checkpoint(out)
    except ValueError:
        latest = None
    if latest is None:
        return "no checkpoint was saved before it"
    return f"{latest.name} is intact: free some space, then --resume continues from it"


def outdated(files: RunFiles, step: int) -> list[Path]:
    """The run's checkpoints to delete once step ``step``'s is saved: all but it and the KEEP - 1
    newest before it. Those after it, left by an interrupted attempt at this run, go too: the
    run writes them again."""
    steps = files.checkpoints()
    kept = [step, *sorted((s for s in steps if s < step), reverse=True)[: KEEP - 1]]
    return [path for s, path in steps.items() if s not in kept]


def read_trainer(checkpoint: Path) -> dict:
    """What ``save_checkpoint`` wrote beside the weights; a ValueError if the checkpoint has no
    ``trainer.pt`` (weights alone: ``--init`` starts a new run from them)."""
    path = checkpoint / TRAINER
    if not path.is_file():
        raise ValueError(
            f"{checkpoint} has no {TRAINER}: it is no checkpoint of a fastclip train run, which "
            f"--resume continues (--init starts a new run from its weights)"
        )
    return torch.load(path, weights_only=True)


def saved_config(checkpoint: Path) -> dict:
    """The settings of the run that saved ``checkpoint`` ({} for weights from elsewhere), read
    without loading its optimizer state into memory."""
    path = checkpoint / TRAINER
    if not path.is_file():
        return {}
    return torch.load(path, weights_only=True, mmap=True).get("config", {})


def restore(state: dict, optimizer: torch.optim.Optimizer, scaling: Scaling) -> int:
    """Restore ``read_trainer``'s state into ``optimizer``, ``scaling`` and the RNGs; returns
    the step to continue from."""
    optimizer.load_state_dict(state["optimizer"])
    scaling.load_state_dict(state.get("scaling", {}))  # none in a checkpoint from before fp16
    torch.set_rng_state(state["torch_rng"])
    random.setstate((3, tuple(state["python_rng"]), None))
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    return state["step"]
