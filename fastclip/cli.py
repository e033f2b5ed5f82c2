"""The ``fastclip`` command: every subcommand's flags are parsed here, and each calls the library.

fastclip train [flags]                    train a CLIP (fastclip train --help)
fastclip eval CHECKPOINT [--data shapes]  zero-shot accuracy and retrieval recall of a checkpoint
fastclip finetune [flags]                 few-shot adaptation; --compare tries every method
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch
from torch.utils.data import Dataset

from fastclip import train as training
from fastclip.checkpoint import load_pretrained
from fastclip.checks import check_number, one_of
from fastclip.data import SOURCES, described, few_shot_splits, find, serving
from fastclip.finetune import METHODS, Task, compare, load_checkpoint, render_table
from fastclip.hub import repo_id
from fastclip.tokenizer import Tokenizer
from fastclip.train import Diverged, FlagError, TrainConfig, checkpoint_of, latest_checkpoint
from fastclip.train.config import allowed, check_setting
from fastclip.zeroshot import Evaluation

# What a command raises at the user's input (flags, data, files) or a diverged run: one line
# "fastclip COMMAND: error: ..." and exit status 1, no traceback. Flag errors exit with
# argparse's status 2, found before a command starts or, for those only the data or a checkpoint
# can tell (FlagError), as a run starts. Ctrl-C ends a command with one line and status 130.
USER_ERRORS = (ValueError, OSError, ImportError, Diverged)
INTERRUPTED = 128 + 2  # the shell's status for a process ended by SIGINT


def flag(name: str) -> str:
    """The command-line flag of a config field: ``batch_size`` is ``--batch-size``."""
    return "--" + name.replace("_", "-")


class Parser(argparse.ArgumentParser):
    """argparse's parser, its errors in one line (with a pointer to ``--help``) instead of after
    the usage block; exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@contextlib.contextmanager
def flag_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """A ValueError raised inside becomes the parser's error: one line, exit status 2."""
    try:
        yield
    except ValueError as e:
        parser.error(str(e))


def config_parser(prog: str, description: str, config: type) -> argparse.ArgumentParser:
    """A parser with a ``--flag`` per field of the dataclass ``config`` (``batch_size`` is
    ``--batch-size``; a bool gets ``--no-flag`` too), its help from the field's metadata."""
    parser = Parser(prog=prog, description=description)
    for f in dataclasses.fields(config):
        kind, values = type(f.default), allowed(f)
        shown = [f"default: {f.default}"] if f.default != "" else []  # "": not given
        help = f"{f.metadata['help']} ({'; '.join([*shown, values] if values else shown)})"
        if kind is bool:
            parser.add_argument(
                flag(f.name), action=argparse.BooleanOptionalAction, default=f.default, help=help
            )
        else:
            parser.add_argument(flag(f.name), type=kind, default=f.default, help=help)
    return parser


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """``fastclip train``'s flags as a TrainConfig; a value out of its field's range is the
    parser's error, naming the flag (exit status 2)."""
    description = training.__doc__.split("\n\n")[0]
    parser = config_parser("fastclip train", description, TrainConfig)
    values = vars(parser.parse_args(argv))
    with flag_errors(parser):
        for f in dataclasses.fields(TrainConfig):
            check_setting(f, values[f.name], flag(f.name))
        return TrainConfig(**values)


def train_command(argv: list[str]) -> dict[str, float]:
    """fastclip train: a run as the flags say; the final evaluation's metrics."""
    return training.train(parse_train_args(argv))


def eval_command(argv: list[str]) -> dict[str, float]:
    """fastclip eval: a checkpoint's zero-shot accuracy and retrieval recall, printed."""
    parser = Parser(prog="fastclip eval", description="Evaluate a checkpoint.")
    parser.add_argument(
        "checkpoint",
        help="a directory written by save_pretrained, or a fastclip train run's (its latest)",
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
    with flag_errors(parser):
        check_number("--seed", args.seed, 0, integer=True)
        checkpoint = existing_checkpoint(args.checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(checkpoint).to(device)
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    metrics = Evaluation(args.data, args.seed, model.config.image_size)(model, tokenizer, device)
    for name, value in metrics.items():
        print(f"{name:<28} {value:6.1%}")
    return metrics


def existing_checkpoint(path: str) -> str | Path:
    """A checkpoint as a flag names it: a checkpoint directory or weights file, a run
    directory (its latest checkpoint), or a Hugging Face Hub name (fetched when loaded); a
    ValueError if there is nothing at ``path``."""
    if repo_id(path):
        return path
    if not Path(path).exists():
        raise ValueError(f"no checkpoint at {path}: no such file or directory")
    return checkpoint_of(path)


def _finetune_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fastclip finetune",
        description="Train one method on k shots per class, or --compare them all.",
    )
    add = parser.add_argument
    add("--checkpoint", help="a pretrained CLIP (default: train a tiny one)")
    add("--data", default="digits", help=f"{described('few_shot')} (default: digits)")
    add("--method", default="probe", choices=tuple(METHODS), help="(default: probe)")
    add("--compare", action="store_true", help="every method: a table over k")
    add("--shots", type=int, nargs="+", help="k (16; --compare: 1 4 16)")
    add("--out", help="for the trained part, the table, a pretraining run (replaced)")
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
    with flag_errors(parser):
        for k in shots:
            check_number("--shots", k, 1, integer=True)
        check_number("--pretrain-steps", args.pretrain_steps, 1, integer=True)
        check_number("--seed", args.seed, 0, integer=True)
        check_number("--data-seed", args.data_seed, 0, integer=True)
        find(args.data, "few_shot")
        given = args.checkpoint and existing_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else None
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = given or _pretrain(args, (out or Path(scratch)) / "pretrained")
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
                               eval_every=0, save_every=0, seed=args.data_seed,
                               overwrite=True))  # fmt: skip
    return latest_checkpoint(out)


COMMANDS = {"train": train_command, "eval": eval_command, "finetune": finetune_command}


def main(argv: list[str] | None = None) -> None:
    """The ``fastclip`` console script: ``fastclip COMMAND [flags]``. The input's errors end it
    with one line and exit status 2 (flags) or 1 (data, files, a diverged run); Ctrl-C with one
    line and status 130."""
    argv = sys.argv[1:] if argv is None else argv
    usage = __doc__.strip().split("\n\n", 1)[1]
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return
    if not argv or argv[0] not in COMMANDS:
        print(usage, file=sys.stderr)
        raise SystemExit(2)
    try:
        COMMANDS[argv[0]](argv[1:])
    except FlagError as e:
        print(f"fastclip {argv[0]}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except USER_ERRORS as e:
        print(f"fastclip {argv[0]}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as e:
        print(f"fastclip {argv[0]}: {e or 'interrupted'}", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None


if __name__ == "__main__":
    main()
