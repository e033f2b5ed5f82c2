"""Hugging Face Hub repositories for tests, laid out on disk as huggingface_hub's cache holds
them (no network: the session runs with HF_HUB_OFFLINE=1, see conftest.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from fastclip import CLIP, Tokenizer
from fastclip.checkpoint import export_open_clip
from fastclip.factory import INCEPTION
from fastclip.files import write_json, write_weights


def use_cache(directory: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make ``directory`` the Hub cache for one test (huggingface_hub read HF_HUB_CACHE when it
    was imported, so its constant is patched too)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(directory))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(directory))
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    return directory


def cache_repo(
    cache: Path, repo: str, files: Path | dict[str, bytes], refs: tuple[str, ...] = ("main",)
) -> str:
    """Put ``files`` (a directory's files, or names and contents) into ``cache`` as the snapshot
    of one commit of model repository ``repo``, which ``refs`` (branches or tags) point to:
    ``models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/<ref>}``.
    Returns the commit hash."""
    if isinstance(files, Path):
        files = {p.name: p.read_bytes() for p in sorted(files.iterdir()) if p.is_file()}
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(b"".join(k.encode() + v for k, v in sorted(files.items()))).hexdigest()
    snapshot = folder / "snapshots" / commit
    for directory in (folder / "blobs", snapshot, folder / "refs"):
        directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        blob = folder / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        link = snapshot / name
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)
    return commit


VISION_HEADS, TEXT_HEADS = 4, 2  # not width // 64, which the weights' shapes would suggest


def tiny(tokenizer: Tokenizer, seed: int = 0, activation: str = "gelu") -> CLIP:
    torch.manual_seed(seed)
    fields = dict(vision_heads=VISION_HEADS, text_heads=TEXT_HEADS, activation=activation)
    return CLIP("tiny", **tokenizer.model_fields(), **fields).eval()


def write_open_clip(model: CLIP, directory: Path, tokenizer: Tokenizer | None = None) -> None:
    """open_clip's Hub layout (images normalized with mean and std 0.5), beside a timm-style
    config.json and model.safetensors that are not a CLIP (timm's repositories hold both)."""
    export_open_clip(model, directory, tokenizer, mean=INCEPTION, std=INCEPTION)
    write_json(directory / "config.json", {"architecture": "vit_tiny_patch8_clip"})
    write_weights(directory / "model.safetensors", {"head.weight": torch.zeros(2, 2)})
