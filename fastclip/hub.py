"""Hugging Face Hub repository names, resolved to local directories through ``huggingface_hub``.

    load_pretrained("openai/clip-vit-base-patch32")                   # transformers' spelling
    load_pretrained("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")   # open_clip's
    Tokenizer.from_pretrained("openai/clip-vit-base-patch32", revision="<commit or branch>")

Names and paths. ``hf-hub:org/name`` always names a repository. Any other str is a local path,
never sent to the Hub, when it is spelled as one (``looks_like_path``):
  - it exists on disk;
  - it starts with ``.`` or ``~`` (``./x``, ``../x``, ``~/x``), or is absolute (``/x``);
  - it has a path separator but is not a valid Hub id ``org/name`` (exactly one ``/``; ASCII
    letters, digits, ``_``, ``.``, ``-``; neither part starting or ending with ``.`` or ``-``; no
    ``--`` or ``..``), e.g. ``runs/shape/step-000100``;
  - its first component exists locally: ``runs/shape`` while ``runs/`` exists (write
    ``hf-hub:runs/shape`` for a repository whose owner shares a local directory's name);
  - it ends in a weights file's suffix (``.safetensors``, ``.pt``, ``.pth``, ``.bin``, ``.ckpt``).
A valid ``org/name`` that none of these rules claims names a repository. A local path that does
not exist fails at once, naming the argument: "source 'runs/shape': no such directory: <absolute
path>" ("no such file" for a weights file's name).

A repository's files of one ``Layout`` are downloaded into huggingface_hub's cache (``HF_HOME``,
``HF_HUB_CACHE``; a token from ``HF_TOKEN`` or ``hf auth login``), or found there, and the
snapshot directory holding them is what the loaders read.

Offline, or without a Hub. With ``HF_HUB_OFFLINE=1`` only the cache is read. Otherwise one request
(for the first layout's marker), without retries and bounded by ``HF_HUB_ETAG_TIMEOUT``
(huggingface_hub's setting, 10 s by default), first asks whether the Hub answers; when it does not
(a connection error, a timeout, HTTP 5xx, 408 or 429), only the cache is read too, where
huggingface_hub alone would retry for about a minute. A name the cache lacks then fails in one
line: why the Hub was not asked, where the cache is, and which files were looked for.
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
INSTALL = '"fastclip-triton[hub]"'
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"  # the Hub's rule for either part
_REPO_ID = re.compile(rf"{_PART}/{_PART}")  # org/name, without "--" or ".." (checked apart)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")  # a file, not a repository
OFFLINE = "HF_HUB_OFFLINE is set"  # why only the cache is read, in offline mode
UNAVAILABLE = (408, 429)  # HTTP statuses, besides 5xx, after which huggingface_hub retries


@dataclass(frozen=True)
class Layout:
    """The files of one kind of repository: ``marker`` is there, so is the first of ``one_of``
    that exists (if any is listed, one must), and ``also`` where they exist. A sharded weights
    index (``*.index.json``) brings the shards its ``weight_map`` names."""

    marker: str
    one_of: tuple[str, ...] = ()
    also: tuple[str, ...] = ()


def is_repo_id(name: str) -> bool:
    """Whether ``name`` is a valid Hub id ``org/name`` (the Hub's own rules)."""
    return bool(_REPO_ID.fullmatch(name)) and "--" not in name and ".." not in name


def looks_like_path(source: str | os.PathLike) -> bool:
    """Whether ``source`` is spelled as a local path (the rules of this module's docstring); a
    plain word (``laion2b_s34b_b79k``) and a Hub id are not."""
    if not isinstance(source, str):
        return True
    if source.startswith(HF_HUB_PREFIX):
        return False
    if Path(source).expanduser().exists() or source.startswith(("~", ".")):
        return True
    if os.path.isabs(source) or source.endswith(WEIGHT_SUFFIXES):
        return True
    separators = {"/", os.sep, os.altsep} - {None}
    if not any(s in source for s in separators):
        return False
    return not is_repo_id(source) or Path(source.split("/")[0]).exists()


def repo_id(source: object) -> str | None:
    """The repository ``source`` names, or None for a local path (or anything else)."""
    if not isinstance(source, str):
        return None  # a Path is always local
    if source.startswith(HF_HUB_PREFIX):
        name = source.removeprefix(HF_HUB_PREFIX)
        if not is_repo_id(name):
            raise ValueError(f"{source!r} must read hf-hub:org/name")
        return name
    return source if is_repo_id(source) and not looks_like_path(source) else None


def resolve(
    source: str | os.PathLike,
    layouts: Sequence[Layout],
    revision: str | None = None,
    *,
    argument: str = "source",
) -> Path:
    """``source`` as a local path: itself (FileNotFoundError if it does not exist), or the
    snapshot directory holding the files of the first of ``layouts`` that the repository it
    names has (at ``revision``: a branch, tag or commit; default the main branch).
    FileNotFoundError if none is found. ``argument`` names ``source`` in errors."""
    name = repo_id(source)
    if name is None:
        if revision is not None:
            raise ValueError(f"revision applies to Hub repositories, not the local path {source!r}")
        return _existing(source, argument)
    hub = require("huggingface_hub", f"loading {name!r} from the Hugging Face Hub", INSTALL)
    repo = _Repository(hub, name, revision, _why_cache_only(hub, name, layouts[0], revision))
    for layout in layouts:
        marker = repo.download(layout.marker)
        if marker is not None:
            repo.download_rest(layout)
            return marker.parent
    raise FileNotFoundError(repo.not_found(layouts))


def _existing(source: str | os.PathLike, argument: str) -> Path:
    """The local path ``source``, which must exist."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    what = "file" if path.name.endswith(WEIGHT_SUFFIXES) else "directory"
    message = f"{argument} {str(source)!r}: no such {what}: {os.path.abspath(path)}"
    owner = str(source).split("/")[0]
    if isinstance(source, str) and is_repo_id(source) and Path(owner).exists():
        message += f" (a path, as {owner}/ exists here; {HF_HUB_PREFIX}{source} names the Hub's)"
    raise FileNotFoundError(message)


def _why_cache_only(hub: ModuleType, name: str, layout: Layout, revision: str | None) -> str | None:
    """Why only the cache is to be read (offline mode, or the Hub does not answer the one request
    made, for ``layout``'s marker), or None when the Hub answers."""
    constants = _constants()
    if constants.HF_HUB_OFFLINE:
        return OFFLINE
    errors = require("huggingface_hub.errors", "the Hugging Face Hub", INSTALL)
    endpoint = constants.ENDPOINT
    url = hub.hf_hub_url(name, layout.marker, revision=revision)
    try:
        hub.get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except errors.HfHubHTTPError as e:  # an answer: only one saying the Hub is unavailable counts
        status = getattr(e.response, "status_code", None)
        if status is not None and (status >= 500 or status in UNAVAILABLE):
            return f"the Hugging Face Hub ({endpoint}) answered HTTP {status}"
    # Anything else is the transport failing: requests', httpx's or httpx2's connection errors and
    # timeouts, as huggingface_hub's versions go.
    except Exception as e:
        detail = " ".join(str(e).split()) or "no detail"
        return f"the Hugging Face Hub ({endpoint}) is unreachable ({type(e).__name__}: {detail})"
    return None


@dataclass(frozen=True)
class _Repository:
    """One repository at one revision, fetched from the Hub, or from the cache alone when
    ``cache_only`` says why."""

    hub: ModuleType
    name: str
    revision: str | None
    cache_only: str | None

    def download(self, filename: str) -> Path | None:
        """The local path of one file (downloaded or cached), None if the repository has no such
        file (or, reading the cache alone, the cache lacks it)."""
        errors = require("huggingface_hub.errors", "the Hugging Face Hub", INSTALL)
        local = self.cache_only is not None
        try:
            path = self.hub.hf_hub_download(
                self.name, filename, revision=self.revision, local_files_only=local
            )
        except errors.LocalEntryNotFoundError as e:
            if local:
                return None
            raise FileNotFoundError(  # the Hub answered the first request, then failed
                f"cannot load {self._where()}: the Hugging Face Hub failed while {filename} "
                f"was downloaded, and the cache ({self._cache()}) lacks it"
            ) from e
        except errors.EntryNotFoundError:
            return None
        except errors.RevisionNotFoundError as e:
            raise ValueError(f"{self.name} has no revision {self.revision!r}") from e
        except errors.RepositoryNotFoundError as e:
            raise FileNotFoundError(
                f"{self.name!r} is neither a local path nor a Hugging Face repository you can read "
                "(private or gated ones need `hf auth login` or HF_TOKEN)"
            ) from e
        return Path(path)

    def download_rest(self, layout: Layout) -> None:
        """The files of ``layout`` beside its marker."""
        found = next((path for f in layout.one_of if (path := self.download(f))), None)
        if layout.one_of and found is None:
            raise FileNotFoundError(
                self._lacks(f"holds {layout.marker} but none of {list(layout.one_of)}")
            )
        if found is not None and found.name.endswith(".index.json"):
            for shard in sorted(set(read_json(found).get("weight_map", {}).values())):
                if self.download(shard) is None:
                    raise FileNotFoundError(
                        self._lacks(f"lacks {shard}, a shard {found.name} lists")
                    )
        for extra in layout.also:
            self.download(extra)

    def not_found(self, layouts: Sequence[Layout]) -> str:
        """Why no layout was found: the repository lacks them all, or the cache does."""
        markers = [layout.marker for layout in layouts]
        if self.cache_only is None:
            return f"{self._where()} holds none of {markers}"
        return self._lacks(f"does not hold it (looked for {' or '.join(markers)})")

    def _lacks(self, what: str) -> str:
        """One line: the repository, or (reading the cache alone) the cache, ``what``."""
        if self.cache_only is None:
            return f"{self._where()} {what}"
        hint = "; download it once online" if self.cache_only == OFFLINE else ""
        return (
            f"cannot load {self._where()}: {self.cache_only}, and the Hugging Face cache "
            f"({self._cache()}) {what}{hint}"
        )

    def _where(self) -> str:
        return self.name + (f" at revision {self.revision!r}" if self.revision else "")

    def _cache(self) -> str:
        return _constants().HF_HUB_CACHE


def _constants() -> ModuleType:
    return require("huggingface_hub.constants", "the Hugging Face Hub", INSTALL)
