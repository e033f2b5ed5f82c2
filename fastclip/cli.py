"""The ``fastclip`` command.

fastclip train [flags]                    train a CLIP (fastclip train --help)
fastclip eval CHECKPOINT [--data shapes]  zero-shot accuracy and retrieval recall of a checkpoint
fastclip finetune [flags]                 few-shot adaptation; --compare tries every method
"""

from __future__ import annotations

import argparse
import sys

import torch

from fastclip import finetune, train
from fastclip.checkpoint import load_pretrained
from fastclip.tokenizer import Tokenizer


def evaluate(argv: list[str]) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="fastclip eval", description="Evaluate a checkpoint.")
    parser.add_argument(
        "checkpoint", help="a directory written by save_pretrained / fastclip train"
    )
    parser.add_argument("--data", default="shapes", help="shapes | digits (default: shapes)")
    parser.add_argument("--seed", type=int, default=0, help="the seed the data was drawn with")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(args.checkpoint).to(device)
    tokenizer = Tokenizer.from_pretrained(args.checkpoint)
    evaluation = train.Evaluation(args.data, args.seed, model.config.image_size)
    if not evaluation.tasks and evaluation.retrieval is None:
        parser.error(f"no evaluation sets for --data {args.data!r}: use shapes or digits")
    metrics = evaluation(model, tokenizer, device)
    for name, value in metrics.items():
        print(f"{name:<28} {value:6.1%}")
    return metrics


COMMANDS = {"train": train.main, "eval": evaluate, "finetune": finetune.main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip().split("\n\n", 1)[1], file=sys.stderr)
        raise SystemExit(2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
