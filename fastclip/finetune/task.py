"""The few-shot task and the comparison: a frozen CLIP's splits encoded once, k examples per class
drawn, every method of the registry trained and scored on them."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from fastclip.checkpoint import load_pretrained
from fastclip.checkpoint.pretrained import HUB_LAYOUTS, weight_names
from fastclip.checks import check_classnames, check_int
from fastclip.finetune import adapter, lora, probe, prompt
from fastclip.finetune.base import FewShot, Method, Split, check_text_tower, top1
from fastclip.hub import resolve
from fastclip.tokenizer import Tokenizer
from fastclip.zeroshot import TEMPLATES, build_zero_shot_classifier, encode_images, load_images

METHODS: dict[str, Method] = {  # the command line's --method, and the comparison's rows
    "probe": probe.METHOD,
    "adapter": adapter.METHOD,
    "prompt": prompt.METHOD,
    "lora": lora.METHOD,
}
TOWERS = {  # weight-name prefixes (fastclip, Hugging Face, OpenAI layouts), what needs the tower
    "image": (("visual.", "vision_model."), "every method"),
    "text": (("text.", "text_model.", "transformer.", "token_embedding."), "zero-shot, adapter, "
             "prompt and lora"),
}  # fmt: skip


def few_shot_indices(
    labels: Sequence[int] | torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    classnames: Sequence[str] | None = None,
) -> list[int]:
    """k indices per class of (N,) ``labels``, drawn from ``seed``, in ascending order.

    The classes are 0..C-1, C = len(classnames) if given, else max(labels) + 1; each needs at
    least k examples. One permutation per class is drawn whatever k, so for a seed the k-shot
    set lies inside the 2k-shot set.
    """
    check_int("k", k)
    labels = _check_labels(labels, classnames)
    by_class = [[] for _ in range(len(classnames) if classnames else max(labels) + 1)]
    for i, y in enumerate(labels):
        by_class[y].append(i)
    c = min(range(len(by_class)), key=lambda c: len(by_class[c]))
    if k > len(by_class[c]):
        name = f"{c} ({classnames[c]!r})" if classnames else str(c)
        raise ValueError(f"k={k} exceeds the {len(by_class[c])} examples of class {name}")
    rng = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(len(ids), generator=rng)[:k].tolist() for ids in by_class]
    return sorted(ids[j] for ids, perm in zip(by_class, perms, strict=True) for j in perm)


def _check_labels(labels, classnames: Sequence[str] | None = None) -> list[int]:
    """(N,) class ids as a list of int, all in [0, len(classnames))."""
    try:
        labels = [
            operator.index(y) for y in (labels.tolist() if torch.is_tensor(labels) else labels)
        ]
    except TypeError as e:
        raise TypeError(f"labels must be int class ids: {e}") from None
    if not labels or min(labels) < 0:
        raise ValueError(f"labels must be a non-empty sequence of ids >= 0, got {labels[:8]}")
    if classnames is not None and max(labels) >= len(check_classnames(classnames)):
        raise ValueError(
            f"labels hold class {max(labels)}, but classnames lists {len(classnames)} classes "
            f"({list(classnames)[:4]}...): the names do not match the labels"
        )
    return labels


def prepare(model: nn.Module, dataset: Dataset, classnames: Sequence[str]) -> Split:
    """Preprocess every image of ``dataset`` (items (uint8 image, caption), ``.labels``) and
    encode it once with the frozen image tower, on the model's device."""
    labels = torch.tensor(_check_labels(dataset.labels, classnames))
    device = next(model.parameters()).device
    images = load_images(dataset, model.config.image_size).to(device)  # (N, 3, S, S)
    return Split(images, labels.to(device), encode_images(model, images).float())


def load_checkpoint(path: str | Path) -> nn.Module:
    """``load_pretrained(path)``, after reading the weight names of its safetensors file: a
    missing tower is named, with what needs it, before anything is built. A Hub repository's
    name reads its snapshot."""
    path = resolve(path, HUB_LAYOUTS, argument="path")
    weights, keys = weight_names(path) or (None, [])  # none: load_pretrained says what is wrong
    for tower, (prefixes, users) in TOWERS.items():
        if weights and not any(k.startswith(prefixes) for k in keys):
            raise ValueError(
                f"{weights} has no {tower} tower (no {'*, '.join(prefixes)}* weights), "
                f"which {users} need"
            )
    return load_pretrained(path)


