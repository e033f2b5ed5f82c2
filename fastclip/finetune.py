"""Few-shot adaptation of a pretrained CLIP to image classification: k labelled images per class.

    zero-shot  class embeddings from prompt templates; nothing trained (the baseline)
    probe      multinomial logistic regression on frozen image features (L-BFGS, L2 penalty)
    adapter    CLIP-Adapter: f' = ratio · mlp(f) + (1 - ratio) · f on frozen features, cosine
               against the zero-shot class embeddings (Gao et al. 2021)
    prompt     CoOp: n_ctx learned context vectors before every class name, through the frozen
               text tower (Zhou et al. 2022)
    lora       low-rank adapters on the image tower's linear layers (``fastclip.lora``)
    full, LiT  the training script from the checkpoint: ``fastclip train --init CHECKPOINT``,
               with ``--lock-image`` to train the text side only

    model, tok = load_checkpoint(ckpt), Tokenizer.from_pretrained(ckpt)
    results = compare(model, tok, DigitsDataset("train"), DigitsDataset("test"), shots=(1, 4, 16))
    print(render_table(results))

Probe, adapter and prompt leave the CLIP bit for bit as it was: image features are computed once,
and every method trains full batch on the C · k few-shot examples. Each trained part saves on its
own: ``save_adapter``/``load_adapter`` (safetensors); ``fastclip.lora.save_lora`` for LoRA.
``fastclip finetune`` is the command line (``main``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import operator
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from fastclip import data
from fastclip.checkpoint import WEIGHT_FILES, load_pretrained, mismatches, write_weights
from fastclip.lora import apply_lora, lora_parameters, save_lora
from fastclip.tokenizer import Tokenizer
from fastclip.train import TrainConfig, latest_checkpoint, train
from fastclip.transforms import preprocess
from fastclip.zeroshot import TEMPLATES, accuracy, build_zero_shot_classifier, encode_images

METHODS = ("probe", "adapter", "prompt", "lora")
TOWERS = {  # weight-name prefixes (fastclip, Hugging Face, OpenAI layouts), what needs the tower
    "image": (("visual.", "vision_model."), "every method"),
    "text": (("text.", "text_model.", "transformer.", "token_embedding."), "zero-shot, adapter, "
             "prompt and lora"),
}  # fmt: skip
PLACEHOLDER = "X"  # the word whose token embeddings the learned context replaces


# ---------------------------------------------------------------------------------------------
# Inputs


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
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
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
    if classnames is not None and max(labels) >= len(_check_classnames(classnames)):
        raise ValueError(
            f"labels hold class {max(labels)}, but classnames lists {len(classnames)} classes "
            f"({list(classnames)[:4]}...): the names do not match the labels"
        )
    return labels


def _check_classnames(classnames) -> list[str]:
    if isinstance(classnames, str) or not all(isinstance(n, str) for n in classnames):
        raise TypeError(f"classnames must be a sequence of str, got {classnames!r}")
    if not classnames or len(set(classnames)) != len(classnames):
        raise ValueError(f"classnames must be distinct and non-empty, got {list(classnames)}")
    return list(classnames)


def _check_text_tower(model: nn.Module, user: str) -> None:
    if getattr(model, "text", None) is None or not hasattr(model, "encode_text"):
        raise ValueError(f"{user} needs the model's text tower (model.text), which it lacks")


@dataclass
class Split:
    """A classification split, ready for every method."""

    images: torch.Tensor  # (N, 3, S, S) preprocessed
    labels: torch.Tensor  # (N,) class ids
    features: torch.Tensor  # (N, E) normalized image features of the frozen model


def prepare(model: nn.Module, dataset, classnames: Sequence[str]) -> Split:
    """Preprocess every image of ``dataset`` (items (uint8 image, caption), ``.labels``) and
    encode it once with the frozen image tower, on the model's device."""
    labels = torch.tensor(_check_labels(dataset.labels, classnames))
    device = next(model.parameters()).device
    images = preprocess([dataset[i][0] for i in range(len(dataset))], model.config.image_size)
    images = images.to(device)  # (N, 3, S, S)
    return Split(images, labels.to(device), encode_images(model, images).float())


