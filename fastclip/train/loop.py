"""The run: ``train(cfg)`` sets up, then every step trains, records, evaluates and saves as due.

Each piece is a function of the ``Run`` it builds: ``setup`` (processes, data, model, optimizer,
resumed state, evaluation sets, records), ``train_step``, ``record_loss``, ``evaluate``, ``save``
and ``finish``. Evaluation and saving run on rank 0; every process trains.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from fastclip.checkpoint import load_pretrained
from fastclip.data import training_set
from fastclip.model import CLIP, PRESETS
from fastclip.tokenizer import Tokenizer
from fastclip.train.batches import batches, captions, pixels
from fastclip.train.config import TrainConfig
from fastclip.train.metrics import JsonlFile, ProgressBar, Sink, plot, summary
from fastclip.train.processes import (
    average,
    barrier,
    broadcast_weights,
    common_rows,
    setup_distributed,
    shutdown,
)
from fastclip.train.reporting import open_reporters
from fastclip.train.state import (
    checkpoint_of,
    claim,
    clear,
    latest_checkpoint,
    resume,
    save_checkpoint,
)
from fastclip.train.step import (
    LOSSES,
    Diverged,
    Scaling,
    adamw,
    autocast_for,
    clamp_logit_scale,
    contrastive_step,
    cosine_schedule,
    finite,
    grad_scaler,
    lock_towers,
    optimizer_step,
)
from fastclip.zeroshot import Evaluation

TOKENIZER_CAPTIONS = 20000  # training captions a new run's BPE learns from


@dataclass
class Run:
    """What the steps of a run share."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: CLIP
    tokenizer: Tokenizer
    optimizer: torch.optim.Optimizer
    scaling: Scaling  # fp16's GradScaler (a pass-through otherwise) and the steps it skipped
    start: int  # the first step to take: 0, or the resumed checkpoint's
    dataset: Dataset  # the training pairs; counts the samples it skips
    stream: Iterator[tuple[list, list[str]]]  # this process's (images, captions) of every step
    loss_fn: torch.nn.Module
    autocast: Callable[[], AbstractContextManager]
    evaluation: Evaluation | None  # rank 0's
    bar: ProgressBar
    sinks: list[Sink]  # rank 0's records: metrics.jsonl, the progress bar, --report-to's
    seen: int = 0  # samples trained on by all processes since this one started
    tic: float = field(default_factory=time.perf_counter)


def train(cfg: TrainConfig) -> dict[str, float]:
    """Train as ``cfg`` says; returns the final evaluation's metrics (rank 0; {} elsewhere)."""
    run, final = setup(cfg), {}
    with contextlib.closing(run.bar):  # also on an error, whose message then has its own line
        for step in range(run.start, cfg.steps):
            done = step + 1
            loss = train_step(run, step)
            record_loss(run, done, loss)
            if run.rank == 0 and _due(done, cfg.eval_every, cfg.steps):
                final = evaluate(run, done)
            if _due(done, cfg.save_every, cfg.steps):
                save(run, done)
            run.bar.update()
    finish(run, final)
    return final


def _due(done: int, every: int, steps: int) -> bool:
    """Whether a periodic action falls after ``done`` steps: every ``every`` (0: never) and at
    the end."""
    return done == steps or bool(every and done % every == 0)


