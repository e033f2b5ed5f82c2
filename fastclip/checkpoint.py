"""Checkpoints: fastclip's own directory layout, and OpenAI / open_clip / Hugging Face weights.

    save_pretrained(model, "dir", tokenizer)  ->  dir/model.safetensors, config.json, tokenizer.json
    load_pretrained("dir" | "weights.safetensors" | state_dict)  ->  CLIP
    export_hf(model, "dir", tokenizer)  ->  a directory transformers.CLIPModel.from_pretrained reads

``load_pretrained`` recognizes three layouts by their keys and converts them:
  - fastclip's own (``visual_proj.weight``; the config comes from config.json);
  - OpenAI / open_clip (``visual.transformer.resblocks.N.attn.in_proj_weight``, ``visual.proj``,
    or the ResNet's ``visual.layer1...``): the config is inferred from the weights' shapes, as
    OpenAI's ``build_model`` does (heads = width / 64, QuickGELU; override with keywords);
  - Hugging Face ``CLIPModel`` (``vision_model.encoder.layers.N.self_attn.q_proj``...): the config
    comes from the directory's config.json, the shapes otherwise.
Nothing is unpickled: safetensors, or ``torch.load(weights_only=True)`` for .pt/.bin files.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastclip.model import CLIP, CLIPConfig

WEIGHT_FILES = (
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
)
# Entries of OpenAI / open_clip / HF state dicts that are not weights of the model.
IGNORED = re.compile(r"(^|\.)(attn_mask|position_ids|input_resolution|context_length|vocab_size)$")

# (fastclip prefix, other prefix) pairs, then substitutions inside transformer blocks.
HF_PREFIXES = [
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
]
HF_BLOCK = [
    (".attn.out.", ".self_attn.out_proj."),
    (".ln_1.", ".layer_norm1."),
    (".ln_2.", ".layer_norm2."),
    (".mlp.fc.", ".mlp.fc1."),
    (".mlp.proj.", ".mlp.fc2."),
]
OPENAI_PREFIXES = [
    ("visual.transformer.blocks.", "visual.transformer.resblocks."),
    ("text.transformer.blocks.", "transformer.resblocks."),
    ("text.token_embedding.", "token_embedding."),
    ("text.positional_embedding", "positional_embedding"),
    ("text.ln_final.", "ln_final."),
    ("text_proj.weight", "text_projection"),  # OpenAI stores x @ P: transposed
]
OPENAI_VIT = [("visual.patch_embed.", "visual.conv1."), ("visual_proj.weight", "visual.proj")]
OPENAI_RESNET = [("visual_proj.", "visual.attnpool.c_proj.")]
OPENAI_BLOCK = [
    (".attn.qkv.weight", ".attn.in_proj_weight"),
    (".attn.qkv.bias", ".attn.in_proj_bias"),
    (".attn.out.", ".attn.out_proj."),
    (".mlp.fc.", ".mlp.c_fc."),
    (".mlp.proj.", ".mlp.c_proj."),
]
OPENAI_TRANSPOSED = ("visual.proj", "text_projection")


def _rename(key: str, prefixes: list, block: list, to_fastclip: bool) -> str:
    src, dst = (1, 0) if to_fastclip else (0, 1)
    for pair in prefixes:
        if key.startswith(pair[src]):
            key = pair[dst] + key[len(pair[src]) :]
            break
    if ".blocks." in key or ".layers." in key or ".resblocks." in key:
        for pair in block:
            key = key.replace(pair[src], pair[dst])
    return key


# ---------------------------------------------------------------------------------------------
# Reading files


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .pt/.bin file through torch.load(weights_only=True)
    (open_clip's training checkpoints: their "state_dict", "module." prefixes dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(
                f"{path} is not a readable safetensors file (corrupt or truncated?): {e}"
            ) from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ValueError(
            f"{path} could not be loaded with torch.load(weights_only=True): {e}. fastclip never "
            "unpickles code; a TorchScript archive (OpenAI's .pt) can be read by "
            "load_pretrained(torch.jit.load(path, map_location='cpu').state_dict()) if you trust "
            "it, or use the weights in safetensors"
        ) from e
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _read_directory(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint directory: one file of WEIGHT_FILES, or the shards listed by
    Hugging Face's ``model.safetensors.index.json``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{index} lists no weight files")
        return {k: v for shard in shards for k, v in read_state_dict(path / shard).items()}
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{path} holds none of {WEIGHT_FILES} (nor a sharded index)")
    return read_state_dict(weights)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


# ---------------------------------------------------------------------------------------------
# Loading


def load_pretrained(source: str | os.PathLike | Mapping[str, torch.Tensor], **overrides) -> CLIP:
    """A CLIP model from a checkpoint directory, a weights file or a state dict.

    Args:
        source: a directory (fastclip's ``save_pretrained`` layout, a Hugging Face ``CLIPModel``
            directory, or an open_clip directory with ``open_clip_model.safetensors``), a
            ``.safetensors``/``.pt``/``.bin`` file, or a state dict, in any of the three layouts.
        overrides: CLIPConfig fields to set where the weights cannot tell them (e.g.
            ``activation="gelu"`` for open_clip models trained without QuickGELU, or heads).

    Returns:
        The model in fp32 and eval mode. Raises ValueError naming missing, unexpected or
        mis-shaped weights.
    """
    config_json = None
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = Path(source)
        if path.is_dir():
            if (path / "config.json").is_file():
                config_json = _read_json(path / "config.json")
            state = _read_directory(path)
        else:
            state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not IGNORED.search(k)}
    if "visual_proj.weight" in state:
        if config_json is None or "fastclip" not in config_json:
            raise ValueError("fastclip weights need the config.json that save_pretrained writes")
        config = CLIPConfig.from_dict({**config_json["fastclip"], **overrides})
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


def load_weights(model: CLIP, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model``; a clear error lists every missing, unexpected or mis-shaped
    weight. BatchNorm's ``num_batches_tracked`` counters may be absent."""
    problems = mismatches(model.state_dict(), state, optional=("num_batches_tracked",))
    if problems:
        raise ValueError(f"checkpoint does not match the model; {problems}")
    model.load_state_dict(state, strict=False)