def load_checkpoint(path: str | Path) -> nn.Module:
    """``load_pretrained(path)``, after reading the weight names of its safetensors file: a
    missing tower is named, with what needs it, before anything is built."""
    path = Path(path)
    files = [path / name for name in WEIGHT_FILES] if path.is_dir() else [path]
    weights = next((f for f in files if f.suffix == ".safetensors" and f.is_file()), None)
    try:
        with safe_open(weights, framework="pt") as f:
            keys = list(f.keys())
    except (TypeError, SafetensorError, OSError):  # none, or unreadable: load_pretrained says
        return load_pretrained(path)
    for tower, (prefixes, users) in TOWERS.items():
        if not any(k.startswith(prefixes) for k in keys):
            raise ValueError(
                f"{weights} has no {tower} tower (no {'*, '.join(prefixes)}* weights), "
                f"which {users} need"
            )
    return load_pretrained(path)


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Eval mode and no gradient for any of the model's parameters; both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _optimize(params, loss_fn, *, steps: int, lr: float, weight_decay: float = 0.0) -> None:
    """Full-batch AdamW for ``steps`` steps on a cosine schedule."""
    optimizer = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
        schedule.step()


# ---------------------------------------------------------------------------------------------
# Linear probe


class LinearProbe(nn.Linear):
    """Logistic regression on frozen image features: (N, E) -> (N, C) logits."""


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    weight_decay: float = 1e-3,
    max_iter: int = 100,
) -> LinearProbe:
    """Multinomial logistic regression on (N, E) ``features`` and (N,) ``labels`` in [0, C),
    C = ``num_classes`` or max(labels) + 1: full-batch L-BFGS from zero on the mean cross-entropy
    + weight_decay / 2 · ||W||² (the bias is not penalized)."""
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"features must be (N, E) and labels (N,), got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if weight_decay < 0 or max_iter < 1:
        raise ValueError(f"need weight_decay >= 0, max_iter >= 1; got {weight_decay}, {max_iter}")
    x, y = features.detach().float(), labels.long()
    probe = LinearProbe(x.shape[1], num_classes or int(y.max()) + 1, device=x.device)
    nn.init.zeros_(probe.weight), nn.init.zeros_(probe.bias)
    lbfgs = torch.optim.LBFGS(
        probe.parameters(), max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        lbfgs.zero_grad()
        loss = F.cross_entropy(probe(x), y) + weight_decay / 2 * probe.weight.square().sum()
        loss.backward()
        return loss

    lbfgs.step(closure)
    return probe.eval()


# ---------------------------------------------------------------------------------------------
# CLIP-Adapter


def _bottleneck(width: int, reduction: int) -> nn.Sequential:
    """width -> width // reduction -> width, ReLU between; the output layer starts at zero."""
    mlp = nn.Sequential(
        nn.Linear(width, width // reduction), nn.ReLU(), nn.Linear(width // reduction, width)
    )
    nn.init.zeros_(mlp[2].weight), nn.init.zeros_(mlp[2].bias)
    return mlp


class ClipAdapter(nn.Module):
    """CLIP-Adapter on frozen features, classified by cosine against class embeddings:

        f' = ratio · mlp(f) + (1 - ratio) · f        mlp: E -> E // reduction -> E, ReLU
        logits = logit_scale · normalize(f') @ normalize(t')ᵀ       (N, C)

    t' is the (C, E) ``class_embeddings`` (the zero-shot classifier), adapted the same way by a
    second MLP if ``adapt_text``. The MLPs' output layers start at zero, so a fresh adapter
    classifies as zero-shot does. ``logit_scale`` is the model's, exponentiated. Its state dict
    holds the class embeddings, scale and ratio too: a saved adapter is a whole classifier.
    """

    def __init__(
        self,
        class_embeddings: torch.Tensor,
        logit_scale: float | torch.Tensor,
        *,
        ratio: float = 0.2,
        reduction: int = 4,
        adapt_text: bool = False,
    ):
        super().__init__()
        if class_embeddings.dim() != 2 or not 0 <= ratio <= 1:
            raise ValueError(
                f"class_embeddings must be (C, E) and ratio in [0, 1], got "
                f"{tuple(class_embeddings.shape)} and {ratio}"
            )
        width, like = class_embeddings.shape[1], dict(device=class_embeddings.device)
        if not isinstance(reduction, int) or not 1 <= reduction <= width:
            raise ValueError(f"reduction must be an int in [1, {width}], got {reduction!r}")
        self.register_buffer("class_embeddings", class_embeddings.detach().float().clone())
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale), **like))
        self.register_buffer("ratio", torch.tensor(float(ratio), **like))
        self.image = _bottleneck(width, reduction).to(**like)
        self.text = _bottleneck(width, reduction).to(**like) if adapt_text else None

    def _blend(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.ratio * mlp(x) + (1 - self.ratio) * x, dim=-1)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, E) image features -> (N, C) logits."""
        classes = self.class_embeddings
        if self.text is not None:
            classes = self._blend(self.text, classes)  # (C, E)
        return self.logit_scale * self._blend(self.image, image_features.float()) @ classes.T


def train_adapter(
    features: torch.Tensor,
    labels: torch.Tensor,
    class_embeddings: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    ratio: float = 0.2,
    adapt_text: bool = False,
    steps: int = 200,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
) -> ClipAdapter:
    """A ClipAdapter trained with cross-entropy on (N, E) few-shot ``features``, (N,) labels."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = ClipAdapter(class_embeddings, logit_scale, ratio=ratio, adapt_text=adapt_text)
    x, y = features.detach().float(), labels.long()
    loss = lambda: F.cross_entropy(adapter(x), y)  # noqa: E731
    _optimize(adapter.parameters(), loss, steps=steps, lr=lr, weight_decay=weight_decay)
    return adapter.eval()


