"""Train a CLIP from scratch: ``fastclip train`` (or ``python -m fastclip.train``).

With no arguments it trains the ``tiny`` preset on the generated shapes on a CPU in minutes and
ends by printing zero-shot accuracy and retrieval recall. The same script runs on one process or
many (``torchrun --nproc-per-node 8 -m fastclip.train ...``: NCCL on GPUs, gloo on CPUs).

One optimizer step sees a contrastive batch of ``--batch-size`` pairs (over all processes):

  1. every micro-batch of ``--micro-batch`` rows is encoded without gradients (feature cache);
  2. the fused loss runs on the whole batch's features (gathered across processes with their
     gradients), and its backward gives d loss / d features for every row;
  3. every micro-batch is encoded again, with gradients, and back-propagates its rows' slice.

So the contrastive batch is the full batch, however small the micro-batches that fit in memory:
unlike naive gradient accumulation, every pair is scored against every other. Gradients are then
averaged across processes once per step, as DistributedDataParallel does.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from fastclip import data as datasets
from fastclip.checkpoint import load_pretrained, save_pretrained
from fastclip.loss import ClipLoss
from fastclip.model import CLIP, PRESETS
from fastclip.siglip import SigLipLoss
from fastclip.tokenizer import Tokenizer
from fastclip.transforms import ImageTransform, preprocess
from fastclip.zeroshot import (
    accuracy,
    build_zero_shot_classifier,
    encode_images,
    retrieval_recall,
    zero_shot_classify,
)


@dataclass
class TrainConfig:
    """Every field is a command-line flag: ``batch_size`` is ``--batch-size`` (see HELP)."""

    out: str = "runs/shapes"
    data: str = "shapes"
    model: str = "tiny"
    init: str = ""
    lock_image: bool = False
    lock_text: bool = False
    loss: str = "clip"
    steps: int = 1500
    batch_size: int = 256
    micro_batch: int = 0
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 100
    grad_clip: float = 1.0
    precision: str = "auto"
    device: str = "auto"
    grad_checkpointing: bool = False
    augment: bool = True
    vocab_size: int = 1024
    samples: int = 0
    workers: int = 0
    log_every: int = 10
    eval_every: int = 250
    save_every: int = 500
    resume: bool = False
    seed: int = 0


HELP = {
    "out": "run directory: checkpoints, metrics.jsonl, metrics.png",
    "data": "shapes | digits | wds:<shard urls, braces allowed> | csv:<file with filepath,caption>",
    "model": f"preset: {', '.join(PRESETS)}",
    "init": "start from this checkpoint (and its tokenizer): fine-tuning",
    "lock_image": "freeze the image tower and its head (LiT: train the text side)",
    "lock_text": "freeze the text tower and its head",
    "loss": "clip (InfoNCE) | siglip",
    "steps": "optimizer steps",
    "batch_size": "contrastive batch: pairs per step, all processes together",
    "micro_batch": "rows per forward with gradients, per process (0: all; else feature cache)",
    "lr": "peak learning rate (AdamW, betas 0.9/0.98, eps 1e-6)",
    "weight_decay": "on weight matrices only; none on biases, norms, scalars",
    "warmup": "linear warm-up steps, then cosine decay to 0",
    "grad_clip": "max global gradient norm (0: off)",
    "precision": "fp32 | bf16 (autocast) | auto: bf16 on CUDA, fp32 on CPU",
    "device": "cuda | cpu | auto: CUDA (one GPU per process, NCCL) when present, else CPU (gloo)",
    "grad_checkpointing": "recompute transformer blocks in backward (less memory)",
    "augment": "random resized crops (area 0.9-1) while training",
    "vocab_size": "size of the BPE trained on the captions (a new run)",
    "samples": "generated training images (0: the dataset's default)",
    "workers": "DataLoader worker processes",
    "log_every": "steps between metric records",
    "eval_every": "steps between evaluations (0: at the end only)",
    "save_every": "steps between checkpoints (0: at the end only)",
    "resume": "continue from the run directory's latest checkpoint",
    "seed": "model initialization, data order and augmentation",
}


# ---------------------------------------------------------------------------------------------
# Processes and data


def setup_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device): torchrun's environment when present, else one process."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    target = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if cuda
        else torch.device("cpu")
    )
    if cuda:
        torch.cuda.set_device(target)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, target


def training_set(cfg: TrainConfig):
    """The map-style or iterable dataset of (uint8 image (3, H, W), caption) pairs."""
    kind, _, arg = cfg.data.partition(":")
    if kind == "shapes":
        return datasets.ShapesDataset("train", cfg.samples or None, seed=cfg.seed)
    if kind == "digits":
        return datasets.DigitsDataset("train", seed=cfg.seed)
    if kind == "wds" and arg:
        return datasets.WebDatasetPairs(arg, shuffle=1000, seed=cfg.seed)
    if kind == "csv" and arg:
        return datasets.CsvPairs(arg)
    raise ValueError(f"data must be shapes, digits, wds:<urls> or csv:<file>, got {cfg.data!r}")


def batches(
    dataset, cfg: TrainConfig, start: int, rank: int, world: int
) -> Iterator[tuple[list, list[str]]]:
    """This process's rows of every step's batch from step ``start`` on: (images, captions).

    A map-style dataset is read in a permutation per epoch drawn from (seed, epoch), so step s's
    rows depend only on s: a resumed run reads what the uninterrupted one would have. A stream
    (shards) is split by process and worker, and skips the batches already consumed."""
    rows = cfg.batch_size // world
    loader_args = dict(num_workers=cfg.workers, collate_fn=datasets.collate_pairs)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=rows, drop_last=True, **loader_args
        )
        yield from itertools.islice(_forever(loader), start, None)
        return
    per_epoch = len(dataset) // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {len(dataset)} training samples")

    def indices():
        epoch, order = None, None
        for step in itertools.count(start):
            if step // per_epoch != epoch:  # a new permutation once per epoch
                epoch = step // per_epoch
                rng = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
                order = torch.randperm(len(dataset), generator=rng)
            i = step % per_epoch
            batch = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            yield batch[rank * rows : (rank + 1) * rows].tolist()

    loader = torch.utils.data.DataLoader(dataset, batch_sampler=indices(), **loader_args)
    yield from loader


def _forever(loader):
    while True:
        yield from loader


# ---------------------------------------------------------------------------------------------
# The step


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """CLIP's AdamW groups: weight decay on matrices, none on biases, norms' gains, embeddings'
    class token, the logit scale and bias (every parameter of < 2 dimensions)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    rest = [p for p in trainable if p.ndim < 2]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]