class Task(FewShot):
    """A few-shot task on a frozen model, from which every method of METHODS trains."""

    @classmethod
    def build(
        cls, model: nn.Module, tokenizer: Tokenizer, train_set: Dataset, test_set: Dataset
    ) -> Task:
        """From datasets with ``.labels``, ``.classnames``, optionally ``.templates``, and items
        (uint8 image, caption)."""
        check_text_tower(model, "zero-shot")
        for name, ds in (("train_set", train_set), ("test_set", test_set)):
            if not all(hasattr(ds, a) for a in ("labels", "classnames", "__getitem__")):
                raise TypeError(f"{name} needs .labels, .classnames and (image, caption) items")
        classnames = check_classnames(train_set.classnames)
        if list(test_set.classnames) != classnames:
            raise ValueError("train_set and test_set list different classnames")
        missing = set(range(len(classnames))) - set(_check_labels(train_set.labels, classnames))
        if missing:
            raise ValueError(
                f"classnames lists {len(classnames)} classes but train_set has no example of "
                f"{[classnames[c] for c in sorted(missing)]}: the names do not match the labels"
            )
        templates = list(getattr(train_set, "templates", TEMPLATES))
        train, test = prepare(model, train_set, classnames), prepare(model, test_set, classnames)
        classifier = build_zero_shot_classifier(model, tokenizer, classnames, templates).float()
        return cls(model, tokenizer, classnames, templates, train, test, classifier)

    def zero_shot(self) -> float:
        """Zero-shot top-1 accuracy on the test split."""
        return top1(self.test.features @ self.classifier.T, self.test.labels)

    def run(self, method: str, k: int, *, seed: int = 0, **options) -> tuple[nn.Module, float]:
        """Train ``method`` on k examples per class: (the trained part, test top-1 accuracy).
        The part is a LinearProbe, ClipAdapter or PromptLearner, or for "lora" a copy of the
        model with LoRA. ``options`` go to the method's trainer."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
        ids = few_shot_indices(self.train.labels, k, seed=seed, classnames=self.classnames)
        ids = torch.tensor(ids, device=self.train.labels.device)
        shots = dataclasses.replace(self, train=self.train.rows(ids))
        part = METHODS[method].fit(shots, seed=seed, **options)
        return part, top1(METHODS[method].test_logits(shots, part), self.test.labels)


def compare(
    model: nn.Module,
    tokenizer: Tokenizer,
    train_set: Dataset,
    test_set: Dataset,
    *,
    shots: Sequence[int] = (1, 4, 16),
    methods: Sequence[str] = tuple(METHODS),
    seed: int = 0,
    options: Mapping[str, Mapping] | None = None,
) -> dict[str, dict[int, float]]:
    """Top-1 test accuracy of zero-shot and of each method at each k: ``{row: {k: accuracy}}``,
    rows "zero-shot" then ``methods``. ``options[method]`` go to its trainer (e.g. steps)."""
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(
            f"methods must be a non-empty subset of {tuple(METHODS)}, got {list(methods)}"
        )
    task = Task.build(model, tokenizer, train_set, test_set)
    for k in shots:  # the errors before any training
        few_shot_indices(task.train.labels, k, classnames=task.classnames)
    options, zero_shot = dict(options or {}), task.zero_shot()
    results = {"zero-shot": {k: zero_shot for k in shots}}
    for method in methods:
        results[method] = {
            k: task.run(method, k, seed=seed, **options.get(method, {}))[1] for k in shots
        }
    return results


def render_table(results: Mapping[str, Mapping[int, float]]) -> str:
    """``compare``'s results as a markdown table: a row per method, a column per k."""
    shots = sorted({k for row in results.values() for k in row})
    lines = ["| method | " + " | ".join(f"k = {k}" for k in shots) + " |"]
    lines.append("|---|" + "---:|" * len(shots))
    for name, row in results.items():
        cells = [f"{100 * row[k]:.1f}%" if k in row else "–" for k in shots]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
