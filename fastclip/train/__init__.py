"""Train a CLIP from scratch: ``fastclip train`` (or ``python -m fastclip.train``).

With no arguments it trains the ``tiny`` preset on the generated shapes on a CPU in minutes and
ends by printing zero-shot accuracy and retrieval recall. The same script runs on one process or
many (``torchrun --nproc-per-node 8 -m fastclip.train ...``: NCCL on GPUs, gloo on CPUs).

    config     TrainConfig: every setting with its default, help text and allowed values
    processes  torchrun's environment and the collectives the steps need
    batches    each step's rows, drawn from (seed, step), and their augmented pixels
    step       one optimizer step with the feature cache; the loss, AdamW, the schedule, the
               precision and fp16's loss scaling
    state      the run directory and its checkpoints: one run each, saved atomically, resumed
               bit for bit
    metrics    records (metrics.jsonl, the progress bar), the plot and the summary
    loop       train(cfg): setup, then steps, evaluations and checkpoints

The command line is ``fastclip.cli``; evaluation is ``fastclip.zeroshot.Evaluation``.
"""

from fastclip.train.config import TrainConfig
from fastclip.train.loop import train
from fastclip.train.processes import average_gradients
from fastclip.train.state import checkpoint_of, latest_checkpoint
from fastclip.train.step import Diverged, contrastive_step, optimizer_step

__all__ = [
    "Diverged",
    "TrainConfig",
    "average_gradients",
    "checkpoint_of",
    "contrastive_step",
    "latest_checkpoint",
    "optimizer_step",
    "train",
]
