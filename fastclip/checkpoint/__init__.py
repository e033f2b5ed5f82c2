"""Checkpoints: fastclip's own directory layout, and OpenAI / open_clip / Hugging Face weights.

    save_pretrained(model, "dir", tokenizer)  ->  dir/model.safetensors, config.json, tokenizer.json
    load_pretrained("dir" | "weights.safetensors" | state_dict | "org/name")  ->  CLIP
    export_hf(model, "dir", tokenizer)  ->  a directory transformers.CLIPModel.from_pretrained reads
    export_open_clip(model, "dir")  ->  open_clip_config.json + open_clip_model.safetensors, the
        layout open_clip.create_model_and_transforms("hf-hub:org/name") loads from the Hub

``load_pretrained`` recognizes three layouts by their keys and converts them:
  - fastclip's own (``visual_proj.weight``; the config comes from config.json, else from the
    weights' shapes as for OpenAI's, the heads and activation assumed unless given);
  - OpenAI / open_clip (``visual.transformer.resblocks.N.attn.in_proj_weight``, ``visual.proj``,
    or the ResNet's ``visual.layer1...``): the config is inferred from the weights' shapes, as
    OpenAI's ``build_model`` does (heads = width / 64, QuickGELU; override with keywords);
  - Hugging Face ``CLIPModel`` (``vision_model.encoder.layers.N.self_attn.q_proj``...): the config
    comes from the directory's config.json, the shapes otherwise.
Nothing is unpickled: safetensors, or ``torch.load(weights_only=True)`` for .pt/.bin files.

A Hugging Face Hub repository's name (``org/name``, ``hf-hub:org/name``) reads its snapshot
(``fastclip.hub``); an open_clip directory's ``open_clip_config.json`` gives what the weights'
shapes cannot, and ``export_open_clip`` writes one (``open_clip``).

``pretrained`` holds fastclip's layout and the loading (``weight_names`` reads a checkpoint's
names alone); ``openai`` and ``hf`` the converters, each one table of names (``keys``) read both
ways; ``fastclip.files`` the file reading and writing.
"""

from fastclip.checkpoint.hf import export_hf, from_hf_state_dict, to_hf_state_dict
from fastclip.checkpoint.open_clip import export_open_clip
from fastclip.checkpoint.openai import from_openai_state_dict, to_openai_state_dict
from fastclip.checkpoint.pretrained import (
    WEIGHT_FILES,
    load_pretrained,
    load_weights,
    save_pretrained,
)

__all__ = [
    "WEIGHT_FILES",
    "export_hf",
    "export_open_clip",
    "from_hf_state_dict",
    "from_openai_state_dict",
    "load_pretrained",
    "load_weights",
    "save_pretrained",
    "to_hf_state_dict",
    "to_openai_state_dict",
]
