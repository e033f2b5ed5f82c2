"""Hugging Face Hub repository names, resolved to local directories through ``huggingface_hub``.

    load_pretrained("openai/clip-vit-base-patch32")                   # transformers' spelling
    load_pretrained("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")   # open_clip's
    Tokenizer.from_pretrained("openai/clip-vit-base-patch32", revision="<commit or branch>")

A source that exists on disk is a local path, whatever its spelling. Any other str that reads as
``org/name``, or any ``hf-hub:org/name``, names a repository: ``huggingface_hub`` downloads the
files of one ``Layout`` into its cache (``HF_HOME``, ``HF_HUB_CACHE``; a token from ``HF_TOKEN``
or ``hf auth login``), or finds them there without a connection (``HF_HUB_OFFLINE=1``), and the
snapshot directory holding them is what the loaders read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from fastclip.extras import require
from fastclip.files import read_json

HF_HUB_PREFIX = "hf-hub:"  # open_clip's spelling of a Hub repository
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")  # org/name
INSTALL = '"fastclip-triton[hub]"'


@dataclass(frozen=True)
class Layout:
    """The files of one kind of repository: ``marker`` is there, so is the first of ``one_of``
    that exists (if any is listed, one must), and ``also`` where they exist. A sharded weights
    index (``*.index.json``) brings the shards its ``weight_map`` names."""

    marker: str
    one_of: tuple[str, ...] = ()
    also: tuple[str, ...] = ()


def repo_id(source: object) -> str | None:
    """The repository ``source`` names, or None for a local path (or anything else)."""
    if not isinstance(source, str):
        return None  # a Path is always local
    if source.startswith(HF_HUB_PREFIX):
        name = source.removeprefix(HF_HUB_PREFIX)
        if not _REPO_ID.fullmatch(name):
            raise ValueError(f"{source!r} must read hf-hub:org/name")
        return name
    return source if _REPO_ID.fullmatch(source) and not Path(source).exists() else None


def resolve(
    source: str | os.PathLike, layouts: Sequence[Layout], revision: str | None = None
) -> Path:
    """``source`` as a local path: itself, or the snapshot directory holding the files of the
    first of ``layouts`` that the repository it names has (at ``revision``: a branch, tag or
    commit; default the main branch). FileNotFoundError if none is found."""
    name = repo_id(source)
    if name is None:
        if revision is not None:
            raise ValueError(f"revision applies to Hub repositories, not the local path {source!r}")
        return Path(source)
    hub = require("huggingface_hub", f"loading {name!r} from the Hugging Face Hub", INSTALL)
    for layout in layouts:
        marker = _download(hub, name, layout.marker, revision)
        if marker is not None:
            _download_rest(hub, name, layout, revision)
            return marker.parent
    raise FileNotFoundError(_not_found(name, layouts, revision))


def _download_rest(hub: ModuleType, name: str, layout: Layout, revision: str | None) -> None:
    """The files of ``layout`` beside its marker."""
    found = next((path for f in layout.one_of if (path := _download(hub, name, f, revision))), None)
    if layout.one_of and found is None:
        raise FileNotFoundError(f"{name} holds {layout.marker} but none of {list(layout.one_of)}")
    if found is not None and found.name.endswith(".index.json"):
        for shard in sorted(set(read_json(found).get("weight_map", {}).values())):
            if _download(hub, name, shard, revision) is None:
                raise FileNotFoundError(f"{name} lacks {shard}, a shard {found.name} lists")
    for extra in layout.also:
        _download(hub, name, extra, revision)


def _download(hub: ModuleType, name: str, filename: str, revision: str | None) -> Path | None:
    """The local path of one file of the repository (downloaded or cached), None if it has no
    such file (or, offline, the cache lacks it)."""
    errors = require("huggingface_hub.errors", "the Hugging Face Hub", INSTALL)
    try:
        return Path(hub.hf_hub_download(name, filename, revision=revision))
    except errors.EntryNotFoundError:
        return None
    except errors.RevisionNotFoundError as e:
        raise ValueError(f"{name} has no revision {revision!r}") from e
    except errors.RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"{name!r} is neither a local path nor a Hugging Face repository you can read "
            "(private or gated ones need `hf auth login` or HF_TOKEN)"
        ) from e


def _not_found(name: str, layouts: Sequence[Layout], revision: str | None) -> str:
    """Why no layout was found: the repository lacks them, or the offline cache does."""
    constants = require("huggingface_hub.constants", "the Hugging Face Hub", INSTALL)
    markers = [layout.marker for layout in layouts]
    where = name + (f" at revision {revision!r}" if revision else "")
    if constants.HF_HUB_OFFLINE:
        return (
            f"{where} is not a local path, and the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"holds none of {markers} of it; HF_HUB_OFFLINE is set: download it once online"
        )
    return f"{where} holds none of {markers}"