# ---------------------------------------------------------------------------------------------
# Prompt tuning (CoOp)


class PromptLearner(nn.Module):
    """CoOp's learned prompt: ``n_ctx`` context vectors (text_width each), shared by the classes,
    between sot and every class name.

        tokens (C, T): "X X X X {classname}." -> [sot, X × n_ctx, name..., ".", eot, pad...]
        embeddings (C, T, W): the token embeddings, positions 1..n_ctx swapped for ``ctx``
        forward(model) -> model.encode_text(tokens, embeddings=...): (C, E) unit class embeddings

    ``ctx`` (n_ctx, W) starts as the token embeddings of ``init`` if it has n_ctx tokens, else
    as N(0, 0.02) drawn from ``seed``. The model is an argument, not a submodule: the state dict
    is ``ctx`` and ``tokens``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        classnames: Sequence[str],
        *,
        n_ctx: int = 4,
        init: str = "a photo of a",
        seed: int = 0,
    ):
        super().__init__()
        _check_text_tower(model, "PromptLearner")
        classnames = _check_classnames(classnames)
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        if len(tokenizer.encode(PLACEHOLDER)) != 1:
            raise ValueError(f"the tokenizer splits the placeholder {PLACEHOLDER!r} in pieces")
        context = model.config.context_length
        prompts = [" ".join([PLACEHOLDER] * n_ctx + [name]) + "." for name in classnames]
        for name, prompt in zip(classnames, prompts, strict=True):
            if len(tokenizer.encode(prompt)) + 2 > context:
                raise ValueError(
                    f"the prompt of class {name!r} ({n_ctx} context tokens, the name, '.') does "
                    f"not fit the text context of {context} tokens"
                )
        embedding = model.text.token_embedding.weight  # (vocab, W)
        ids = tokenizer.encode(init) if init else []
        if len(ids) == n_ctx:
            ctx = embedding[ids].detach().float().clone()
        else:
            rng = torch.Generator().manual_seed(seed)
            ctx = 0.02 * torch.randn(n_ctx, embedding.shape[1], generator=rng)
        self.ctx = nn.Parameter(ctx.to(embedding.device))  # (n_ctx, W)
        tokens = tokenizer(prompts, context_length=context).to(embedding.device)  # (C, T)
        self.register_buffer("tokens", tokens)

    def forward(self, model: nn.Module) -> torch.Tensor:
        """(C, E) normalized class embeddings of the learned prompts, through ``model``."""
        C, n = self.tokens.shape[0], self.ctx.shape[0]
        embeddings = model.text.token_embedding(self.tokens)  # (C, T, W)
        ctx = self.ctx.to(embeddings.dtype).expand(C, -1, -1)  # (C, n_ctx, W)
        embeddings = torch.cat([embeddings[:, :1], ctx, embeddings[:, 1 + n :]], dim=1)
        return model.encode_text(self.tokens, embeddings=embeddings)


def train_prompts(
    model: nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_ctx: int = 4,
    init: str = "a photo of a",
    steps: int = 100,
    lr: float = 1e-2,
    seed: int = 0,
) -> PromptLearner:
    """A PromptLearner trained with cross-entropy on logit_scale · features @ class_embeddingsᵀ,
    (N, E) few-shot ``features``, (N,) labels; the model stays frozen."""
    learner = PromptLearner(model, tokenizer, classnames, n_ctx=n_ctx, init=init, seed=seed)
    x, y = features.detach().float(), labels.long()
    with _frozen(model):
        scale = model.logit_scale.exp().float()
        loss = lambda: F.cross_entropy(scale * x @ learner(model).float().T, y)  # noqa: E731
        _optimize(learner.parameters(), loss, steps=steps, lr=lr)
    return learner.eval()


# ---------------------------------------------------------------------------------------------
# LoRA


def _class_embeddings(model: nn.Module, tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C · P, T) class-major prompt tokens -> (C, E) unit class embeddings, with gradients (as
    build_zero_shot_classifier: the mean of each class's normalized prompts, renormalized)."""
    features = model.encode_text(tokens).float()  # (C · P, E)
    return F.normalize(features.view(num_classes, -1, features.shape[1]).mean(1), dim=-1)


