"""fastclip's checkpoint directories, and loading weights of any of the three layouts.

save_pretrained(model, "dir", tokenizer)  ->  dir/model.safetensors, config.json, tokenizer.json
load_pretrained("dir" | "weights.safetensors" | state_dict)  ->  CLIP
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fastclip.checkpoint.hf import from_hf_state_dict
from fastclip.checkpoint.open_clip import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, open_clip_fields
from fastclip.checkpoint.openai import from_openai_state_dict, infer_config, to_openai_state_dict
from fastclip.files import (
    SavesPretrained,
    read_json,
    read_state_dict,
    require_match,
    write_checkpoint,
)
from fastclip.hub import Layout, resolve
from fastclip.model import CLIP, CLIPConfig

WEIGHT_FILES = (
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
)
UNSEEN = ("vision_heads", "text_heads", "activation")  # CLIPConfig fields weights do not show
# What load_pretrained fetches of a Hugging Face Hub repository: open_clip's files (its own and
# timm's repositories), else a config.json and its weights (Hugging Face's CLIPModel, fastclip's).
HUB_LAYOUTS = (
    Layout(OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS),
    Layout(
        "config.json", ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    ),
)
# Entries of OpenAI / open_clip / HF state dicts that are not weights of the model.
IGNORED = re.compile(r"(^|\.)(attn_mask|position_ids|input_resolution|context_length|vocab_size)$")


def load_pretrained(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    revision: str | None = None,
    **overrides,
) -> CLIP:
    """A CLIP model from a checkpoint directory, a weights file, a state dict or a Hugging Face
    Hub repository.

    Args:
        source: a directory (fastclip's ``save_pretrained`` layout, a Hugging Face ``CLIPModel``
            directory, or an open_clip directory with ``open_clip_model.safetensors`` and
            ``open_clip_config.json``), a ``.safetensors``/``.pt``/``.bin`` file, or a state dict,
            in any of the three layouts; or a Hub repository of one of these directories,
            ``org/name`` or ``hf-hub:org/name`` (``fastclip.hub``).
        revision: the repository's branch, tag or commit (default: its main branch).
        overrides: CLIPConfig fields to set where the weights cannot tell them (e.g.
            ``activation="gelu"`` for open_clip models trained without QuickGELU, or heads).
            Without a config.json (a state dict, a bare weights file), the config is inferred
            from the weights' shapes, in every layout.

    Returns:
        The model in fp32 and eval mode. Raises ValueError naming missing, unexpected or
        mis-shaped weights.
    """
    config_json = None
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = resolve(source, HUB_LAYOUTS, revision)
        if (path / OPEN_CLIP_CONFIG).is_file():
            overrides = {**open_clip_fields(read_json(path / OPEN_CLIP_CONFIG)), **overrides}
            state = _read_directory(path, OPEN_CLIP_WEIGHTS)
        elif path.is_dir():
            if (path / "config.json").is_file():
                config_json = read_json(path / "config.json")
            state = _read_directory(path)
        else:
            state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not IGNORED.search(k)}
    if "visual_proj.weight" in state:
        config = fastclip_config(state, (config_json or {}).get("fastclip"), **overrides)
    elif any(k.startswith("vision_model.") for k in state):
        state, config = from_hf_state_dict(state, config_json or {}, **overrides)
    elif "token_embedding.weight" in state:
        state, config = from_openai_state_dict(state, **overrides)
    else:
        raise ValueError(
            "unrecognized checkpoint layout: expected fastclip's (visual_proj.weight), OpenAI / "
            "open_clip's (token_embedding.weight) or Hugging Face's (vision_model.*) keys; "
            f"found e.g. {sorted(state)[:5]}"
        )
    model = CLIP(config)
    load_weights(model, state)
    return model.eval()


def fastclip_config(
    state: Mapping[str, torch.Tensor], saved: Mapping | None, **overrides
) -> CLIPConfig:
    """The CLIPConfig of fastclip-layout weights: the one ``save_pretrained`` wrote beside them
    (``saved``), else inferred from their shapes as for OpenAI's layout, with the special tokens
    last in the vocabulary as ``Tokenizer.train`` lays them out. Heads and the activation do not
    show in the weights: unless given as ``overrides``, they are assumed (heads = width / 64,
    GELU), with a warning."""
    if saved is not None:
        return CLIPConfig.from_dict({**saved, **overrides})
    assumed = [name for name in UNSEEN if name not in overrides]
    if assumed:
        warnings.warn(
            f"fastclip weights without their config.json: {', '.join(assumed)} assumed "
            "(heads = width / 64, GELU); pass them to load_pretrained if the model differs",
            stacklevel=3,
        )
    vocab = state["text.token_embedding.weight"].shape[0]
    seen = dict(
        activation="gelu",
        sot_token_id=vocab - 2,
        eot_token_id=vocab - 1,
        proj_bias="visual_proj.bias" in state,
    )
    return infer_config(to_openai_state_dict(state), **{**seen, **overrides})


def load_weights(model: CLIP, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model``; a clear error lists every missing, unexpected or mis-shaped
    weight. BatchNorm's ``num_batches_tracked`` counters may be absent."""
    require_match(
        model.state_dict(),
        state,
        "checkpoint does not match the model",
        optional=("num_batches_tracked",),
    )
    model.load_state_dict(state, strict=False)


def save_pretrained(
    model: CLIP, directory: str | os.PathLike, tokenizer: SavesPretrained | None = None
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ the tokenizer's files) into ``directory``,
    each file atomically. ``load_pretrained(directory)`` reads them back."""
    config = {"fastclip": model.config.to_dict()}
    return write_checkpoint(directory, model.state_dict(), config, tokenizer)


def weight_names(path: Path) -> tuple[Path, list[str]] | None:
    """The safetensors file of a local checkpoint (a directory or a weights file) and the names
    of the weights it holds, read from its header without loading a tensor; None if it has no
    readable safetensors file (``load_pretrained`` then says what is wrong)."""
    files = [path / name for name in WEIGHT_FILES] if path.is_dir() else [path]
    weights = next((f for f in files if f.suffix == ".safetensors" and f.is_file()), None)
    if weights is None:
        return None
    try:
        with safe_open(weights, framework="pt") as f:
            return weights, list(f.keys())
    except (SafetensorError, OSError):
        return None


def _read_directory(path: Path, names: tuple[str, ...] = WEIGHT_FILES) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint directory: the first of ``names`` it holds, or the shards
    listed by Hugging Face's ``model.safetensors.index.json``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{index} lists no weight files")
        return {k: v for shard in shards for k, v in read_state_dict(path / shard).items()}
    weights = next((path / f for f in names if (path / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{path} holds none of {names} (nor a sharded index)")
    return read_state_dict(weights)