def cosine_schedule(step: int, warmup: int, steps: int) -> float:
    """The learning rate's multiplier: linear warm-up over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def contrastive_step(
    model: CLIP, loss_fn, images: torch.Tensor, tokens: torch.Tensor, micro_batch: int, autocast
) -> torch.Tensor:
    """Forward and backward of this process's rows (B, ...) of the contrastive batch, in
    micro-batches of ``micro_batch`` rows with a feature cache (see the module docstring).
    Returns the loss (detached)."""
    if micro_batch <= 0 or micro_batch >= images.shape[0]:
        with autocast():
            loss = loss_fn(*model(images, tokens))
        loss.backward()
        return loss.detach()
    chunks = list(zip(images.split(micro_batch), tokens.split(micro_batch), strict=True))
    with torch.no_grad(), autocast():  # 1. the feature cache
        cached = [(model.encode_image(i), model.encode_text(t)) for i, t in chunks]
    image_features = torch.cat([f for f, _ in cached]).requires_grad_()  # (B, E)
    text_features = torch.cat([f for _, f in cached]).requires_grad_()  # (B, E)
    with autocast():  # 2. the loss over the whole batch: gradients for features and scale
        loss = loss_fn(image_features, text_features, *_scale_and_bias(model))
    loss.backward()
    grads = zip(
        image_features.grad.split(micro_batch), text_features.grad.split(micro_batch), strict=True
    )
    for (i, t), (d_image, d_text) in zip(chunks, grads, strict=True):  # 3. re-encode, backward
        with autocast():
            outputs = [model.encode_image(i), model.encode_text(t)]
        pairs = zip(outputs, (d_image, d_text), strict=True)
        live = [(f, g.to(f.dtype)) for f, g in pairs if f.requires_grad]  # not a locked tower's
        torch.autograd.backward(*zip(*live, strict=True))
    return loss.detach()


def _scale_and_bias(model: CLIP) -> list[torch.Tensor]:
    """The loss's remaining arguments, as the model's forward returns them."""
    return [model.logit_scale.exp()] + ([] if model.logit_bias is None else [model.logit_bias])


def lock_towers(model: CLIP, image: bool, text: bool) -> None:
    """Freeze whole towers with their heads: their weights stay bit for bit what they were."""
    for locked, tower, head in (
        (image, model.visual, model.visual_proj),
        (text, model.text, model.text_proj),
    ):
        for p in (*tower.parameters(), *head.parameters()):
            p.requires_grad_(not locked)
        if locked:
            tower.eval()  # batch norms keep their statistics


def average_gradients(model: torch.nn.Module, world: int) -> None:
    """All-reduce the gradients once (one flat buffer) and divide by the number of processes."""
    if world == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, new in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(new.view_as(g))


# ---------------------------------------------------------------------------------------------
# Checkpoints: <out>/step-NNNNNN directories, each complete before it is named; <out>/latest
# names the newest. A kill mid-save leaves only a temporary directory behind.


def save_checkpoint(
    out: Path, step: int, model, tokenizer, optimizer, cfg: TrainConfig, keep: int = 2
) -> Path:
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
    pointer = out / ".latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, out / "latest")
    for old in sorted(out.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "latest"
    return out / pointer.read_text().strip() if pointer.is_file() else None


# ---------------------------------------------------------------------------------------------
# Evaluation


class Evaluation:
    """The dataset's zero-shot tasks and retrieval set, preprocessed once."""

    def __init__(self, data: str, seed: int, image_size: int):
        kind = data.partition(":")[0]
        self.tasks, self.retrieval = {}, None
        if kind == "shapes":
            for split in ("zeroshot", "compositional"):
                ds = datasets.ShapesDataset(split, seed=seed)
                self.tasks[split] = self._load(ds, image_size) + (ds.classnames, ds.templates)
            ds = datasets.ShapesDataset("test", seed=seed)
            images, _ = self._load(ds, image_size)
            self.retrieval = (images, list(ds.captions))
        elif kind == "digits":
            ds = datasets.DigitsDataset("test", seed=seed)
            self.tasks["zeroshot"] = self._load(ds, image_size) + (ds.classnames, ds.templates)

    @staticmethod
    def _load(ds, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = preprocess([ds[i][0] for i in range(len(ds))], image_size)  # (N, 3, S, S)
        return images, torch.tensor(ds.labels[: len(ds)])

    @torch.no_grad()
    def __call__(self, model: CLIP, tokenizer: Tokenizer, device: torch.device) -> dict[str, float]:
        metrics = {}
        for name, (images, labels, classnames, templates) in self.tasks.items():
            classifier = build_zero_shot_classifier(
                model, tokenizer, classnames, templates, device=device
            )
            features = encode_images(model, images, device=device)
            top = zero_shot_classify(features, classifier, k=5)
            for k, v in accuracy(top.cpu(), labels, ks=(1, 5)).items():
                metrics[f"{name}_{k}"] = v
        if self.retrieval is not None:
            images, captions = self.retrieval
            image_features = encode_images(model, images, device=device)
            tokens = tokenizer(captions).to(device)
            text_features = torch.cat([model.encode_text(t) for t in tokens.split(256)])
            recall = retrieval_recall(image_features, text_features, ks=(1, 5, 10))
            metrics.update({f"retrieval_{k}": v for k, v in recall.items()})
        return metrics


# ---------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig) -> dict[str, float]:
    """Train as ``cfg`` says; returns the final evaluation's metrics (rank 0; {} elsewhere)."""
    rank, world, device = setup_distributed(cfg.device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    if cfg.loss not in ("clip", "siglip"):
        raise ValueError(f"loss must be clip or siglip, got {cfg.loss!r}")
    if cfg.lock_image and cfg.lock_text:
        raise ValueError("lock_image and lock_text together leave nothing to train")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {cfg.precision!r}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    dataset = training_set(cfg)
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if resume_from is not None:
        tokenizer = Tokenizer.from_pretrained(resume_from)
        model = load_pretrained(resume_from).train()
        state = torch.load(resume_from / "trainer.pt", weights_only=True)
        start = state["step"]
    elif cfg.init:
        tokenizer, model = Tokenizer.from_pretrained(cfg.init), load_pretrained(cfg.init).train()
        start, state = 0, None
    else:
        tokenizer = _tokenizer(cfg, dataset, out, rank, world)
        siglip = {}
        if cfg.loss == "siglip":
            siglip = dict(logit_scale_init=math.log(10), logit_bias_init=-10.0)
        model = CLIP(cfg.model, **tokenizer.model_fields(), **siglip)
        start, state = 0, None
    lock_towers(model, cfg.lock_image, cfg.lock_text)
    model.to(device).set_grad_checkpointing(cfg.grad_checkpointing)
    if world > 1:  # every process starts from rank 0's weights
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate((3, tuple(state["python_rng"]), None))
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])
    loss_fn = (
        SigLipLoss(rank=rank, world_size=world)
        if cfg.loss == "siglip"
        else ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    )
    size = model.config.image_size
    evaluation = Evaluation(cfg.data, cfg.seed, size) if rank == 0 else None
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        _truncate_metrics(metrics_path, start)
    if rank == 0 and start == 0:
        print(
            f"fastclip train: {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
            f"parameters), {cfg.data}, batch {cfg.batch_size} on {world} process(es), {device}",
            flush=True,  # before the progress bar, in a log file too
        )

    bar = tqdm(
        total=cfg.steps,
        initial=start,
        disable=rank != 0,
        desc="train",
        dynamic_ncols=True,
        mininterval=0.2 if sys.stderr.isatty() else 30,  # in a log file: a line per 30 s
    )
    tic, seen, final = time.perf_counter(), 0, {}
    stream = batches(dataset, cfg, start, rank, world)
    for step in range(start, cfg.steps):
        images, captions = _common_rows(*next(stream), world)
        done, loss = step + 1, None
        if images:  # else every sample of the batch was undecodable (and reported): no update
            if cfg.augment:  # crops drawn from (seed, step, rank): a resumed run draws the same
                rng = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 4099 + rank)
                pixels = ImageTransform(size, train=True, generator=rng)(images)
            else:
                pixels = preprocess(images, size)
            tokens = tokenizer(captions).to(device)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * cosine_schedule(step, cfg.warmup, cfg.steps)
            optimizer.zero_grad(set_to_none=True)
            loss = contrastive_step(
                model, loss_fn, pixels.to(device), tokens, cfg.micro_batch, autocast
            )
            average_gradients(model, world)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            seen += len(images) * world
            if world > 1:
                dist.all_reduce(loss)
                loss /= world
        if rank == 0 and loss is not None and (done % cfg.log_every == 0 or done == cfg.steps):
            rate = seen / (time.perf_counter() - tic)
            record = dict(
                step=done,
                loss=loss.item(),
                lr=optimizer.param_groups[0]["lr"],
                logit_scale=model.logit_scale.exp().item(),
                samples_per_s=rate,
            )
            _append(metrics_path, record)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}", samples_s=f"{rate:.0f}", lr=f"{record['lr']:.1e}"
            )
        if rank == 0 and (done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0)):
            model.eval()
            final = evaluation(model, tokenizer, device)
            model.train()
            lock_towers(model, cfg.lock_image, cfg.lock_text)
            if final:  # a dataset without evaluation sets (shards, CSV) has none
                _append(metrics_path, dict(step=done, **final))
                bar.write(f"step {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in final.items()))
        if done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
            if rank == 0:
                save_checkpoint(out, done, model, tokenizer, optimizer, cfg)
            if world > 1:
                dist.barrier()
        bar.update(1)
    bar.close()
    if rank == 0:
        _plot(metrics_path, out / "metrics.png")
        print(_summary(final, out))
    if world > 1:
        dist.destroy_process_group()
    return final


def _common_rows(images: list, captions: list[str], world: int) -> tuple[list, list[str]]:
    """Undecodable samples leave a batch short; every process keeps as many rows as the
    shortest, so that features gather in equal shapes."""
    if world > 1:
        n = torch.tensor(len(images))
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        images, captions = images[: int(n)], captions[: int(n)]
    return images, captions


def _tokenizer(cfg: TrainConfig, dataset, out: Path, rank: int, world: int) -> Tokenizer:
    """A BPE trained on (up to 20,000) training captions, by rank 0; the others load it."""
    path = out / "tokenizer"
    if rank == 0:
        captions = (caption for _, caption in itertools.islice(_captions(dataset), 20000))
        tokenizer = Tokenizer.train(
            captions, cfg.vocab_size, context_length=PRESETS[cfg.model].context_length
        )
        tokenizer.save_pretrained(path)
    if world > 1:
        dist.barrier()
    return Tokenizer.from_pretrained(path) if rank else tokenizer


def _captions(dataset):
    if hasattr(dataset, "captions"):
        return ((None, c) for c in dataset.captions)
    return (item for item in dataset if item is not None)


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step``: a resumed run rewrites them, so none is duplicated."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _plot(metrics_path: Path, png: Path) -> None:
    """Loss and evaluation metrics over steps, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "loss" not in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train])
    left.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
    for key in sorted(k for k in {k for r in evals for k in r} if k.endswith(("top1", "R@1"))):
        points = [(r["step"], r[key]) for r in evals if key in r]
        right.plot(*zip(*points, strict=True), marker="o", label=key)
    right.set(xlabel="step", ylabel="top-1 accuracy / recall@1", title="evaluation", ylim=(0, 1.02))
    if right.lines:
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _summary(metrics: dict[str, float], out: Path) -> str:
    lines = [f"done: checkpoints, metrics.jsonl and metrics.png in {out}"]
    lines += [f"  {k:<28} {v:6.1%}" for k, v in metrics.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="fastclip train", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(TrainConfig):
        flag, kind = "--" + f.name.replace("_", "-"), type(f.default)
        help = f"{HELP[f.name]} (default: {f.default})"
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help
            )
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=help)
    return TrainConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
