"""open_clip's Hub layout: ``open_clip_config.json`` beside ``open_clip_model.safetensors``.

The weights are in OpenAI's layout (``openai.py`` converts them, inferring sizes from shapes);
the config adds what shapes cannot tell, the activation and head widths, and the image
normalization the model was trained with:

    {"model_cfg": {"embed_dim": 512, "quick_gelu": true,
                   "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512,
                                "heads": 8, "layers": 12}},
     "preprocess_cfg": {"mean": [...], "std": [...]}}
"""

from __future__ import annotations

from collections.abc import Mapping

from fastclip.transforms import CLIP_MEAN, CLIP_STD

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HEAD_WIDTH = 64  # open_clip's default width of an attention head
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
PREPROCESSING = dict(interpolation=("bicubic",), resize_mode=("shortest",))


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
    if "head_width" in vision and "width" in vision:
        resnet = not isinstance(vision.get("layers", 12), int)  # a ResNet's width is its stem's
        fields["vision_heads"] = vision["width"] * (32 if resnet else 1) // vision["head_width"]
    return fields


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
