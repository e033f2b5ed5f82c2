"""open_clip's factory on fastclip's model: the same calls, model names and pretrained tags.

    # was: import open_clip; open_clip.create_model_and_transforms(...)
    model, train_transform, eval_transform = fastclip.create_model_and_transforms(
        "ViT-B-32", pretrained="laion2b_s34b_b79k"
    )
    tokenizer = fastclip.get_tokenizer("ViT-B-32")

Model names are fastclip's presets (open_clip's ``RN50``, ``ViT-B-32``, ``ViT-B-16``,
``ViT-L-14``, and ``tiny``), with open_clip's ``-quickgelu`` suffix, or ``hf-hub:org/name``.
``pretrained`` is a tag of ``PRETRAINED`` (a Hugging Face Hub repository holding the weights in a
layout ``load_pretrained`` reads, with how they were trained), or any source ``load_pretrained``
takes: a checkpoint directory, a weights file, a Hub repository.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fastclip.checkpoint.open_clip import OPEN_CLIP_CONFIG, open_clip_normalization
from fastclip.checkpoint.pretrained import HUB_LAYOUTS, load_pretrained
from fastclip.files import read_json
from fastclip.hub import HF_HUB_PREFIX, looks_like_path, repo_id, resolve
from fastclip.model import CLIP, PRESETS, CLIPConfig
from fastclip.tokenizer import Tokenizer
from fastclip.transforms import CLIP_MEAN, CLIP_STD, ImageTransform

QUICKGELU = "-quickgelu"  # open_clip's suffix for a model with QuickGELU activations
INCEPTION = (0.5, 0.5, 0.5)  # the normalization (mean and std) some of open_clip's models use
# The tokenizer every pretrained model here reads: OpenAI's BPE (open_clip's default tokenizer).
TOKENIZER_REPO = "openai/clip-vit-base-patch32"
# The towers' sizes: weights loaded for a model name must have its preset's (the vocabulary and
# context follow the tokenizer).
ARCHITECTURE = ("embed_dim", "image_size", "vision_layers", "vision_width", "patch_size",
                "text_width", "text_layers")  # fmt: skip


@dataclass(frozen=True)
class Weights:
    """Published weights: their Hub repository and how they were trained."""

    repo: str  # Hugging Face Hub repository (Hugging Face's CLIPModel or open_clip's layout)
    quick_gelu: bool = False  # trained with QuickGELU activations
    mean: tuple[float, float, float] = CLIP_MEAN  # the training images' normalization
    std: tuple[float, float, float] = CLIP_STD


def _timm(model: str, tag: str, quick_gelu: bool = False) -> Weights:
    """open_clip's weights as timm's organization republished them (open_clip's layout)."""
    return Weights(f"timm/{model}.{tag}", quick_gelu)


# open_clip's (model name, pretrained tag) -> where the weights are published, as open_clip's own
# table maps them; OpenAI's ViTs come from Hugging Face's CLIPModel repositories instead of
# timm's open_clip copies. The README lists them.
PRETRAINED = {
    "RN50": {tag: _timm("resnet50_clip", tag, True) for tag in ("openai", "yfcc15m", "cc12m")},
    "ViT-B-32": {
        "openai": Weights("openai/clip-vit-base-patch32", quick_gelu=True),
        "laion400m_e31": _timm("vit_base_patch32_clip_224", "laion400m_e31", True),
        "laion400m_e32": _timm("vit_base_patch32_clip_224", "laion400m_e32", True),
        "laion2b_e16": _timm("vit_base_patch32_clip_224", "laion2b_e16"),
        "laion2b_s34b_b79k": Weights("laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
        "datacomp_xl_s13b_b90k": Weights("laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"),
    },
    "ViT-B-16": {
        "openai": Weights("openai/clip-vit-base-patch16", quick_gelu=True),
        "laion400m_e31": _timm("vit_base_patch16_clip_224", "laion400m_e31"),
        "laion400m_e32": _timm("vit_base_patch16_clip_224", "laion400m_e32"),
        "laion2b_s34b_b88k": Weights("laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
        "datacomp_xl_s13b_b90k": Weights("laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K"),
    },
    "ViT-L-14": {
        "openai": Weights("openai/clip-vit-large-patch14", quick_gelu=True),
        "laion400m_e31": _timm("vit_large_patch14_clip_224", "laion400m_e31"),
        "laion400m_e32": _timm("vit_large_patch14_clip_224", "laion400m_e32"),
        "laion2b_s32b_b82k": Weights(
            "laion/CLIP-ViT-L-14-laion2B-s32B-b82K", mean=INCEPTION, std=INCEPTION
        ),
        "datacomp_xl_s13b_b90k": Weights("laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"),
    },
}


def list_pretrained() -> list[tuple[str, str]]:
    """Every (model name, pretrained tag) pair ``create_model_and_transforms`` knows."""
    return [(name, tag) for name, tags in PRETRAINED.items() for tag in tags]


def create_model(
    model_name: str,
    pretrained: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    force_quick_gelu: bool = False,
    revision: str | None = None,
    **overrides,
) -> CLIP:
    """The model ``model_name`` names: new (``pretrained=None``), or with the weights of a tag
    of ``PRETRAINED[model_name]`` or of a source ``load_pretrained`` reads (at ``revision``,
    for a Hub repository). ``overrides`` are CLIPConfig fields."""
    return _build(model_name, pretrained, force_quick_gelu, revision, overrides)[0].to(device)


def create_model_and_transforms(
    model_name: str,
    pretrained: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    force_quick_gelu: bool = False,
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
    revision: str | None = None,
    **overrides,
) -> tuple[CLIP, ImageTransform, ImageTransform]:
    """open_clip's ``create_model_and_transforms``: (model, training transform, evaluation
    transform). The training transform takes random resized crops (area 0.9-1), the evaluation
    transform resizes the shorter side and crops the center; both give (3, S, S) per image with
    S the model's image size, normalized as the weights were trained (``image_mean``,
    ``image_std`` override). Arguments otherwise as ``create_model``."""
    model, mean, std = _build(model_name, pretrained, force_quick_gelu, revision, overrides)
    mean, std = image_mean or mean, image_std or std
    size = model.config.image_size
    train = ImageTransform(size, train=True, mean=mean, std=std)
    return model.to(device), train, ImageTransform(size, mean=mean, std=std)


def get_tokenizer(model_name: str, *, revision: str | None = None) -> Tokenizer:
    """The tokenizer of a pretrained model: OpenAI's BPE (``TOKENIZER_REPO``, as open_clip's
    default) for the names of ``PRETRAINED``, a repository's own for ``hf-hub:org/name``. Either
    pads with 0, as open_clip's tokenizer does, whatever pad token the repository names."""
    if model_name.startswith(HF_HUB_PREFIX):
        return Tokenizer.from_pretrained(model_name, revision=revision, pad="openai")
    if model_name.removesuffix(QUICKGELU) not in PRETRAINED:
        raise ValueError(
            f"model_name must be one of {list(PRETRAINED)} (a {QUICKGELU} suffix allowed) or "
            f"hf-hub:org/name, got {model_name!r}; a new model's tokenizer is Tokenizer.train's"
        )
    return Tokenizer.from_pretrained(TOKENIZER_REPO, revision=revision, pad="openai")


def _build(
    model_name: str,
    pretrained: str | os.PathLike | None,
    force_quick_gelu: bool,
    revision: str | None,
    overrides: dict,
) -> tuple[CLIP, tuple[float, ...], tuple[float, ...]]:
    """(model, normalization mean, std) for ``create_model`` and its transforms."""
    if model_name.startswith(HF_HUB_PREFIX):
        if pretrained is not None:
            raise ValueError(f"pretrained must be None: {model_name!r} names the weights")
        return _load(model_name, None, force_quick_gelu, revision, overrides)
    name = model_name.removesuffix(QUICKGELU)
    if name not in PRESETS:
        raise ValueError(
            f"model_name must be one of {list(PRESETS)} (a {QUICKGELU} suffix allowed) or "
            f"hf-hub:org/name, got {model_name!r}"
        )
    force_quick_gelu = force_quick_gelu or model_name.endswith(QUICKGELU)
    if pretrained is None:
        model = CLIP(name, **{**_activation(None, force_quick_gelu), **overrides})
        return model, CLIP_MEAN, CLIP_STD
    return _load(_weights(name, pretrained), name, force_quick_gelu, revision, overrides)


def _weights(name: str, pretrained: str | os.PathLike) -> Weights | str | os.PathLike:
    """A tag's Weights, or ``pretrained`` itself where it names a source of weights."""
    tags = PRETRAINED.get(name, {})
    if pretrained in tags:
        return tags[pretrained]
    if repo_id(pretrained) is None and not looks_like_path(pretrained):
        raise ValueError(
            f"pretrained must be a tag of {name} ({', '.join(tags) or 'none'}), a checkpoint path "
            f"or a Hub repository, got {pretrained!r}"
        )
    return pretrained


def _load(
    source: Weights | str | os.PathLike,
    name: str | None,
    force_quick_gelu: bool,
    revision: str | None,
    overrides: dict,
) -> tuple[CLIP, tuple[float, ...], tuple[float, ...]]:
    """Pretrained weights as a model of preset ``name``'s architecture (any for None), and the
    normalization they were trained with: the tag's, the checkpoint's open_clip config's, or
    CLIP's."""
    weights = source if isinstance(source, Weights) else None
    argument = "model_name" if name is None else "pretrained"
    path = resolve(weights.repo if weights else source, HUB_LAYOUTS, revision, argument=argument)
    model = load_pretrained(path, **{**_activation(weights, force_quick_gelu), **overrides})
    if name is not None:
        _check_architecture(model.config, name, source)
    if weights is not None:
        return model, weights.mean, weights.std
    if (path / OPEN_CLIP_CONFIG).is_file():
        return model, *open_clip_normalization(read_json(path / OPEN_CLIP_CONFIG))
    return model, CLIP_MEAN, CLIP_STD


def _activation(weights: Weights | None, force_quick_gelu: bool) -> dict[str, str]:
    """The activation to load with: QuickGELU if forced, a tag's, else the checkpoint's own."""
    if force_quick_gelu or (weights is not None and weights.quick_gelu):
        return {"activation": "quick_gelu"}
    return {} if weights is None else {"activation": "gelu"}


def _check_architecture(config: CLIPConfig, name: str, source: object) -> None:
    """ValueError unless the loaded ``config`` is preset ``name``'s architecture."""
    preset = PRESETS[name]
    differ = [
        f"{field} {getattr(config, field)} (not {getattr(preset, field)})"
        for field in ARCHITECTURE
        if getattr(config, field) != getattr(preset, field)
    ]
    if differ:
        raise ValueError(f"the weights of {source} are not a {name}: {', '.join(differ)}")
