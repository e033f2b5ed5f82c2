"""The data sources ``--data`` names, in one registry that training, evaluation and fine-tuning
read: ``shapes``, ``digits``, ``wds:<urls>``, ``csv:<file>`` and ``hf:<path or name>[:split]``.

A source builds its training set of (uint8 image (3, H, W), caption) pairs and, where it has them,
its evaluation sets (zero-shot tasks and a retrieval set) and its few-shot classification splits.
A new source is one more entry in ``SOURCES``: the flags' help, the error messages and every
command follow.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset, IterableDataset

from fastclip.checks import one_of
from fastclip.data.digits import DigitsDataset
from fastclip.data.hf import HfPairs
from fastclip.data.imagefiles import CsvPairs
from fastclip.data.shapes import ShapesDataset
from fastclip.data.shards import WebDatasetPairs


@dataclass(frozen=True)
class EvaluationSets:
    """What a model is evaluated on: zero-shot tasks (datasets with ``labels``, ``classnames``
    and ``templates``) by name, and a retrieval set (a dataset with ``captions``) or None."""

    tasks: dict[str, Dataset] = field(default_factory=dict)
    retrieval: Dataset | None = None


@dataclass(frozen=True)
class Source:
    """One kind of ``--data``: how the flag spells it and what it provides."""

    syntax: str  # "shapes", or "wds:<urls>" for a source that takes an argument
    help: str  # what it is, for the --data flag's help
    training: Callable[..., Dataset]  # (argument, seed, samples; 0: default, **columns) -> pairs
    evaluation: Callable[[int], EvaluationSets] | None = None  # seed -> evaluation sets
    few_shot: Callable[[int], tuple[Dataset, Dataset]] | None = None  # seed -> (train, test)
    columns: bool = False  # reads named columns: training takes image_key= and caption_key=


def _shapes_evaluation(seed: int) -> EvaluationSets:
    tasks = {split: ShapesDataset(split, seed=seed) for split in ("zeroshot", "compositional")}
    return EvaluationSets(tasks, retrieval=ShapesDataset("test", seed=seed))


class ClassesPresent(Dataset):
    """A labelled dataset as a classification task over the classes its labels hold, in the
    order of its ``classnames``: ``classnames`` those, ``labels`` renumbered into them; items and
    ``templates`` the dataset's. ``like``: another such view whose classes to take instead (a
    test split scored on the training split's classes; a ValueError if it holds another)."""

    def __init__(self, dataset: Dataset, like: ClassesPresent | None = None):
        names = list(dataset.classnames)
        present = sorted(set(dataset.labels))
        self.classnames = [names[y] for y in present] if like is None else list(like.classnames)
        index = {name: i for i, name in enumerate(self.classnames)}
        extra = [names[y] for y in present if names[y] not in index]
        if extra:
            raise ValueError(f"the test split holds classes the training split lacks: {extra}")
        self.labels = [index[names[y]] for y in dataset.labels]
        if hasattr(dataset, "templates"):
            self.templates = dataset.templates
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.dataset[index]


def _shapes_few_shot(seed: int) -> tuple[Dataset, Dataset]:
    """The 24 colour x shape pairs seen in pretraining: ``HELD_OUT``'s 4, which no training set
    draws, stay out of fine-tuning too, so that the compositional split still measures what no
    training saw. The few shots from another stream of the zero-shot split."""
    train = ClassesPresent(ShapesDataset("zeroshot", seed=seed + 1))
    return train, ClassesPresent(ShapesDataset("zeroshot", seed=seed), like=train)


