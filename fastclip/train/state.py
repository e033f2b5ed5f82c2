"""A run's directory and checkpoints: ``<out>/step-NNNNNN`` directories in the
``save_pretrained`` layout plus ``trainer.pt`` (step, optimizer, loss scaling, RNG states,
config), each complete before it is named, and ``<out>/latest`` naming the newest. A kill
mid-save leaves only a temporary directory behind. What ``save_checkpoint`` writes, ``resume``
reads back, so a resumed run continues bit for bit. A directory holds one run: a new run refuses
one that holds another, unless told to continue it (``resume``) or to delete it first
(``overwrite``)."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
from pathlib import Path

import torch

from fastclip.checkpoint import save_pretrained
from fastclip.files import write_text
from fastclip.model import CLIP
from fastclip.tokenizer import Tokenizer
from fastclip.train.config import TrainConfig
from fastclip.train.step import Scaling

KEEP = 2  # checkpoints kept in a run directory; older ones are deleted after each save
RUN_FILES = ("latest", "step-*", ".tmp-step-*", "metrics.jsonl", "metrics.png", "tokenizer")
CHECKPOINT = re.compile(r"step-(\d+)")  # a checkpoint's directory name, and its step


def run_files(out: Path) -> list[Path]:
    """What a run wrote into ``out`` (RUN_FILES), if anything."""
    return sorted(path for pattern in RUN_FILES for path in out.glob(pattern))


def claim(out: Path, resume: bool, overwrite: bool) -> None:
    """Check that a run may use ``out``: a ValueError if it holds another run, unless the new one
    continues it (``resume``) or deletes it first (``overwrite``)."""
    found = run_files(out)
    if found and not (resume or overwrite):
        names = ", ".join(path.name for path in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(
            f"{out} holds an earlier run ({names}): pass --resume to continue it, or "
            "--overwrite to delete it and start over (or choose another --out)"
        )


def clear(out: Path) -> None:
    """Delete what an earlier run wrote into ``out``; other files stay."""
    for path in run_files(out):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def save_checkpoint(
    out: Path,
    step: int,
    model: CLIP,
    tokenizer: Tokenizer,
    optimizer: torch.optim.Optimizer,
    scaling: Scaling,
    cfg: TrainConfig,
) -> Path:
    """Write ``<out>/step-NNNNNN`` under a temporary name, rename it, point ``latest`` at it and
    delete all but the newest KEEP checkpoints. Returns the checkpoint's directory."""
    final = out / f"step-{step:06d}"
    tmp = out / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, tokenizer)
    state = dict(
        step=step,
        optimizer=optimizer.state_dict(),
        scaling=scaling.state_dict(),
        config=dataclasses.asdict(cfg),
        torch_rng=torch.get_rng_state(),
        python_rng=list(random.getstate()[1]),
    )
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    torch.save(state, tmp / "trainer.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_text(out / "latest", final.name + "\n")
    for old in outdated(out, step):
        shutil.rmtree(old)
    return final


def outdated(out: Path, step: int) -> list[Path]:
    """The checkpoints to delete once step ``step``'s is saved: all but it and the KEEP - 1
    newest before it. Those after it, left by an interrupted attempt at this run, go too: the
    run writes them again."""
    steps = {int(m[1]): path for path in out.iterdir() if (m := CHECKPOINT.fullmatch(path.name))}
    kept = [step, *sorted((s for s in steps if s < step), reverse=True)[: KEEP - 1]]
    return [path for s, path in sorted(steps.items()) if s not in kept]


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None. A ``latest`` that names no
    directory is a ValueError."""
    pointer = out / "latest"
    if not pointer.is_file():
        return None
    checkpoint = out / pointer.read_text().strip()
    if not checkpoint.is_dir():
        raise ValueError(f"{pointer} names {checkpoint.name}, which {out} does not hold")
    return checkpoint


def checkpoint_of(path: str | os.PathLike) -> Path:
    """A checkpoint directory as given, or the latest checkpoint of a run directory."""
    return latest_checkpoint(Path(path)) or Path(path)


def resume(checkpoint: Path, optimizer: torch.optim.Optimizer, scaling: Scaling) -> int:
    """Restore what ``save_checkpoint`` wrote beside the weights into ``optimizer``, ``scaling``
    and the RNGs; returns the step to continue from."""
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scaling.load_state_dict(state.get("scaling", {}))  # none in a checkpoint from before fp16
    torch.set_rng_state(state["torch_rng"])
    random.setstate((3, tuple(state["python_rng"]), None))
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    return state["step"]
