"""Train a CLIP from scratch: ``fastclip train`` (or ``python -m fastclip.train``).

With no arguments it trains the ``tiny`` preset on the generated shapes on a CPU in minutes and
ends by printing zero-shot accuracy and retrieval recall. The same script runs on one process or
many (``torchrun --nproc-per-node 8 -m fastclip.train ...``: NCCL on GPUs, gloo on CPUs).

    config     TrainConfig: every setting with its default, help text and allowed values;
               FlagError, a flag the run's data or checkpoint refuses
    settings   a config field that carries its flag's default, help and allowed values (the
               mechanism TrainConfig and fastclip.finetune.FinetuneConfig share)
    processes  torchrun's environment and the collectives the steps need
    batches    each step's rows, drawn from (seed, step), and their augmented pixels
    losses     the losses --loss names, and what a new model trained with each starts from
    optim      locked towers, AdamW's parameter groups and the learning-rate schedule
    precision  autocast's dtype and fp16's loss scaling (GradScaler, skipped steps)
    step       one optimizer step with the feature cache; divergence, the temperature's clamp
    directory  the run directory: one run each, its entries listed in a manifest, the only
               files --overwrite and pruning delete
    state      checkpoints: saved atomically, resumed bit for bit
    origin     where the model comes from (new, --init, --resume), the flags checked against it
    reporting  records and their sinks (metrics.jsonl, the progress bar, TensorBoard, W&B),
               the plot and the summary
    loop       train(cfg): checks, setup, then steps, evaluations and checkpoints; Ctrl-C

The command line is ``fastclip.cli``; evaluation is ``fastclip.zeroshot.Evaluation``.
"""

from fastclip.train.config import FlagError, TrainConfig
from fastclip.train.directory import checkpoint_of, latest_checkpoint
from fastclip.train.loop import Interrupted, train
from fastclip.train.processes import average_gradients
from fastclip.train.step import Diverged, contrastive_step, optimizer_step

__all__ = [
    "Diverged",
    "FlagError",
    "Interrupted",
    "TrainConfig",
    "average_gradients",
    "checkpoint_of",
    "contrastive_step",
    "latest_checkpoint",
    "optimizer_step",
    "train",
]