SOURCES = {
    "shapes": Source(
        "shapes",
        "generated coloured shapes",
        training=lambda _, seed, samples: ShapesDataset("train", samples or None, seed=seed),
        evaluation=_shapes_evaluation,
        few_shot=_shapes_few_shot,
    ),
    "digits": Source(
        "digits",
        "scikit-learn's handwritten digits",
        training=lambda _, seed, samples: DigitsDataset("train", seed=seed),
        evaluation=lambda seed: EvaluationSets({"zeroshot": DigitsDataset("test", seed=seed)}),
        few_shot=lambda seed: (DigitsDataset("train", seed=seed), DigitsDataset("test", seed=seed)),
    ),
    "wds": Source(
        "wds:<urls>",
        "tar shards, braces allowed",
        training=lambda urls, seed, _: WebDatasetPairs(urls, shuffle=1000, seed=seed),
    ),
    "csv": Source(
        "csv:<file>",
        "a CSV with filepath and caption columns",
        training=lambda path, *_, **columns: CsvPairs(path, **columns),
        columns=True,
    ),
    "hf": Source(
        "hf:<path or name>[:split]",
        "a Hugging Face dataset saved to disk, in a folder or in the cache; image and text columns",
        training=lambda spec, *_, **columns: HfPairs(spec, **columns),
        columns=True,
    ),
}


def serving(use: str) -> list[Source]:
    """The sources that have ``use``: "training", "evaluation" or "few_shot"."""
    return [s for s in SOURCES.values() if getattr(s, use) is not None]


def described(use: str) -> str:
    """How ``--data`` spells every source that has ``use``, and what each is: a flag's help."""
    return " | ".join(f"{s.syntax} ({s.help})" for s in serving(use))


def find(spec: str, use: str = "training") -> tuple[Source, str]:
    """The source that ``spec`` ("kind" or "kind:argument") names, and its argument; a
    ValueError listing the sources that have ``use`` if there is none such."""
    kind, _, argument = spec.partition(":")
    source = SOURCES.get(kind)
    if source is None or getattr(source, use) is None or (":" in source.syntax and not argument):
        raise ValueError(f"data must be {one_of([s.syntax for s in serving(use)])}, got {spec!r}")
    return source, argument


def column_keywords(source: Source, image: str = "", caption: str = "") -> dict[str, str]:
    """The columns to read (``image_key``, ``caption_key``) where given; a ValueError if given
    for a source without named columns."""
    keywords = {k: v for k, v in dict(image_key=image, caption_key=caption).items() if v}
    if keywords and not source.columns:
        tables = one_of([s.syntax for s in SOURCES.values() if s.columns])
        raise ValueError(f"image_column and caption_column apply to {tables}, not {source.syntax}")
    return keywords


def training_set(
    spec: str, seed: int, samples: int = 0, image_column: str = "", caption_column: str = ""
) -> Dataset:
    """The (image, caption) pairs to train on: map-style, or iterable for a stream of shards.
    ``image_column`` and ``caption_column`` name the columns of a table (its defaults if ""). A
    ValueError if the source yields no usable sample (see ``check_usable``)."""
    source, argument = find(spec)
    columns = column_keywords(source, image_column, caption_column)
    dataset = source.training(argument, seed, samples, **columns)
    check_usable(dataset, spec)
    return dataset


def check_usable(dataset: Dataset, spec: str) -> None:
    """Read ``dataset`` up to its first usable sample: a ValueError, with the reasons its bad
    samples were skipped, if there is none (missing or empty shards, a CSV of bad rows). A copy
    reads, with its own counts of skipped samples: the dataset's stay the run's."""
    probe = copy.copy(dataset)
    if hasattr(probe, "skip_reasons"):
        probe.skipped, probe.skip_reasons = 0, Counter()
    if hasattr(probe, "unreadable"):  # shards found unreadable
        probe.unreadable = set()
    items = (
        probe if isinstance(probe, IterableDataset) else map(probe.__getitem__, range(len(probe)))
    )
    if any(item is not None for item in items):
        return
    reasons = getattr(probe, "skip_reasons", Counter())
    why = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()) or "it is empty"
    raise ValueError(f"--data {spec} yields no usable sample to train on ({why})")


def evaluation_sets(spec: str, seed: int) -> EvaluationSets:
    """The source's evaluation sets; none for a source without them (shards, CSV)."""
    source, _ = find(spec)
    return source.evaluation(seed) if source.evaluation else EvaluationSets()


def few_shot_splits(spec: str, seed: int) -> tuple[Dataset, Dataset]:
    """(train, test) classification splits with ``labels`` and ``classnames``: the same names,
    each with examples in train."""
    source, _ = find(spec, "few_shot")
    return source.few_shot(seed)