def mismatches(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], optional: tuple = ()
) -> str:
    """The missing, unexpected and mis-shaped keys of ``state`` against ``expected``, as one
    line for an error message ("" when they match); keys ending in ``optional`` may be absent."""
    missing = [k for k in expected if k not in state and not k.endswith(optional)]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    found = (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
    return "; ".join(
        f"{name} ({len(keys)}): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
        for name, keys in found
        if keys
    )


def _blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def from_openai_state_dict(state: Mapping[str, torch.Tensor], **overrides):
    """OpenAI / open_clip keys -> (fastclip state dict, inferred CLIPConfig)."""
    resnet = "visual.layer1.0.conv1.weight" in state
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
    if resnet:
        width = state["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = tuple(_blocks(state, f"visual.layer{i}.") for i in range(1, 5))
        fields.update(
            vision_layers=layers,
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
    config = CLIPConfig.from_dict({**fields, **overrides})
    prefixes = OPENAI_PREFIXES + (OPENAI_RESNET if resnet else OPENAI_VIT)
    converted = {}
    for key, value in state.items():
        converted[_rename(key, prefixes, OPENAI_BLOCK, True)] = (
            value.t() if key in OPENAI_TRANSPOSED else value
        )
    return converted, config


def from_hf_state_dict(state: Mapping[str, torch.Tensor], config_json: Mapping, **overrides):
    """Hugging Face CLIPModel keys (+ its config.json, may be empty) -> (state dict, CLIPConfig).
    q/k/v projections are concatenated into one; missing config values take HF's defaults."""
    text = {**HF_TEXT_DEFAULTS, **config_json.get("text_config", {})}
    vision = {**HF_VISION_DEFAULTS, **config_json.get("vision_config", {})}
    if text["hidden_act"] != vision["hidden_act"] or text["hidden_act"] not in (
        "gelu",
        "quick_gelu",
    ):
        raise ValueError(
            f"unsupported activations: text {text['hidden_act']!r}, vision {vision['hidden_act']!r}"
        )
    ratios = {
        text["intermediate_size"] / text["hidden_size"],
        vision["intermediate_size"] / vision["hidden_size"],
    }
    if len(ratios) > 1:
        raise ValueError(f"the towers' MLP ratios differ ({sorted(ratios)}); fastclip shares one")
    eos, vocab = text["eos_token_id"], text["vocab_size"]
    legacy = eos == 2  # old configs: the text feature is read at the highest id, CLIP's eot
    fields = dict(
        embed_dim=config_json.get("projection_dim", 512),
        image_size=vision["image_size"],
        vision_layers=vision["num_hidden_layers"],
        vision_width=vision["hidden_size"],
        vision_heads=vision["num_attention_heads"],
        patch_size=vision["patch_size"],
        context_length=text["max_position_embeddings"],
        vocab_size=vocab,
        text_width=text["hidden_size"],
        text_heads=text["num_attention_heads"],
        text_layers=text["num_hidden_layers"],
        activation=text["hidden_act"],
        mlp_ratio=ratios.pop(),
        layer_norm_eps=text["layer_norm_eps"],
        sot_token_id=vocab - 2 if legacy else text["bos_token_id"],
        eot_token_id=vocab - 1 if legacy else eos,
        pad_token_id=0 if legacy else text["pad_token_id"],
    )
    config = CLIPConfig.from_dict({**fields, **overrides})
    converted, qkv = {}, {}
    for key, value in state.items():
        match = re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if match:
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
        else:
            converted[_rename(key, HF_PREFIXES, HF_BLOCK, True)] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(
                f"missing {sorted({'q', 'k', 'v'} - set(parts))} projections of {block}"
            )
        name = _rename(f"{block}.attn.qkv.{kind}", HF_PREFIXES, HF_BLOCK, True)
        converted[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted, config


HF_TEXT_DEFAULTS = dict(
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
)
HF_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
)


# ---------------------------------------------------------------------------------------------
# Writing


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """write(temporary name) then rename: a crash mid-write leaves the previous file intact."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: Path, values: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(values, indent=2) + "\n"))


def write_weights(
    path: str | os.PathLike, state: Mapping[str, torch.Tensor], metadata: Mapping | None = None
) -> None:
    """``state`` as a safetensors file (own CPU copies: views and shared storage are fine),
    written atomically, with ``metadata`` (strings) beside safetensors' "format"."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    metadata = {"format": "pt", **(metadata or {})}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_pretrained(model: CLIP, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ the tokenizer's files) into ``directory``,
    each file atomically. ``load_pretrained(directory)`` reads them back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_weights(directory / "model.safetensors", model.state_dict())
    _write_json(directory / "config.json", {"fastclip": model.config.to_dict()})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def to_openai_state_dict(model: CLIP) -> dict[str, torch.Tensor]:
    """The model's weights under OpenAI / open_clip's names (q/k/v fused, projections as x @ P)."""
    prefixes = OPENAI_PREFIXES + (OPENAI_RESNET if model.config.resnet else OPENAI_VIT)
    state = {}
    for key, value in model.state_dict().items():
        name = _rename(key, prefixes, OPENAI_BLOCK, False)
        state[name] = value.t() if name in OPENAI_TRANSPOSED else value
    return state


def export_hf(model: CLIP, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write a Hugging Face ``CLIPModel`` directory (config.json, model.safetensors, and the
    tokenizer's files if given): ``transformers.CLIPModel.from_pretrained(directory)`` loads it."""
    c = model.config
    if c.resnet or c.proj_bias or model.logit_bias is not None:
        raise ValueError(
            "Hugging Face's CLIPModel has no ResNet tower, projection bias or logit bias"
        )
    state = {}
    for key, value in model.state_dict().items():
        name = _rename(key, HF_PREFIXES, HF_BLOCK, False)
        if name.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
            head, kind = name.rsplit(".attn.qkv.", 1)
            for part, chunk in zip("qkv", value.chunk(3), strict=True):
                state[f"{head}.self_attn.{part}_proj.{kind}"] = chunk
        else:
            state[name] = value
    hidden = {"hidden_act": c.activation, "layer_norm_eps": c.layer_norm_eps}
    config = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": c.embed_dim,
        "logit_scale_init_value": c.logit_scale_init,
        "text_config": {
            **hidden,
            "vocab_size": c.vocab_size,
            "hidden_size": c.text_width,
            "intermediate_size": round(c.text_width * c.mlp_ratio),
            "num_hidden_layers": c.text_layers,
            "num_attention_heads": c.text_heads,
            "max_position_embeddings": c.context_length,
            "projection_dim": c.embed_dim,
            "bos_token_id": c.sot_token_id,
            "eos_token_id": c.eot_token_id,
            "pad_token_id": c.pad_token_id,
        },
        "vision_config": {
            **hidden,
            "hidden_size": c.vision_width,
            "image_size": c.image_size,
            "intermediate_size": round(c.vision_width * c.mlp_ratio),
            "num_hidden_layers": c.vision_layers,
            "num_attention_heads": c.vision_heads,
            "patch_size": c.patch_size,
            "projection_dim": c.embed_dim,
        },
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_weights(directory / "model.safetensors", state)
    _write_json(directory / "config.json", config)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