def setup(cfg: TrainConfig) -> Run:
    """Processes, data, the model (new, ``--init``'s or resumed) on its device with its
    optimizer, the loss, and on rank 0 the evaluation sets and the records."""
    rank, world, device = setup_distributed(cfg.device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    out, checkpoint = run_directory(cfg, rank, world)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    dataset = training_set(cfg.data, cfg.seed, cfg.samples, cfg.image_column, cfg.caption_column)
    model, tokenizer = build_model(cfg, dataset, checkpoint, out, rank, world)
    lock_towers(model, cfg.lock_image, cfg.lock_text)
    model.to(device).set_grad_checkpointing(cfg.grad_checkpointing)
    broadcast_weights(model, world)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay)
    scaling = Scaling(grad_scaler(cfg.precision, device))
    start = 0 if checkpoint is None else resume(checkpoint, optimizer, scaling)
    if start > cfg.steps:
        raise ValueError(f"{checkpoint} is at step {start}, past steps={cfg.steps}: nothing to do")
    lead = rank == 0
    loss_fn = LOSSES[cfg.loss].build(rank, world)
    evaluation = Evaluation(cfg.data, cfg.seed, model.config.image_size) if lead else None
    metrics = JsonlFile(out / "metrics.jsonl", start) if lead else None
    if lead and start == 0:
        print(
            f"fastclip train: {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
            f"parameters), {cfg.data}, batch {cfg.batch_size} on {world} process(es), {device}",
            flush=True,  # before the progress bar, in a log file too
        )
    bar = ProgressBar(cfg.steps, start, enabled=lead)
    stream = batches(dataset, cfg, start, rank, world)
    autocast = autocast_for(cfg.precision, device)
    reporters = open_reporters(cfg.report_to, out, start, asdict(cfg)) if lead else []
    sinks = [metrics, bar, *reporters] if lead else []
    return Run(cfg, rank, world, device, model, tokenizer, optimizer, scaling, start, dataset,
               stream, loss_fn, autocast, evaluation, bar, sinks)  # fmt: skip


