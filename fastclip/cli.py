"""The ``fastclip`` command: every subcommand's flags are parsed here, and each calls the library.

fastclip train [flags]                    train a CLIP (fastclip train --help)
fastclip eval CHECKPOINT [--data shapes]  zero-shot accuracy and retrieval recall of a checkpoint
fastclip finetune [flags]                 few-shot adaptation; --compare tries every method
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from fastclip import train as training
from fastclip.checkpoint import load_pretrained
from fastclip.checks import one_of
from fastclip.data import SOURCES, described, few_shot_splits, serving
from fastclip.finetune import METHODS, Task, compare, load_checkpoint, render_table
from fastclip.tokenizer import Tokenizer
from fastclip.train import TrainConfig, latest_checkpoint
from fastclip.zeroshot import Evaluation


def config_parser(prog: str, description: str, config: type) -> argparse.ArgumentParser:
    """A parser with a ``--flag`` per field of the dataclass ``config`` (``batch_size`` is
    ``--batch-size``; a bool gets ``--no-flag`` too), its help from the field's metadata."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in dataclasses.fields(config):
        flag, kind = "--" + f.name.replace("_", "-"), type(f.default)
        help = f"{f.metadata['help']} (default: {f.default})"
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help
            )
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=help)
    return parser


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """``fastclip train``'s flags as a TrainConfig."""
    description = training.__doc__.split("\n\n")[0]
    parser = config_parser("fastclip train", description, TrainConfig)
    return TrainConfig(**vars(parser.parse_args(argv)))


def train_command(argv: list[str]) -> dict[str, float]:
    """fastclip train: a run as the flags say; the final evaluation's metrics."""
    return training.train(parse_train_args(argv))


def eval_command(argv: list[str]) -> dict[str, float]:
    """fastclip eval: a checkpoint's zero-shot accuracy and retrieval recall, printed."""
    parser = argparse.ArgumentParser(prog="fastclip eval", description="Evaluate a checkpoint.")
    parser.add_argument(
        "checkpoint", help="a directory written by save_pretrained / fastclip train"
    )
    parser.add_argument(
        "--data", default="shapes", help=f"{described('evaluation')} (default: shapes)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the seed the data was drawn with")
    args = parser.parse_args(argv)
    source = SOURCES.get(args.data.partition(":")[0])
    if source is None or source.evaluation is None:
        names = one_of([s.syntax for s in serving("evaluation")])
        parser.error(f"no evaluation sets for --data {args.data!r}: use {names}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(args.checkpoint).to(device)
    tokenizer = Tokenizer.from_pretrained(args.checkpoint)
    metrics = Evaluation(args.data, args.seed, model.config.image_size)(model, tokenizer, device)
    for name, value in metrics.items():
        print(f"{name:<28} {value:6.1%}")
    return metrics


def _finetune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastclip finetune",
        description="Train one method on k shots per class, or --compare them all.",
    )
    add = parser.add_argument
    add("--checkpoint", help="a pretrained CLIP (default: train a tiny one)")
    add("--data", default="digits", help=f"{described('few_shot')} (default: digits)")
    add("--method", default="probe", choices=tuple(METHODS), help="(default: probe)")
    add("--compare", action="store_true", help="every method: a table over k")
    add("--shots", type=int, nargs="+", help="k (16; --compare: 1 4 16)")
    add("--out", help="for the trained part, the table, a pretraining run")
    add("--pretrain-steps", type=int, default=150, help="without --checkpoint")
    add("--seed", type=int, default=0, help="the few-shot draw, initialization")
    add("--data-seed", type=int, default=0, help="the pretraining run's --seed")
    return parser


def finetune_command(argv: list[str]) -> dict:
    """fastclip finetune: one method's top-1 accuracy at one k (and its trained part saved to
    --out), or with --compare every method's at every k, as a table."""
    parser = _finetune_parser()
    args = parser.parse_args(argv)
    shots = args.shots or ([1, 4, 16] if args.compare else [16])
    if not args.compare and len(shots) != 1:
        parser.error("--shots takes one k without --compare")
    out = Path(args.out) if args.out else None
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or _pretrain(args, (out or Path(scratch)) / "pretrained")
        model, tokenizer = load_checkpoint(checkpoint), Tokenizer.from_pretrained(checkpoint)
    splits = few_shot_splits(args.data, args.data_seed)
    if args.compare:
        return _compare(args, model, tokenizer, splits, shots, out)
    return _run_one(args, model, tokenizer, splits, shots[0], out)


def _compare(
    args: argparse.Namespace,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    splits: tuple[Dataset, Dataset],
    shots: list[int],
    out: Path | None,
) -> dict[str, dict[int, float]]:
    """Every method at every k: the table printed, and written to --out."""
    tic = time.perf_counter()
    results = compare(model, tokenizer, *splits, shots=shots, seed=args.seed)
    table = render_table(results)
    elapsed = time.perf_counter() - tic
    print(f"{table}\n\n{args.data}: top-1 on the test split ({elapsed:.0f} s)")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(table + "\n")
    return results


def _run_one(
    args: argparse.Namespace,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    splits: tuple[Dataset, Dataset],
    k: int,
    out: Path | None,
) -> dict[str, float]:
    """One method at one k against zero-shot: printed, and the trained part saved to --out."""
    tic, method = time.perf_counter(), args.method
    task = Task.build(model, tokenizer, *splits)
    part, top1 = task.run(method, k, seed=args.seed)
    results = {"zero-shot": task.zero_shot(), method: top1}
    print(f"{'zero-shot':<10} {results['zero-shot']:6.1%}")
    print(f"{method:<10} {top1:6.1%}  (k = {k}, {time.perf_counter() - tic:.0f} s)")
    if out:
        path = out / f"{method}.safetensors"
        out.mkdir(parents=True, exist_ok=True)
        METHODS[method].save(part, path)
        print(f"saved {path}")
    return results


def _pretrain(args: argparse.Namespace, out: Path) -> Path:
    """Train a tiny CLIP on ``args.data`` briefly; its final checkpoint."""
    training.train(TrainConfig(data=args.data, steps=args.pretrain_steps, out=str(out),
                               eval_every=0, save_every=0, seed=args.data_seed))  # fmt: skip
    return latest_checkpoint(out)


COMMANDS = {"train": train_command, "eval": eval_command, "finetune": finetune_command}


def main(argv: list[str] | None = None) -> None:
    """The ``fastclip`` console script: ``fastclip COMMAND [flags]``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip().split("\n\n", 1)[1], file=sys.stderr)
        raise SystemExit(2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
