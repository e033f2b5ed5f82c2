"""The run: ``train(cfg)`` sets up, then every step trains, records, evaluates and saves as due.

Each piece is a function of the ``Run`` it builds: ``setup`` (``check`` everything, then
processes, data, model, optimizer, resumed state, evaluation sets, records), ``train_step``,
``record_loss``, ``evaluate``, ``save`` and ``finish``. Evaluation and saving run on rank 0;
every process trains. Nothing is written before every check has passed. Ctrl-C ends a run with
``Interrupted`` (``stop``): a checkpoint of the last completed step where one can be written
safely, else where ``--resume`` will continue from.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset

from fastclip.data import training_set
from fastclip.model import CLIP, PRESETS
from fastclip.tokenizer import Tokenizer
from fastclip.train.batches import batches, captions, pixels, steps_per_epoch
from fastclip.train.config import FlagError, TrainConfig
from fastclip.train.directory import ENTRIES, RunFiles, checkpoint_name, claim
from fastclip.train.losses import LOSSES
from fastclip.train.optim import adamw, cosine_schedule, lock_towers
from fastclip.train.origin import Origin, described, start
from fastclip.train.precision import Scaling, autocast_for, grad_scaler
from fastclip.train.processes import (
    average,
    barrier,
    broadcast_weights,
    common_rows,
    setup_distributed,
    shutdown,
)
from fastclip.train.reporting import (
    REPORTERS,
    JsonlFile,
    ProgressBar,
    Sink,
    open_reporters,
    plot,
    reporter_names,
    summary,
)
from fastclip.train.state import restore, rng_states, save_checkpoint
from fastclip.train.step import (
    Diverged,
    clamp_logit_scale,
    contrastive_step,
    finite,
    optimizer_step,
)
from fastclip.zeroshot import Evaluation

TOKENIZER_CAPTIONS = 20000  # training captions a new run's BPE learns from


class Interrupted(KeyboardInterrupt):
    """Ctrl-C ended the run; the message says what was saved and where ``--resume`` goes on."""


@dataclass
class Run:
    """What the steps of a run share."""

    cfg: TrainConfig  # as the run uses it: model, loss and vocab_size resolved
    rank: int
    world: int
    device: torch.device
    files: RunFiles  # what the run wrote into its directory (rank 0 records it)
    model: CLIP
    tokenizer: Tokenizer
    optimizer: torch.optim.Optimizer
    scaling: Scaling  # fp16's GradScaler (a pass-through otherwise) and the steps it skipped
    start: int  # the first step to take: 0, or the resumed checkpoint's
    stream: Iterator[tuple[list, list[str], Counter]]  # this process's rows of every step
    loss_fn: torch.nn.Module
    autocast: Callable[[], AbstractContextManager]
    evaluation: Evaluation | None  # rank 0's
    bar: ProgressBar
    sinks: list[Sink]  # rank 0's records: metrics.jsonl, the progress bar, --report-to's
    seen: int = 0  # samples trained on by all processes since this one started
    skipped: Counter = field(default_factory=Counter)  # this process's (and its workers') skips
    tic: float = field(default_factory=time.perf_counter)
    # Where an interruption finds the run: steps whose update is complete (the weights, the
    # optimizer and the loss scaling are those after it) with the RNG states at its end, the
    # step of the newest checkpoint, and what is under way that Ctrl-C would cut short:
    # "update" (the weights are neither before nor after it), "save" or "evaluation".
    done: int = 0
    rng: dict = field(default_factory=rng_states)
    saved: int = 0
    busy: str = ""


def train(cfg: TrainConfig) -> dict[str, float]:
    """Train as ``cfg`` says; returns the final evaluation's metrics (rank 0; {} elsewhere).
    Ctrl-C raises ``Interrupted`` once the last completed step is saved, where that is safe."""
    try:
        run = setup(cfg)
    except KeyboardInterrupt:
        raise Interrupted("interrupted before the first step: nothing new was trained") from None
    cfg, final = run.cfg, {}  # model, loss and vocab_size as the run uses them
    try:
        with contextlib.closing(run.bar):  # also on an error, whose message then has its own line
            for step in range(run.start, cfg.steps):
                done = step + 1
                loss = train_step(run, step)  # run.busy is "update" from the update on
                record_loss(run, done, loss)
                run.done, run.rng, run.busy = done, rng_states(), ""
                if run.rank == 0 and _due(done, cfg.eval_every, cfg.steps):
                    final = evaluate(run, done)
                if _due(done, cfg.save_every, cfg.steps):
                    save(run, done)
                run.bar.update()
        finish(run, final)
    except KeyboardInterrupt:
        raise Interrupted(stop(run)) from None
    return final


def _due(done: int, every: int, steps: int) -> bool:
    """Whether a periodic action falls after ``done`` steps: every ``every`` (0: never) and at
    the end."""
    return done == steps or bool(every and done % every == 0)


def setup(cfg: TrainConfig) -> Run:
    """``check`` everything, then: processes, data, the model (new, ``--init``'s or resumed) on
    its device with its optimizer, the loss, and on rank 0 the evaluation sets and the records."""
    rank, world, device = setup_distributed(cfg.device)
    cfg, files, origin = check(cfg, world)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    dataset = training_set(cfg.data, cfg.seed, cfg.samples, cfg.image_column, cfg.caption_column)
    if not isinstance(dataset, IterableDataset):  # a stream's length shows as it is read
        steps_per_epoch(dataset, cfg.batch_size)
    barrier(world)  # every process has checked before rank 0 deletes or writes anything
    lead = rank == 0
    if lead:
        prepare(cfg, files, origin)
    barrier(world)
    model, tokenizer = origin.model, origin.tokenizer
    if model is None:
        tokenizer = train_tokenizer(cfg, dataset, files, rank, world)
        model = CLIP(cfg.model, **tokenizer.model_fields(), **LOSSES[cfg.loss].model_fields)
    lock_towers(model, cfg.lock_image, cfg.lock_text)
    model.to(device).set_grad_checkpointing(cfg.grad_checkpointing)
    broadcast_weights(model, world)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay)
    scaling = Scaling(grad_scaler(cfg.precision, device))
    start = restore(origin.trainer, optimizer, scaling) if origin.trainer else 0
    loss_fn = LOSSES[cfg.loss].build(rank, world)
    evaluation = Evaluation(cfg.data, cfg.seed, model.config.image_size) if lead else None
    if lead:
        files.add("metrics.jsonl")
        params = sum(p.numel() for p in model.parameters()) / 1e6
        source = f" from {origin.source}" if origin.source and not start else ""
        resumed = f"; resuming {origin.source} at step {start}" if start else ""
        print(
            f"fastclip train: {described(model.config)}{source} ({params:.2f}M parameters), "
            f"{cfg.data}, batch {cfg.batch_size} on {world} process(es), {device}{resumed}",
            *origin.notes,
            sep="\n",
            flush=True,  # before the progress bar, in a log file too
        )
    metrics = JsonlFile(files.out / "metrics.jsonl", start) if lead else None
    bar = ProgressBar(cfg.steps, start, enabled=lead)
    stream = batches(dataset, cfg, start, rank, world)
    autocast = autocast_for(cfg.precision, device)
    reporters = []
    if lead:
        files.add(*(REPORTERS[name].folder for name in reporter_names(cfg.report_to)))
        reporters = open_reporters(cfg.report_to, files.out, start, asdict(cfg))
    sinks = [metrics, bar, *reporters] if lead else []
    return Run(cfg, rank, world, device, files, model, tokenizer, optimizer, scaling, start,
               stream, loss_fn, autocast, evaluation, bar, sinks, done=start,
               saved=start)  # fmt: skip


def check(cfg: TrainConfig, world: int) -> tuple[TrainConfig, RunFiles, Origin]:
    """What a run checks before it writes anything (beside its data, checked when read): the
    batch against the processes, the run directory (``directory.claim``), the checkpoint it
    continues or starts from against the flags (``origin.start``) and against ``--steps``.
    Returns ``cfg`` as the run uses it, the run's files and its origin."""
    if cfg.batch_size % world:
        raise FlagError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    folders = [REPORTERS[name].folder for name in reporter_names(cfg.report_to)]
    files = claim(Path(cfg.out), cfg.resume, cfg.overwrite, (*ENTRIES, *folders))
    checkpoint = files.latest() if cfg.resume else None
    cfg, origin = start(cfg, checkpoint)
    if origin.start > cfg.steps:
        raise FlagError(
            f"--steps {cfg.steps}: {checkpoint} is at step {origin.start}, past steps="
            f"{cfg.steps}: nothing to do (raise --steps to continue the run)"
        )
    return cfg, files, origin


def prepare(cfg: TrainConfig, files: RunFiles, origin: Origin) -> None:
    """Rank 0 readies the run directory: a new run deletes the earlier run's entries
    (``--overwrite``) or what a start without a checkpoint left; a resumed one the temporary
    folders of a save cut short."""
    out = files.out
    if origin.trainer is None:
        if cfg.resume:
            print(f"--resume: no checkpoint in {out}, starting a new run", flush=True)
        deleted = files.clear()
        if deleted and not cfg.overwrite:
            print(f"{out}: deleted what a start without a checkpoint left: {', '.join(deleted)}")
    else:
        files.remove(name for name in list(files.names) if name.startswith(".tmp-"))
    out.mkdir(parents=True, exist_ok=True)


def train_tokenizer(
    cfg: TrainConfig, dataset: Dataset, files: RunFiles, rank: int, world: int
) -> Tokenizer:
    """A BPE learned from the training captions by rank 0 and saved to the run's
    ``tokenizer``; the others load it."""
    path = files.out / "tokenizer"
    if rank == 0:
        tokenizer = Tokenizer.train(
            captions(dataset, TOKENIZER_CAPTIONS),
            cfg.vocab_size,
            context_length=PRESETS[cfg.model].context_length,
        )
        files.add(path.name)
        tokenizer.save_pretrained(path)
    barrier(world)
    return Tokenizer.from_pretrained(path) if rank else tokenizer


def train_step(run: Run, step: int) -> torch.Tensor | None:
    """One optimizer step on this process's rows of the step's batch. Returns the loss averaged
    over the processes, or None when every sample of the batch was undecodable (and reported):
    no update then. In fp16 the GradScaler skips a step whose gradients hold an inf or NaN; the
    run diverges when the loss stays inf or NaN (``Scaling.count``)."""
    cfg, model = run.cfg, run.model
    images, texts, skipped = next(run.stream)
    run.skipped.update(skipped)
    images, texts = common_rows(images, texts, run.world)
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
    run.busy = "update"  # until the step is recorded: Ctrl-C finds no step complete
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
    run.busy = "evaluation"
    metrics = run.evaluation(run.model, run.tokenizer, run.device)
    run.busy = ""
    if metrics:  # a data source without evaluation sets (shards, CSV) has none
        _write(run, dict(step=done, **metrics))
    return metrics


def _write(run: Run, record: dict[str, float]) -> None:
    for sink in run.sinks:
        sink.write(record)


def save(run: Run, done: int) -> None:
    """A checkpoint, written by rank 0 while the others wait."""
    if run.rank == 0:
        run.busy = "save"
        save_checkpoint(run.files, done, run.model, run.tokenizer, run.optimizer, run.scaling,
                        run.cfg, run.rng)  # fmt: skip
        run.saved, run.busy = done, ""
    barrier(run.world)


def stop(run: Run) -> str:
    """Where Ctrl-C leaves the run, in a line. Rank 0 first saves the last completed step,
    unless it is saved already or Ctrl-C cut an update (the weights are neither before nor after
    it) or a save (which removed what it had written) short."""
    if run.rank != 0:
        return f"interrupted at step {run.done + 1}"
    where = {
        "update": f"interrupted in step {run.done + 1}'s update",
        "save": f"interrupted while saving step {run.done}",
        "evaluation": f"interrupted in step {run.done}'s evaluation (not recorded)",
    }.get(run.busy, f"interrupted at step {run.done + 1}")
    if run.done == run.cfg.steps:
        where = f"interrupted after the last step, {run.done}"
    if run.busy not in ("update", "save") and run.done > run.saved:
        path = save_checkpoint(run.files, run.done, run.model, run.tokenizer, run.optimizer,
                               run.scaling, run.cfg, run.rng)  # fmt: skip
        run.saved = run.done
        return f"{where}: saved {path}; --resume continues from step {run.done}"
    if run.saved == 0:
        return f"{where}: no checkpoint was saved; a rerun starts the run anew"
    checkpoint = run.files.out / checkpoint_name(run.saved)
    return f"{where}: --resume continues from step {run.saved} ({checkpoint})"


def finish(run: Run, final: dict[str, float]) -> None:
    """Close the records (the progress bar, metrics.jsonl, --report-to's trackers); rank 0
    plots them and prints the skipped samples and the final evaluation."""
    for sink in run.sinks:
        sink.close()
    if run.rank == 0:
        out = run.files.out
        run.files.add("metrics.png")
        plot(out / "metrics.jsonl", out / "metrics.png")
        print(summary(final, out, run.skipped, run.world))
    shutdown(run.world)
