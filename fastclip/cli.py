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
from collections.abc import Iterator
from typing import NoReturn, TypeVar

import torch

from fastclip import train as training
from fastclip.checkpoint import load_pretrained
from fastclip.checks import check_number, one_of
from fastclip.data import SOURCES, described, serving
from fastclip.finetune import command as finetuning
from fastclip.tokenizer import Tokenizer
from fastclip.train import Diverged, FlagError, TrainConfig
from fastclip.train.directory import existing_checkpoint
from fastclip.train.settings import check_setting, flag_help
from fastclip.zeroshot import Evaluation

Config = TypeVar("Config")

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
    ``--batch-size``; a bool gets ``--no-flag`` too), its help from the field's metadata, and
    the field's own ``add_argument`` keywords last."""
    parser = Parser(prog=prog, description=description)
    for f in dataclasses.fields(config):
        help = flag_help(f)
        if type(f.default) is bool:
            options = dict(action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            options = dict(type=type(f.default), default=f.default, help=help)
        parser.add_argument(flag(f.name), **{**options, **f.metadata["flag"]})
    return parser


def parse_config(
    config: type[Config], prog: str, description: str, argv: list[str] | None
) -> Config:
    """A command's flags as its ``config`` dataclass; a value out of its field's range is the
    parser's error, naming the flag (exit status 2), and so is any ValueError the config raises."""
    parser = config_parser(prog, description, config)
    values = vars(parser.parse_args(argv))
    with flag_errors(parser):
        for f in dataclasses.fields(config):
            check_setting(f, values[f.name], flag(f.name))
        return config(**values)


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """``fastclip train``'s flags as a TrainConfig."""
    description = training.__doc__.split("\n\n")[0]
    return parse_config(TrainConfig, "fastclip train", description, argv)


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


def finetune_command(argv: list[str]) -> dict:
    """fastclip finetune: one method's top-1 accuracy at one k (and its trained part saved to
    --out), or with --compare every method's at every k, as a table."""
    description = finetuning.__doc__.split("\n\n")[0]
    config = parse_config(finetuning.FinetuneConfig, "fastclip finetune", description, argv)
    return finetuning.finetune(config)


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
