"""Hugging Face ``CLIPModel`` weights and config to fastclip's and back.

    vision_model.encoder.layers.N.self_attn.{q,k,v}_proj  <->  visual.transformer.blocks.N.attn.qkv
    config.json: text_config / vision_config               <->  CLIPConfig

Both directions read the same two tables: ``KEYS`` for the weight names (q, k and v, separate in
Hugging Face's layout, are split or concatenated beside it) and ``CONFIG`` for the config.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from fastclip.checkpoint.keys import KeyMap
from fastclip.files import SavesPretrained, write_checkpoint
from fastclip.model import CLIP, CLIPConfig

KEYS = KeyMap(
    prefixes=(
        ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
        ("visual.patch_embed.", "vision_model.embeddings.patch_embedding."),
        ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
        ("visual.ln_pre.", "vision_model.pre_layrnorm."),  # sic: Hugging Face's spelling
        ("visual.ln_post.", "vision_model.post_layernorm."),
        ("visual.transformer.blocks.", "vision_model.encoder.layers."),
        ("text.transformer.blocks.", "text_model.encoder.layers."),
        ("text.token_embedding.", "text_model.embeddings.token_embedding."),
        ("text.positional_embedding", "text_model.embeddings.position_embedding.weight"),
        ("text.ln_final.", "text_model.final_layer_norm."),
        ("visual_proj.", "visual_projection."),
        ("text_proj.", "text_projection."),
    ),
    block=(
        (".attn.out.", ".self_attn.out_proj."),
        (".ln_1.", ".layer_norm1."),
        (".ln_2.", ".layer_norm2."),
        (".mlp.fc.", ".mlp.fc1."),
        (".mlp.proj.", ".mlp.fc2."),
    ),
)
_QKV = re.compile(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$")

# CLIPConfig fields by their config.json names, per tower section. Both sections also hold SHARED
# (read from the text section) and intermediate_size = hidden_size * mlp_ratio.
CONFIG = {
    "text_config": dict(
        vocab_size="vocab_size",
        hidden_size="text_width",
        num_hidden_layers="text_layers",
        num_attention_heads="text_heads",
        max_position_embeddings="context_length",
        bos_token_id="sot_token_id",
        eos_token_id="eot_token_id",
        pad_token_id="pad_token_id",
    ),
    "vision_config": dict(
        hidden_size="vision_width",
        image_size="image_size",
        num_hidden_layers="vision_layers",
        num_attention_heads="vision_heads",
        patch_size="patch_size",
    ),
}
SHARED = dict(hidden_act="activation", layer_norm_eps="layer_norm_eps")
DEFAULTS = {  # Hugging Face's, for what a config.json leaves out
    "text_config": dict(
        vocab_size=49408,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=49406,
        eos_token_id=49407,
    ),
    "vision_config": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
    ),
}


def from_hf_state_dict(
    state: Mapping[str, torch.Tensor], config_json: Mapping, **overrides
) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    """Hugging Face CLIPModel keys (+ its config.json, may be empty) -> (state dict, CLIPConfig).
    q/k/v projections are concatenated into one; missing config values take HF's defaults."""
    config = config_from_hf(config_json, **overrides)
    converted, qkv = {}, {}
    for key, value in state.items():
        match = _QKV.match(key)
        if match:
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
        else:
            converted[KEYS.to_fastclip(key)] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(
                f"missing {sorted({'q', 'k', 'v'} - set(parts))} projections of {block}"
            )
        name = KEYS.to_fastclip(f"{block}.attn.qkv.{kind}")
        converted[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted, config


def to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fastclip's weights under Hugging Face's names, the fused q/k/v split in three."""
    converted = {}
    for key, value in state.items():
        name = KEYS.from_fastclip(key)
        if name.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
            head, kind = name.rsplit(".attn.qkv.", 1)
            for part, chunk in zip("qkv", value.chunk(3), strict=True):
                converted[f"{head}.self_attn.{part}_proj.{kind}"] = chunk
        else:
            converted[name] = value
    return converted


def config_from_hf(config_json: Mapping, **overrides) -> CLIPConfig:
    """The CLIPConfig of a Hugging Face config.json (may be empty: HF's defaults fill it)."""
    text = {**DEFAULTS["text_config"], **config_json.get("text_config", {})}
    vision = {**DEFAULTS["vision_config"], **config_json.get("vision_config", {})}
    if text["hidden_act"] != vision["hidden_act"] or text["hidden_act"] not in (
        "gelu",
        "quick_gelu",
    ):
        raise ValueError(
            f"unsupported activations: text {text['hidden_act']!r}, vision {vision['hidden_act']!r}"
        )
    ratios = {s["intermediate_size"] / s["hidden_size"] for s in (text, vision)}
    if len(ratios) > 1:
        raise ValueError(f"the towers' MLP ratios differ ({sorted(ratios)}); fastclip shares one")
    fields = {field: vision[key] for key, field in CONFIG["vision_config"].items()}
    fields.update({field: text[key] for key, field in {**CONFIG["text_config"], **SHARED}.items()})
    fields.update(embed_dim=config_json.get("projection_dim", 512), mlp_ratio=ratios.pop())
    if text["eos_token_id"] == 2:  # old configs: the text feature is read at the highest id
        vocab = text["vocab_size"]
        fields.update(sot_token_id=vocab - 2, eot_token_id=vocab - 1, pad_token_id=0)
    return CLIPConfig.from_dict({**fields, **overrides})


def config_to_hf(c: CLIPConfig) -> dict:
    """The config.json of a Hugging Face CLIPModel with ``c``'s sizes."""
    config = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": c.embed_dim,
        "logit_scale_init_value": c.logit_scale_init,
    }
    for section, names in CONFIG.items():
        values = {key: getattr(c, field) for key, field in {**SHARED, **names}.items()}
        values.update(
            intermediate_size=round(values["hidden_size"] * c.mlp_ratio), projection_dim=c.embed_dim
        )
        config[section] = values
    return config


def export_hf(
    model: CLIP, directory: str | os.PathLike, tokenizer: SavesPretrained | None = None
) -> Path:
    """Write a Hugging Face ``CLIPModel`` directory (config.json, model.safetensors, and the
    tokenizer's files if given): ``transformers.CLIPModel.from_pretrained(directory)`` loads it."""
    c = model.config
    if c.resnet or c.proj_bias or model.logit_bias is not None:
        raise ValueError(
            "Hugging Face's CLIPModel has no ResNet tower, projection bias or logit bias"
        )
    return write_checkpoint(
        directory, to_hf_state_dict(model.state_dict()), config_to_hf(c), tokenizer
    )
