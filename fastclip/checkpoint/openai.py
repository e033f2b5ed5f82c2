"""OpenAI / open_clip weights (OpenAI's layout, ViT or ResNet towers) to fastclip's and back.

    transformer.resblocks.N.attn.in_proj_weight  <->  text.transformer.blocks.N.attn.qkv.weight
    visual.proj, text_projection (x @ P)  <->  visual_proj.weight, text_proj.weight (transposed)

OpenAI's files carry no config: it is inferred from the weights' shapes, as OpenAI's
``build_model`` does (heads = width / 64, QuickGELU; override with keywords).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from fastclip.checkpoint.keys import KeyMap
from fastclip.model import CLIP, CLIPConfig

_TOWERS = (
    ("visual.transformer.blocks.", "visual.transformer.resblocks."),
    ("text.transformer.blocks.", "transformer.resblocks."),
    ("text.token_embedding.", "token_embedding."),
    ("text.positional_embedding", "positional_embedding"),
    ("text.ln_final.", "ln_final."),
    ("text_proj.weight", "text_projection"),  # OpenAI stores x @ P: transposed
)
_BLOCK = (
    (".attn.qkv.weight", ".attn.in_proj_weight"),
    (".attn.qkv.bias", ".attn.in_proj_bias"),
    (".attn.out.", ".attn.out_proj."),
    (".mlp.fc.", ".mlp.c_fc."),
    (".mlp.proj.", ".mlp.c_proj."),
)
KEYS = {  # by image tower
    "vit": KeyMap(
        _TOWERS + (("visual.patch_embed.", "visual.conv1."), ("visual_proj.weight", "visual.proj")),
        _BLOCK,
    ),
    "resnet": KeyMap(_TOWERS + (("visual_proj.", "visual.attnpool.c_proj."),), _BLOCK),
}
TRANSPOSED = ("visual.proj", "text_projection")  # OpenAI's names of the x @ P projections
RESNET = "visual.layer1.0.conv1.weight"  # a weight only the ResNet tower has, in both layouts


def from_openai_state_dict(
    state: Mapping[str, torch.Tensor], **overrides
) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    """OpenAI / open_clip keys -> (fastclip state dict, inferred CLIPConfig)."""
    keys = KEYS["resnet" if RESNET in state else "vit"]
    return {
        keys.to_fastclip(key): value.t() if key in TRANSPOSED else value
        for key, value in state.items()
    }, infer_config(state, **overrides)


def to_openai_state_dict(model: CLIP | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's weights, or a fastclip state dict, under OpenAI / open_clip's names (q/k/v
    fused, projections as x @ P)."""
    state = model.state_dict() if isinstance(model, CLIP) else model
    keys = KEYS["resnet" if RESNET in state else "vit"]
    converted = {}
    for key, value in state.items():
        name = keys.from_fastclip(key)
        converted[name] = value.t() if name in TRANSPOSED else value
    return converted


def infer_config(state: Mapping[str, torch.Tensor], **overrides) -> CLIPConfig:
    """The CLIPConfig of OpenAI-layout weights, from their shapes; ``overrides`` win."""
    text_width = state["ln_final.weight"].shape[0]
    fields = dict(
        embed_dim=state["text_projection"].shape[1],
        context_length=state["positional_embedding"].shape[0],
        vocab_size=state["token_embedding.weight"].shape[0],
        text_width=text_width,
        text_heads=text_width // 64,
        text_layers=_blocks(state, "transformer.resblocks."),
        activation="quick_gelu",
        mlp_ratio=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
    )
    if RESNET in state:
        width = state[RESNET].shape[0]
        grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        fields.update(
            vision_layers=tuple(_blocks(state, f"visual.layer{i}.") for i in range(1, 5)),
            vision_width=width,
            vision_heads=width * 32 // 64,
            image_size=32 * grid,
            proj_bias=True,
        )
    else:
        width, _, patch, _ = state["visual.conv1.weight"].shape
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        fields.update(
            vision_layers=_blocks(state, "visual.transformer.resblocks."),
            vision_width=width,
            vision_heads=width // 64,
            patch_size=patch,
            image_size=patch * grid,
        )
    if "logit_bias" in state:
        fields["logit_bias_init"] = float(state["logit_bias"])
    return CLIPConfig.from_dict({**fields, **overrides})


def _blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered blocks ``prefix`` N. holds."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})
