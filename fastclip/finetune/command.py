"""Train one method on k shots per class, or --compare them all.

``fastclip finetune``: ``FinetuneConfig`` is its flags (``fastclip.cli`` builds the parser from
its fields, as ``fastclip train``'s from ``TrainConfig``) and ``finetune(cfg)`` runs it: without
``--checkpoint`` it first pretrains a tiny CLIP on ``--data``, then scores one method at one k
against zero-shot and saves the trained part, or with ``--compare`` every method at every k.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch.utils.data import Dataset

from fastclip.data import described, few_shot_splits, find
from fastclip.finetune.task import METHODS, Task, compare, load_checkpoint, render_table
from fastclip.tokenizer import Tokenizer
from fastclip.train import TrainConfig, latest_checkpoint, train
from fastclip.train.directory import existing_checkpoint
from fastclip.train.settings import check_setting, setting

SHOTS = {False: (16,), True: (1, 4, 16)}  # --shots' default: one k, or --compare's columns


@dataclass
class FinetuneConfig:
    """Every field is a ``fastclip finetune`` flag: ``data_seed`` is ``--data-seed``."""

    checkpoint: str = setting("", "a pretrained CLIP", note="default: train a tiny one")
    data: str = setting("digits", described("few_shot"))
    method: str = setting("probe", "", flag=dict(choices=tuple(METHODS)))
    compare: bool = setting(
        False, "every method: a table over k", note="", flag=dict(action="store_true")
    )
    shots: tuple[int, ...] = setting(
        (),
        "k",
        low=1,
        note=f"{' '.join(map(str, SHOTS[False]))}; --compare: {' '.join(map(str, SHOTS[True]))}",
        flag=dict(type=int, nargs="+"),
    )
    out: str = setting("", "for the trained part, the table, a pretraining run", note="replaced")
    pretrain_steps: int = setting(150, "without --checkpoint", low=1, note="")
    seed: int = setting(0, "the few-shot draw, initialization", low=0, note="")
    data_seed: int = setting(0, "the pretraining run's --seed", low=0, note="")

    def __post_init__(self) -> None:
        self.shots = tuple(self.shots)  # the command line's list
        for f in fields(self):
            check_setting(f, getattr(self, f.name), f.name)
        if not self.compare and len(self.shots) > 1:
            raise ValueError("--shots takes one k without --compare")
        find(self.data, "few_shot")
        if self.checkpoint:
            existing_checkpoint(self.checkpoint)


def finetune(cfg: FinetuneConfig) -> dict:
    """One method's top-1 accuracy at one k against zero-shot's (and its trained part saved to
    ``cfg.out``), or with ``cfg.compare`` every method's at every k, as a table."""
    shots = list(cfg.shots or SHOTS[cfg.compare])
    out = Path(cfg.out) if cfg.out else None
    given = cfg.checkpoint and existing_checkpoint(cfg.checkpoint)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = given or _pretrain(cfg, (out or Path(scratch)) / "pretrained")
        model, tokenizer = load_checkpoint(checkpoint), Tokenizer.from_pretrained(checkpoint)
    splits = few_shot_splits(cfg.data, cfg.data_seed)
    if cfg.compare:
        return _compare(cfg, model, tokenizer, splits, shots, out)
    return _run_one(cfg, model, tokenizer, splits, shots[0], out)


def _compare(
    cfg: FinetuneConfig,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    splits: tuple[Dataset, Dataset],
    shots: list[int],
    out: Path | None,
) -> dict[str, dict[int, float]]:
    """Every method at every k: the table printed, and written to --out."""
    tic = time.perf_counter()
    results = compare(model, tokenizer, *splits, shots=shots, seed=cfg.seed)
    table = render_table(results)
    elapsed = time.perf_counter() - tic
    print(f"{table}\n\n{cfg.data}: top-1 on the test split ({elapsed:.0f} s)")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(table + "\n")
    return results


def _run_one(
    cfg: FinetuneConfig,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    splits: tuple[Dataset, Dataset],
    k: int,
    out: Path | None,
) -> dict[str, float]:
    """One method at one k against zero-shot: printed, and the trained part saved to --out."""
    tic, method = time.perf_counter(), cfg.method
    task = Task.build(model, tokenizer, *splits)
    part, top1 = task.run(method, k, seed=cfg.seed)
    results = {"zero-shot": task.zero_shot(), method: top1}
    print(f"{'zero-shot':<10} {results['zero-shot']:6.1%}")
    print(f"{method:<10} {top1:6.1%}  (k = {k}, {time.perf_counter() - tic:.0f} s)")
    if out:
        path = out / f"{method}.safetensors"
        out.mkdir(parents=True, exist_ok=True)
        METHODS[method].save(part, path)
        print(f"saved {path}")
    return results


def _pretrain(cfg: FinetuneConfig, out: Path) -> Path:
    """Train a tiny CLIP on ``cfg.data`` briefly; its final checkpoint."""
    train(TrainConfig(data=cfg.data, steps=cfg.pretrain_steps, out=str(out), eval_every=0,
                      save_every=0, seed=cfg.data_seed, overwrite=True))  # fmt: skip
    return latest_checkpoint(out)
