"""Zero-shot classification and retrieval metrics for a CLIP.

A class becomes a text embedding by prompt ensembling: every template filled with the class name,
each prompt's normalized embedding, their mean, renormalized (the CLIP paper's recipe). An image is
classified by its best-scoring classes. Retrieval recall ranks texts for every image and images
for every text. Rankings go through ``topk_similarity``, so no N x C or N_i x N_t score matrix is
ever built. Features are expected L2-normalized (as ``encode_images`` and
``build_zero_shot_classifier`` give them): scores are plain dot products.

``Evaluation`` runs all of it on a data source's evaluation sets (``fastclip.data``): training,
``fastclip eval`` and fine-tuning evaluate through these functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fastclip.checks import check_classnames, check_int
from fastclip.data import evaluation_sets
from fastclip.similarity import check_pair, topk_similarity
from fastclip.transforms import preprocess

Template = str | Callable[[str], str]

TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a good photo of a {}.",
    "a bad photo of a {}.",
    "a blurry photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a low resolution photo of a {}.",
    "a drawing of a {}.",
    "a painting of a {}.",
    "a sketch of a {}.",
    "a rendering of a {}.",
    "art of the {}.",
    "a {} in a video game.",
)


def _check_ks(ks: object) -> tuple[int, ...]:
    if not isinstance(ks, Sequence) or len(ks) == 0:
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return tuple(check_int("every k in ks", k) for k in ks)


def _check_ids(name: str, ids: object, n: int | None = None) -> torch.Tensor:
    """A 1-D integer tensor (of length ``n`` if given) of non-negative ids."""
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        what = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be an integer torch.Tensor, got {what}")
    if ids.dim() != 1 or (n is not None and ids.shape[0] != n):
        expected = f"({n},)" if n is not None else "1-D"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty")
    if int(ids.min()) < 0:
        raise ValueError(f"{name} must be non-negative, got {int(ids.min())}")
    return ids


def _placement(model: torch.nn.Module, device) -> tuple[torch.device, torch.dtype]:
    """Where inputs go (``device``, else the model's) and the dtype images are cast to."""
    param = next(model.parameters())
    return torch.device(device) if device is not None else param.device, param.dtype


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode and no gradient for any of the model's parameters inside; every submodule's
    training flag and every parameter's ``requires_grad`` restored on exit."""
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


def build_zero_shot_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template] = TEMPLATES,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(C, E) unit-norm class embeddings: per class, the mean of the normalized text embeddings of
    every template filled with the class name, renormalized.

    A template is a str whose every ``{}`` becomes the class name, or a callable name -> prompt.
    Prompts are encoded ``batch_size`` at a time, in eval mode without gradients, on ``device``
    (default: the model's). The result has the dtype of the model's text embeddings.
    """
    classnames = check_classnames(classnames)
    if isinstance(templates, str) or not isinstance(templates, Sequence):
        raise TypeError(f"templates must be a sequence, got {type(templates).__name__}")
    if len(templates) == 0:
        raise ValueError("templates is empty")
    for i, t in enumerate(templates):
        if isinstance(t, str) and "{}" not in t:
            raise ValueError(f"templates[{i}] has no '{{}}' for the class name: {t!r}")
        if not isinstance(t, str) and not callable(t):
            raise TypeError(f"templates[{i}] must be a str or a callable, got {type(t).__name__}")
    batch_size = check_int("batch_size", batch_size)
    device, _ = _placement(model, device)

    prompts = []  # class-major: prompt p belongs to class p // len(templates)
    for name in classnames:
        for i, t in enumerate(templates):
            prompt = t.replace("{}", name) if isinstance(t, str) else t(name)
            if not isinstance(prompt, str):
                raise TypeError(f"templates[{i}]({name!r}) must return a str, got {prompt!r}")
            prompts.append(prompt)
    owner = torch.arange(len(classnames), device=device).repeat_interleave(len(templates))
    sums, dtype = None, None
    with frozen(model), torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start : start + batch_size]).to(device)
            features = model.encode_text(tokens, normalize=True)  # (b, E)
            if sums is None:
                dtype = features.dtype
                sums = torch.zeros(len(classnames), features.shape[1], device=device)
            sums.index_add_(0, owner[start : start + batch_size], features.float())
    return F.normalize(sums, dim=-1).to(dtype)  # (C, E); the 1/T of the mean cancels


def _image_batches(images: torch.Tensor | Iterable, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() == 0 or images.shape[0] == 0:
            raise ValueError(f"images is empty: shape {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    if not isinstance(images, Iterable):
        raise TypeError(f"images must be a tensor or an iterable of batches, got {images!r}")
    for i, batch in enumerate(images):
        if isinstance(batch, (tuple, list)) and batch:
            batch = batch[0]  # an (images, labels, ...) batch from a DataLoader
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"images batch {i} must be a tensor, got {type(batch).__name__}")
        yield batch


def encode_images(
    model: torch.nn.Module,
    images: torch.Tensor | Iterable,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(N, E) normalized image features, on ``device`` (default: the model's).

    ``images`` is an (N, 3, S, S) float tensor, encoded ``batch_size`` rows at a time, or an
    iterable of batches as they come: (b, 3, S, S) tensors, or tuples/lists whose first element is
    one (a DataLoader's ``(images, labels)``; the rest is ignored). Batches are cast to the
    model's dtype and encoded in eval mode without gradients.
    """
    batch_size = check_int("batch_size", batch_size)
    device, dtype = _placement(model, device)
    features = []
    with frozen(model), torch.no_grad():
        for i, batch in enumerate(_image_batches(images, batch_size)):
            if batch.dim() != 4 or not batch.is_floating_point():
                raise ValueError(
                    f"images batch {i} must be a (B, 3, S, S) float tensor, "
                    f"got shape {tuple(batch.shape)} {batch.dtype}"
                )
            features.append(model.encode_image(batch.to(device, dtype), normalize=True))
    if not features:
        raise ValueError("images gave no batches")
    return torch.cat(features)  # (N, E)


def zero_shot_classify(
    image_features: torch.Tensor, classifier: torch.Tensor, k: int = 1
) -> torch.Tensor:
    """(N, min(k, C)) indices of each image's best classes, best first, by image . class.

    image_features: (N, E); classifier: (C, E) from ``build_zero_shot_classifier``.
    """
    check_pair(image_features, classifier, ("image_features", "classifier"))
    k = min(check_int("k", k), classifier.shape[0])
    return topk_similarity(image_features, classifier, k)[1]  # (N, k)


def accuracy(
    predictions: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy ``{"top1": ..., "top5": ...}``: the fraction of rows whose label is among
    the first k predictions.

    predictions: (N, K) class indices, best first (or (N,) top-1 predictions); labels: (N,).
    A k larger than K is skipped (its key is absent): (N, K) predictions cannot tell it. If every
    k is skipped, a ValueError.
    """
    if not isinstance(predictions, torch.Tensor):
        raise TypeError(f"predictions must be a torch.Tensor, got {type(predictions).__name__}")
    if predictions.dtype.is_floating_point or predictions.dtype == torch.bool:
        raise TypeError(f"predictions must hold integer class indices, got {predictions.dtype}")
    predictions = predictions[:, None] if predictions.dim() == 1 else predictions
    if predictions.dim() != 2 or predictions.numel() == 0:
        raise ValueError(
            f"predictions must be a non-empty (N, K) or (N,) tensor, got {tuple(predictions.shape)}"
        )
    labels = _check_ids("labels", labels, predictions.shape[0]).to(predictions.device)
    ks = [k for k in _check_ks(ks) if k <= predictions.shape[1]]
    if not ks:
        raise ValueError(f"every k exceeds the {predictions.shape[1]} predictions per row")
    hits = (predictions == labels[:, None]).cumsum(1).bool()  # (N, K): label within the first j
    values = torch.stack([hits[:, k - 1].double().mean() for k in ks]).tolist()
    return {f"top{k}": v for k, v in zip(ks, values, strict=True)}


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k of image -> text and text -> image retrieval.

    image_features: (N_i, E); text_features: (N_t, E); ``text_to_image``: (N_t,) the image index of
    every caption (None: caption i belongs to image i, N_i == N_t). Every image needs a caption.
    An image is a hit at k if any of its captions is among its k best texts; a caption, if its
    image is among its k best images. k is clamped to the number of candidates. Keys:
    ``image_to_text_R@k`` then ``text_to_image_R@k``.
    """
    check_pair(image_features, text_features, ("image_features", "text_features"))
    n_i, n_t = image_features.shape[0], text_features.shape[0]
    ks = _check_ks(ks)
    if text_to_image is None:
        if n_i != n_t:
            raise ValueError(
                f"without text_to_image, image_features and text_features need as many rows, "
                f"got {n_i} and {n_t}"
            )
        text_to_image = torch.arange(n_t, device=image_features.device)
    text_to_image = _check_ids("text_to_image", text_to_image, n_t).to(image_features.device)
    if int(text_to_image.max()) >= n_i:
        raise ValueError(f"text_to_image holds {int(text_to_image.max())}, but N_i is {n_i}")
    uncaptioned = (torch.bincount(text_to_image, minlength=n_i) == 0).nonzero().flatten()
    if uncaptioned.numel():
        raise ValueError(f"images without a caption in text_to_image: {uncaptioned[:10].tolist()}")

    top_texts = topk_similarity(image_features, text_features, min(max(ks), n_t))[1]
    image_hits = text_to_image[top_texts] == torch.arange(n_i, device=top_texts.device)[:, None]
    top_images = topk_similarity(text_features, image_features, min(max(ks), n_i))[1]
    text_hits = top_images == text_to_image[:, None]
    recalls = {}
    for direction, hits in (("image_to_text", image_hits), ("text_to_image", text_hits)):
        found = hits.cumsum(1).bool()  # (n, K): a hit within the first j
        for k in ks:
            recalls[f"{direction}_R@{k}"] = found[:, min(k, found.shape[1]) - 1].double().mean()
    return dict(zip(recalls, torch.stack(list(recalls.values())).tolist(), strict=True))


def evaluate_zero_shot(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    images: torch.Tensor | Iterable,
    labels: torch.Tensor,
    classnames: Sequence[str],
    templates: Sequence[Template] = TEMPLATES,
    *,
    ks: Sequence[int] = (1, 5),
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Zero-shot top-k accuracy of ``model`` on ``images`` (see ``encode_images``) with (N,)
    ``labels`` in [0, C), in the order the images come. ks larger than C are skipped."""
    ks = _check_ks(ks)
    if int(_check_ids("labels", labels).max()) >= len(classnames):
        raise ValueError(
            f"labels hold {int(labels.max())}, but there are {len(classnames)} classes"
        )
    classifier = build_zero_shot_classifier(
        model, tokenizer, classnames, templates, batch_size=batch_size, device=device
    )
    features = encode_images(model, images, batch_size=batch_size, device=device)  # (N, E)
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} rows but images gave {features.shape[0]}")
    predictions = zero_shot_classify(features, classifier, k=max(ks))
    return accuracy(predictions, labels, ks)


def load_images(dataset: Dataset, image_size: int) -> torch.Tensor:
    """Every image of a dataset of (image, caption) items, preprocessed: (N, 3, S, S)."""
    return preprocess([dataset[i][0] for i in range(len(dataset))], image_size)


class Evaluation:
    """A data source's zero-shot tasks and retrieval set (``fastclip.data.evaluation_sets``),
    preprocessed once; called with a model, its zero-shot top-1/top-5 accuracy per task and its
    retrieval recall@1/5/10, by name. A source without evaluation sets gives no metrics."""

    def __init__(self, data: str, seed: int, image_size: int):
        sets = evaluation_sets(data, seed)
        self.tasks = {
            name: (
                load_images(ds, image_size),
                torch.tensor(ds.labels[: len(ds)]),
                ds.classnames,
                ds.templates,
            )
            for name, ds in sets.tasks.items()
        }
        self.retrieval = None
        if sets.retrieval is not None:
            images = load_images(sets.retrieval, image_size)
            self.retrieval = (images, list(sets.retrieval.captions))

    @torch.no_grad()
    def __call__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        device: torch.device,
    ) -> dict[str, float]:
        metrics = {}
        with frozen(model):
            for name, (images, labels, classnames, templates) in self.tasks.items():
                classifier = build_zero_shot_classifier(
                    model, tokenizer, classnames, templates, device=device
                )
                features = encode_images(model, images, device=device)
                top = zero_shot_classify(features, classifier, k=5)
                for k, v in accuracy(top.cpu(), labels, ks=(1, 5)).items():
                    metrics[f"{name}_{k}"] = v
            if self.retrieval is not None:
                metrics.update(self._retrieval(model, tokenizer, device))
        return metrics

    def _retrieval(self, model, tokenizer, device: torch.device) -> dict[str, float]:
        images, captions = self.retrieval
        image_features = encode_images(model, images, device=device)
        tokens = tokenizer(captions).to(device)
        text_features = torch.cat([model.encode_text(t) for t in tokens.split(256)])
        recall = retrieval_recall(image_features, text_features, ks=(1, 5, 10))
        return {f"retrieval_{k}": v for k, v in recall.items()}