def run_directory(cfg: TrainConfig, rank: int, world: int) -> tuple[Path, Path | None]:
    """The run directory, checked to hold no other run (``state.claim``) and, with
    ``--overwrite``, cleared of the earlier one; and the checkpoint to resume from, if any."""
    out = Path(cfg.out)
    claim(out, cfg.resume, cfg.overwrite)
    barrier(world)  # every process has looked before rank 0 deletes or writes anything
    if rank == 0 and cfg.overwrite:
        clear(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(out) if cfg.resume else None
    if rank == 0 and cfg.resume and checkpoint is None:
        print(f"--resume: no checkpoint in {out}, starting a new run", flush=True)
    return out, checkpoint


def build_model(
    cfg: TrainConfig, dataset: Dataset, checkpoint: Path | None, out: Path, rank: int, world: int
) -> tuple[CLIP, Tokenizer]:
    """The model to train and its tokenizer: the checkpoint's when resuming, ``--init``'s when
    fine-tuning, else a new ``--model`` with a BPE learned from the training captions."""
    source = checkpoint or (cfg.init and checkpoint_of(cfg.init))
    if source:
        return load_pretrained(source).train(), Tokenizer.from_pretrained(source)
    tokenizer = train_tokenizer(cfg, dataset, out / "tokenizer", rank, world)
    model = CLIP(cfg.model, **tokenizer.model_fields(), **LOSSES[cfg.loss].model_fields)
    return model, tokenizer


def train_tokenizer(
    cfg: TrainConfig, dataset: Dataset, path: Path, rank: int, world: int
) -> Tokenizer:
    """A BPE learned from the training captions by rank 0 and saved to ``path``; the others
    load it."""
    if rank == 0:
        tokenizer = Tokenizer.train(
            captions(dataset, TOKENIZER_CAPTIONS),
            cfg.vocab_size,
            context_length=PRESETS[cfg.model].context_length,
        )
        tokenizer.save_pretrained(path)
    barrier(world)
    return Tokenizer.from_pretrained(path) if rank else tokenizer


def train_step(run: Run, step: int) -> torch.Tensor | None:
    """One optimizer step on this process's rows of the step's batch. Returns the loss averaged
    over the processes, or None when every sample of the batch was undecodable (and reported):
    no update then. In fp16 the GradScaler skips a step whose gradients hold an inf or NaN; the
    run diverges when the loss stays inf or NaN (``Scaling.count``)."""
    cfg, model = run.cfg, run.model
    images, texts = common_rows(*next(run.stream), run.world)
    if not images:
        return None
    inputs = pixels(images, cfg, step, run.rank, model.config.image_size).to(run.device)
    tokens = run.tokenizer(texts).to(run.device)
    for group in run.optimizer.param_groups:
        group["lr"] = cfg.lr * cosine_schedule(step, cfg.warmup, cfg.steps)
    run.optimizer.zero_grad(set_to_none=True)
    scaler = run.scaling.scaler
    loss = contrastive_step(
        model, run.loss_fn, inputs, tokens, cfg.micro_batch, run.autocast, scaler
    )
    taken = optimizer_step(model, run.optimizer, scaler, cfg.grad_clip, run.world)
    clamp_logit_scale(model)
    run.seen += len(images) * run.world
    loss = average(loss, run.world)
    finite_loss, finite_weights = finite(model, loss)
    if run.scaling.count(taken, finite_loss) or not finite_weights:
        raise Diverged(diverged(run, step + 1, loss))
    return loss


def diverged(run: Run, done: int, loss: torch.Tensor) -> str:
    """Where a run diverged, and what to try."""
    cfg, scale, streak = run.cfg, run.model.logit_scale.exp().item(), run.scaling.nonfinite
    clip = f"a tighter --grad-clip (now {cfg.grad_clip:g})" if cfg.grad_clip else "--grad-clip 1"
    skipped = f" on {streak} steps in a row" if streak > 1 else ""
    tries = [f"a lower --lr (now {cfg.lr:g})", f"a longer --warmup (now {cfg.warmup})", clip]
    if run.scaling.scaler.is_enabled():
        tries.append("--precision bf16 on a GPU that has it")
    return (
        f"training diverged at step {done} (loss {loss.item():.4g}{skipped}, logit scale "
        f"{scale:.4g}): try {', '.join(tries[:-1])} or {tries[-1]}"
    )


def record_loss(run: Run, done: int, loss: torch.Tensor | None) -> None:
    """Every ``--log-every`` steps and at the end, rank 0 records the loss, learning rate,
    temperature and throughput; in fp16 also the steps skipped so far and the loss scale."""
    every, steps = run.cfg.log_every, run.cfg.steps
    if run.rank != 0 or loss is None or not (done % every == 0 or done == steps):
        return
    _write(
        run,
        dict(
            step=done,
            loss=loss.item(),
            lr=run.optimizer.param_groups[0]["lr"],
            logit_scale=run.model.logit_scale.exp().item(),
            samples_per_s=run.seen / (time.perf_counter() - run.tic),
            **run.scaling.record(),
        ),
    )


def evaluate(run: Run, done: int) -> dict[str, float]:
    """Zero-shot accuracy and retrieval recall on the data source's evaluation sets, recorded."""
    metrics = run.evaluation(run.model, run.tokenizer, run.device)
    if metrics:  # a data source without evaluation sets (shards, CSV) has none
        _write(run, dict(step=done, **metrics))
    return metrics


def _write(run: Run, record: dict[str, float]) -> None:
    for sink in run.sinks:
        sink.write(record)


def save(run: Run, done: int) -> None:
    """A checkpoint, written by rank 0 while the others wait."""
    if run.rank == 0:
        save_checkpoint(Path(run.cfg.out), done, run.model, run.tokenizer, run.optimizer,
                        run.scaling, run.cfg)  # fmt: skip
    barrier(run.world)


def finish(run: Run, final: dict[str, float]) -> None:
    """Close the records (the progress bar, metrics.jsonl, --report-to's trackers); rank 0
    plots them and prints the skipped samples and the final evaluation."""
    for sink in run.sinks:
        sink.close()
    if run.rank == 0:
        out = Path(run.cfg.out)
        plot(out / "metrics.jsonl", out / "metrics.png")
        print(summary(final, out, getattr(run.dataset, "skip_reasons", {}), run.world))
    shutdown(run.world)