def train_lora(
    model: nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    templates: Sequence[str] = TEMPLATES,
    towers: Sequence[str] = ("visual",),
    rank: int = 4,
    alpha: float = 8.0,
    steps: int = 40,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[str]:
    """Add LoRA to ``model``'s ``towers`` **in place** (copy the model to keep the original) and
    train it with cross-entropy on (N, 3, S, S) preprocessed few-shot ``images``, (N,) labels,
    against the templates' class embeddings (recomputed each step if the text tower has LoRA).
    Returns the adapted layers' names."""
    _check_text_tower(model, "LoRA's classifier")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        names = apply_lora(model, rank=rank, alpha=alpha, towers=tuple(towers))
    model.eval()  # batch norms keep their statistics; the adapters have no dropout here
    prompts = [t.replace("{}", name) for name in classnames for t in templates]
    tokens = tokenizer(prompts, context_length=model.config.context_length).to(images.device)
    with torch.no_grad():
        fixed = _class_embeddings(model, tokens, len(classnames))  # (C, E)
    scale, y = model.logit_scale.exp().detach().float(), labels.long()

    def loss():
        classes = _class_embeddings(model, tokens, len(classnames)) if "text" in towers else fixed
        return F.cross_entropy(scale * model.encode_image(images).float() @ classes.T, y)

    _optimize(lora_parameters(model), loss, steps=steps, lr=lr)
    return names


# ---------------------------------------------------------------------------------------------
# Saving trained parts


def save_adapter(module: nn.Module, path: str | Path) -> None:
    """Write every tensor of ``module``'s state dict (a LinearProbe, ClipAdapter, PromptLearner)
    to a safetensors file, atomically, with the module's class name in the metadata."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_weights(path, module.state_dict(), {"module": type(module).__name__})


def load_adapter(module: nn.Module, path: str | Path) -> nn.Module:
    """Load ``save_adapter``'s file into ``module``, built as the saved one was (same class and
    shapes), exactly. Returns the module, in eval mode."""
    path, kind = Path(path), type(module).__name__
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            saved, state = (
                (f.metadata() or {}).get("module"),
                {k: f.get_tensor(k) for k in f.keys()},
            )
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if saved != kind:
        raise ValueError(f"{path} holds a {saved or 'file not from save_adapter'}, not a {kind}")
    problems = mismatches(module.state_dict(), state)
    if problems:
        raise ValueError(f"{path} does not fit the {kind}: {problems}")
    module.load_state_dict(state)
    return module.eval()


# ---------------------------------------------------------------------------------------------
# One method, and the comparison


@dataclass
class Task:
    """A few-shot task on a frozen model: both splits encoded once, the zero-shot classifier."""

    model: nn.Module
    tokenizer: Tokenizer
    classnames: list[str]
    templates: list[str]
    train: Split
    test: Split
    classifier: torch.Tensor  # (C, E) zero-shot class embeddings

    @classmethod
    def build(cls, model: nn.Module, tokenizer: Tokenizer, train_set, test_set) -> Task:
        """From datasets with ``.labels``, ``.classnames``, optionally ``.templates``, and items
        (uint8 image, caption)."""
        _check_text_tower(model, "zero-shot")
        for name, ds in (("train_set", train_set), ("test_set", test_set)):
            if not all(hasattr(ds, a) for a in ("labels", "classnames", "__getitem__")):
                raise TypeError(f"{name} needs .labels, .classnames and (image, caption) items")
        classnames = _check_classnames(train_set.classnames)
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
        return _top1(self.test.features @ self.classifier.T, self.test.labels)

    def run(self, method: str, k: int, *, seed: int = 0, **options) -> tuple[nn.Module, float]:
        """Train ``method`` on k examples per class: (the trained part, test top-1 accuracy).
        The part is a LinearProbe, ClipAdapter or PromptLearner, or for "lora" a copy of the
        model with LoRA. ``options`` go to the method's trainer."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        ids = few_shot_indices(self.train.labels, k, seed=seed, classnames=self.classnames)
        ids = torch.tensor(ids, device=self.train.labels.device)
        x, y, test = self.train.features[ids], self.train.labels[ids], self.test
        if method == "probe":
            part = fit_linear_probe(x, y, num_classes=len(self.classnames), **options)
            return part, _top1(part(test.features), test.labels)
        if method == "adapter":
            scale = self.model.logit_scale.exp().detach()
            part = train_adapter(x, y, self.classifier, scale, seed=seed, **options)
            return part, _top1(part(test.features), test.labels)
        if method == "prompt":
            part = train_prompts(self.model, self.tokenizer, self.classnames, x, y, seed=seed,
                                 **options)  # fmt: skip
            with torch.no_grad():
                return part, _top1(test.features @ part(self.model).float().T, test.labels)
        part = copy.deepcopy(self.model)
        train_lora(part, self.tokenizer, self.classnames, self.train.images[ids], y,
                   templates=self.templates, seed=seed, **options)  # fmt: skip
        classes = build_zero_shot_classifier(part, self.tokenizer, self.classnames, self.templates)
        features = encode_images(part, test.images)
        return part, _top1(features.float() @ classes.float().T, test.labels)


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return accuracy(logits.argmax(dim=1).cpu(), labels.cpu(), ks=(1,))["top1"]


