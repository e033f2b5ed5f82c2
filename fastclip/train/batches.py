"""What each step trains on: this process's rows of the step's batch, drawn from (seed, step),
and their pixels, augmented from (seed, step, rank). A resumed run reads and draws exactly what
the uninterrupted one would have. Each batch carries the samples the dataset skipped since the
previous one, so the run's total counts those DataLoader workers skipped in their own copies."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from fastclip.data import collate_pairs
from fastclip.train.config import FlagError, TrainConfig
from fastclip.transforms import ImageTransform, preprocess


class Counted:
    """``collate_pairs``, with the samples the dataset skipped (by reason) since this process's
    previous batch: a DataLoader worker counts them in its own copy of the dataset, which the
    main process never sees. Counted from the dataset's state when the loader was made (what
    reading the captions for the tokenizer skipped is not training's)."""

    def __init__(self, dataset: Dataset, workers: int):
        self.dataset = None if workers else dataset  # a worker reads its own copy
        self.seen = Counter(getattr(dataset, "skip_reasons", {}))

    def __call__(self, batch: list) -> tuple[list, list[str], Counter]:
        worker = get_worker_info()
        dataset = worker.dataset if worker is not None else self.dataset
        counts = Counter(getattr(dataset, "skip_reasons", {}))
        skipped, self.seen = counts - self.seen, counts
        return (*collate_pairs(batch), skipped)


def steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
    """Whole batches in a map-style dataset; a FlagError if there is none."""
    if len(dataset) < batch_size:
        raise FlagError(
            f"--batch-size {batch_size} exceeds the {len(dataset)} training samples: use at "
            f"most {len(dataset)}"
        )
    return len(dataset) // batch_size


def batches(
    dataset: Dataset, cfg: TrainConfig, start: int, rank: int, world: int
) -> Iterator[tuple[list, list[str], Counter]]:
    """This process's rows of every step's batch from step ``start`` on: (images, captions, the
    samples skipped since the previous batch, by reason).

    A map-style dataset is read in a permutation per epoch drawn from (seed, epoch), so step s's
    rows depend only on s: a resumed run reads what the uninterrupted one would have. A stream
    (shards) is split by process and worker, and skips the batches already consumed."""
    rows = cfg.batch_size // world
    loader_args = dict(num_workers=cfg.workers, collate_fn=Counted(dataset, cfg.workers))
    if isinstance(dataset, IterableDataset):
        loader = DataLoader(dataset, batch_size=rows, drop_last=True, **loader_args)
        yield from itertools.islice(_forever(loader, rows), start, None)
        return
    per_epoch = steps_per_epoch(dataset, cfg.batch_size)

    def indices() -> Iterator[list[int]]:
        epoch, order = None, None
        for step in itertools.count(start):
            if step // per_epoch != epoch:  # a new permutation once per epoch
                epoch = step // per_epoch
                rng = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
                order = torch.randperm(len(dataset), generator=rng)
            i = step % per_epoch
            batch = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            yield batch[rank * rows : (rank + 1) * rows].tolist()

    yield from DataLoader(dataset, batch_sampler=indices(), **loader_args)


def _forever(loader: Iterable, rows: int) -> Iterator:
    """The loader's batches, pass after pass; a ValueError if a pass gives none."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError(
                f"a pass over the data gave no batch of {rows} rows: the stream holds fewer "
                "usable samples than one batch per process (and DataLoader worker)"
            )


def pixels(images: list, cfg: TrainConfig, step: int, rank: int, size: int) -> torch.Tensor:
    """The batch's images as (B, 3, size, size) model inputs: random resized crops drawn from
    (seed, step, rank) if ``cfg.augment``, CLIP's evaluation transform otherwise."""
    if not cfg.augment:
        return preprocess(images, size)
    rng = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 4099 + rank)
    return ImageTransform(size, train=True, generator=rng)(images)


def captions(dataset: Dataset, limit: int) -> Iterator[str]:
    """Up to ``limit`` training captions, without decoding images where the dataset lists them."""
    if hasattr(dataset, "captions"):
        pairs = ((None, c) for c in dataset.captions)
    else:
        pairs = (item for item in dataset if item is not None)
    return (caption for _, caption in itertools.islice(pairs, limit))
