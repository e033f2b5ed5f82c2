"""open_clip's Hub layout: ``open_clip_config.json`` beside ``open_clip_model.safetensors``.

The weights are in OpenAI's layout (``openai.py`` converts them, inferring sizes from shapes);
the config adds what shapes cannot tell, the activation and head widths, and the image
normalization the model was trained with:

    {"model_cfg": {"embed_dim": 512, "quick_gelu": true,
                   "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512,
                                "heads": 8, "layers": 12}},
     "preprocess_cfg": {"mean": [...], "std": [...]}}

``export_open_clip`` writes the layout, as open_clip's ``push_to_hf_hub`` does: a repository
holding the directory loads with ``open_clip.create_model_and_transforms("hf-hub:org/name")``,
and the directory with ``load_pretrained``. Its ``model_cfg`` is written as open_clip's own
``model_configs/*.json`` are, its defaults left out (``quick_gelu`` when set, ``head_width``
when not 64).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from fastclip.checkpoint.openai import to_openai_state_dict
from fastclip.files import SavesPretrained, write_json, write_weights
from fastclip.model import CLIP, CLIPConfig
from fastclip.transforms import CLIP_MEAN, CLIP_STD

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HEAD_WIDTH = 64  # open_clip's default width of an attention head
MLP_RATIO = 4.0  # open_clip's default hidden width of an MLP over its residual width
LAYER_NORM_EPS = 1e-5  # open_clip's LayerNorm (torch's default)
# Tower options that change what the towers compute without changing their weights' shapes, with
# the values fastclip's towers match (the first is open_clip's default). Other differences show
# as missing or mis-shaped weights when the weights load.
SUPPORTED = {
    "vision_cfg": dict(
        pool_type=("tok",),
        attentional_pool=(False,),
        final_ln_after_pool=(False,),
        no_ln_pre=(False,),
        pos_embed_type=("learnable",),
        timm_model_name=(None,),
    ),
    "text_cfg": dict(
        pool_type=("argmax", "eos"),  # the first eot, which is also the highest id
        final_ln_after_pool=(False,),
        no_causal_mask=(False,),
        embed_cls=(False,),
        hf_model_name=(None,),
    ),
}
PREPROCESSING = dict(interpolation=("bicubic",), resize_mode=("shortest",))  # fastclip's resize


def open_clip_fields(config_json: Mapping) -> dict:
    """The CLIPConfig fields an ``open_clip_config.json`` gives beyond the weights' shapes:
    ``activation`` (QuickGELU only where ``quick_gelu`` is set), the heads, and the special ids
    (sot and eot last, as in CLIP's vocabulary). ValueError for towers fastclip does not have."""
    model = config_json.get("model_cfg")
    if not isinstance(model, Mapping):
        raise ValueError(f"{OPEN_CLIP_CONFIG} must hold a model_cfg object")
    towers = {name: model.get(name, {}) for name in SUPPORTED}
    for name, tower in towers.items():
        _check(f"model_cfg.{name}", tower, SUPPORTED[name])
    vision, text = towers["vision_cfg"], towers["text_cfg"]
    fields = dict(activation="quick_gelu" if model.get("quick_gelu") else "gelu")
    if "heads" in text:
        fields["text_heads"] = text["heads"]
    if "vocab_size" in text:  # open_clip reads the text at its highest id: CLIP's vocabulary ends
        fields.update(sot_token_id=text["vocab_size"] - 2, eot_token_id=text["vocab_size"] - 1)
    if "pad_id" in text:
        fields["pad_token_id"] = text["pad_id"]
    if "head_width" in vision and "width" in vision:
        resnet = not isinstance(vision.get("layers", 12), int)  # a ResNet's width is its stem's
        fields["vision_heads"] = vision["width"] * (32 if resnet else 1) // vision["head_width"]
    return fields


def export_open_clip(
    model: CLIP,
    directory: str | os.PathLike,
    tokenizer: SavesPretrained | None = None,
    *,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> Path:
    """Write open_clip's Hub layout into ``directory``: ``open_clip_model.safetensors`` (OpenAI's
    names), ``open_clip_config.json`` (``open_clip_config``, with the images' normalization
    ``mean`` and ``std``) and, if given, the tokenizer's files; each file atomically. Pushed to
    a Hub repository, ``open_clip.create_model_and_transforms("hf-hub:org/name")`` loads it;
    ``load_pretrained(directory)`` reads it back. open_clip tokenizes such a repository's text
    with its own BPE (OpenAI's vocabulary), not with the tokenizer's files."""
    config = open_clip_config(model.config, mean, std)  # first: it refuses what open_clip lacks
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_weights(directory / OPEN_CLIP_WEIGHTS[0], to_openai_state_dict(model))
    write_json(directory / OPEN_CLIP_CONFIG, config)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def open_clip_config(
    config: CLIPConfig,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> dict:
    """The ``open_clip_config.json`` of a model of ``config``, open_clip's defaults left out.
    ValueError for what open_clip's CLIP cannot build."""
    resnet = config.resnet
    last_two = (config.vocab_size - 2, config.vocab_size - 1)
    refused = {
        f"layer_norm_eps {config.layer_norm_eps} (open_clip's is 1e-5)": (
            config.layer_norm_eps != LAYER_NORM_EPS
        ),
        "a ViT's projection bias": config.proj_bias and not resnet,
        "a ResNet without its attention pool's projection bias": resnet and not config.proj_bias,
        f"sot and eot ids {config.sot_token_id}, {config.eot_token_id} (open_clip reads the text "
        f"at its highest id: they must be the vocabulary's last two, {last_two})": (
            (config.sot_token_id, config.eot_token_id) != last_two
        ),
    }
    if any(refused.values()):
        reasons = "; ".join(reason for reason, refuse in refused.items() if refuse)
        raise ValueError(f"open_clip's layout cannot hold {reasons}")
    vision_width = config.vision_width * (32 if resnet else 1)  # a ResNet's heads see 32x its stem
    vision = dict(
        image_size=config.image_size,
        layers=list(config.vision_layers) if resnet else config.vision_layers,
        width=config.vision_width,
        patch_size=None if resnet else config.patch_size,
    )
    text = dict(
        context_length=config.context_length,
        vocab_size=config.vocab_size,
        width=config.text_width,
        heads=config.text_heads,
        layers=config.text_layers,
    )
    if vision_width // config.vision_heads != HEAD_WIDTH:
        vision["head_width"] = vision_width // config.vision_heads
    if config.mlp_ratio != MLP_RATIO:
        text["mlp_ratio"] = config.mlp_ratio
        if not resnet:
            vision["mlp_ratio"] = config.mlp_ratio
    if config.pad_token_id != 0:
        text["pad_id"] = config.pad_token_id
    model_cfg = dict(embed_dim=config.embed_dim)
    if config.activation == "quick_gelu":
        model_cfg["quick_gelu"] = True
    model_cfg.update(vision_cfg=vision, text_cfg=text)
    if config.logit_bias_init is not None:
        model_cfg["init_logit_bias"] = config.logit_bias_init
    preprocess = dict(mean=list(mean), std=list(std), **{k: v[0] for k, v in PREPROCESSING.items()})
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def open_clip_normalization(config_json: Mapping) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the images the model was trained on, from ``preprocess_cfg`` (CLIP's
    when absent). ValueError for a resize fastclip's transforms do not do."""
    preprocess = config_json.get("preprocess_cfg", {})
    _check("preprocess_cfg", preprocess, PREPROCESSING)
    return tuple(preprocess.get("mean", CLIP_MEAN)), tuple(preprocess.get("std", CLIP_STD))


def _check(where: str, options: Mapping, supported: Mapping[str, tuple]) -> None:
    """ValueError naming every option of ``options`` set to a value ``supported`` lacks."""
    unsupported = [
        f"{key}={options[key]!r}"
        for key, values in supported.items()
        if key in options and options[key] not in values
    ]
    if unsupported:
        raise ValueError(f"{OPEN_CLIP_CONFIG}: fastclip does not support {where} {unsupported}")