def compare(
    model: nn.Module,
    tokenizer: Tokenizer,
    train_set,
    test_set,
    *,
    shots: Sequence[int] = (1, 4, 16),
    methods: Sequence[str] = METHODS,
    seed: int = 0,
    options: Mapping[str, Mapping] | None = None,
) -> dict[str, dict[int, float]]:
    """Top-1 test accuracy of zero-shot and of each method at each k: ``{row: {k: accuracy}}``,
    rows "zero-shot" then ``methods``. ``options[method]`` go to its trainer (e.g. steps)."""
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
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


# ---------------------------------------------------------------------------------------------
# Command line


def _datasets(name: str, seed: int):
    """(train, test) classification splits of a named dataset."""
    if name == "digits":
        return data.DigitsDataset("train", seed=seed), data.DigitsDataset("test", seed=seed)
    if name == "shapes":  # the few shots from another stream of the zero-shot split
        return data.ShapesDataset("zeroshot", seed=seed + 1), data.ShapesDataset(
            "zeroshot", seed=seed
        )
    raise ValueError(f"data must be digits or shapes, got {name!r}")


def main(argv: list[str] | None = None) -> dict:
    """fastclip finetune: train one method on k shots per class, or --compare them all."""
    parser = argparse.ArgumentParser(prog="fastclip finetune", description=main.__doc__)
    parser.add_argument("--checkpoint", help="a pretrained CLIP (default: train a tiny one)")
    parser.add_argument("--data", default="digits", help="digits | shapes (default: digits)")
    parser.add_argument("--method", default="probe", choices=METHODS, help="(default: probe)")
    parser.add_argument("--compare", action="store_true", help="every method: a table over k")
    parser.add_argument("--shots", type=int, nargs="+", help="k (16; --compare: 1 4 16)")
    parser.add_argument("--out", help="for the trained part, the table, a pretraining run")
    parser.add_argument("--pretrain-steps", type=int, default=150, help="without --checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="the few-shot draw, initialization")
    parser.add_argument("--data-seed", type=int, default=0, help="the pretraining run's --seed")
    args = parser.parse_args(argv)
    shots = args.shots or ([1, 4, 16] if args.compare else [16])
    if not args.compare and len(shots) != 1:
        parser.error("--shots takes one k without --compare")
    out = Path(args.out) if args.out else None
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or _pretrain(args, (out or Path(scratch)) / "pretrained")
        model, tokenizer = load_checkpoint(checkpoint), Tokenizer.from_pretrained(checkpoint)
    train_set, test_set = _datasets(args.data, args.data_seed)
    tic = time.perf_counter()
    if args.compare:
        results = compare(model, tokenizer, train_set, test_set, shots=shots, seed=args.seed)
        table = render_table(results)
        print(
            f"{table}\n\n{args.data}: top-1 on the test split ({time.perf_counter() - tic:.0f} s)"
        )
        if out:
            out.mkdir(parents=True, exist_ok=True)
            (out / "compare.md").write_text(table + "\n")
        return results
    task = Task.build(model, tokenizer, train_set, test_set)
    part, top1 = task.run(args.method, shots[0], seed=args.seed)
    results = {"zero-shot": task.zero_shot(), args.method: top1}
    print(f"{'zero-shot':<10} {results['zero-shot']:6.1%}")
    print(f"{args.method:<10} {top1:6.1%}  (k = {shots[0]}, {time.perf_counter() - tic:.0f} s)")
    if out:
        path = out / f"{args.method}.safetensors"
        if args.method == "lora":
            out.mkdir(parents=True, exist_ok=True)
            save_lora(part, path)
        else:
            save_adapter(part, path)
        print(f"saved {path}")
    return results


def _pretrain(args, out: Path) -> Path:
    """Train a tiny CLIP on ``args.data`` briefly; its final checkpoint."""
    train(TrainConfig(data=args.data, steps=args.pretrain_steps, out=str(out), eval_every=0,
                      save_every=0, seed=args.data_seed))  # fmt: skip
    return latest_checkpoint(out)
