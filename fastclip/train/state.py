"""A run's checkpoints: ``<out>/step-NNNNNN`` directories in the ``save_pretrained`` layout plus
``trainer.pt`` (step, optimizer, RNG states, config), each complete before it is named, and
``<out>/latest`` naming the newest. A kill mid-save leaves only a temporary directory behind.
What ``save_checkpoint`` writes, ``resume`` reads back, so a resumed run continues bit for bit."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from pathlib import Path

import torch

from fastclip.checkpoint import save_pretrained
from fastclip.files import write_text
from fastclip.model import CLIP
from fastclip.tokenizer import Tokenizer
from fastclip.train.config import TrainConfig

KEEP = 2  # checkpoints kept in a run directory; older ones are deleted after each save


def save_checkpoint(
    out: Path,
    step: int,
    model: CLIP,
    tokenizer: Tokenizer,
    optimizer: torch.optim.Optimizer,
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
    for old in sorted(out.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    pointer = out / "latest"
    return out / pointer.read_text().strip() if pointer.is_file() else None


def resume(checkpoint: Path, optimizer: torch.optim.Optimizer) -> int:
    """Restore what ``save_checkpoint`` wrote beside the weights into ``optimizer`` and the RNGs;
    returns the step to continue from."""
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate((3, tuple(state["python_rng"]), None))
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    return state["step"]
