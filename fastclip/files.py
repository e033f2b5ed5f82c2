"""Files: atomic writes, JSON, safetensors with metadata, and what a loaded state dict lacks.

Every writer here writes a temporary file beside the target and renames it over the target, so
a crash mid-write leaves the previous file intact, and a failed write (a full disk) removes its
temporary file; ``disk_full`` finds a full disk behind torch's and safetensors' errors.
Checkpoints, the tokenizer, LoRA and the fine-tuned parts all read and write through these
functions. Nothing is unpickled: weights are
safetensors, or ``torch.load(weights_only=True)`` for .pt/.bin files.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

TORCH_SAVE_HEADS = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive, its older pickle


class SavesPretrained(Protocol):
    """What a checkpoint directory needs of a tokenizer (``fastclip.Tokenizer`` has it)."""

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer's files into ``directory``."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """write(temporary name) then rename: a crash mid-write leaves the previous file intact. The
    file gets the mode any new file gets (0666 less the umask), as ``open`` would give it."""
    path = Path(path)
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    mode = os.fstat(fd).st_mode & 0o777  # what the umask leaves a new file
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer that replaces the file (safetensors does) may narrow it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` as a UTF-8 file, written atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_torch(path: str | os.PathLike, obj: object) -> None:
    """``obj`` through ``torch.save``, written atomically through a Python file: a write that
    fails leaves its OSError behind torch's error, where ``disk_full`` finds it."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` or an error it was raised from or during is a full disk (or quota): an
    OSError's errno, or the "os error N" safetensors' messages carry."""
    full, seen = {errno.ENOSPC, errno.EDQUOT}, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in full:
            return True
        number = re.search(r"\(os error (\d+)\)", str(error))
        if number and int(number[1]) in full:
            return True
        error = error.__cause__ or error.__context__
    return False


def write_json(path: str | os.PathLike, values: Mapping) -> None:
    """``values`` as an indented JSON file, written atomically."""
    write_text(path, json.dumps(values, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object of a file; ValueError naming the file if it is unreadable, not JSON or
    not an object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def write_weights(
    path: str | os.PathLike, state: Mapping[str, torch.Tensor], metadata: Mapping | None = None
) -> None:
    """``state`` as a safetensors file (own CPU copies: views and shared storage are fine),
    written atomically, with ``metadata`` (strings) beside safetensors' "format"."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    metadata = {"format": "pt", **(metadata or {})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_weights(
    path: str | os.PathLike, what: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file. FileNotFoundError ("no {what} file at ...") if
    it is absent, ValueError if it is not a readable safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file (corrupt or truncated?): {e}"
        ) from e


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .pt/.bin file through torch.load(weights_only=True)
    (open_clip's training checkpoints: their "state_dict", "module." prefixes dropped)."""
    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file():  # read_weights names what is wrong
        return read_weights(path)[0]
    with path.open("rb") as f:
        head = f.read(8)
    if not head.startswith(TORCH_SAVE_HEADS):
        raise ValueError(
            f"{path} is not a weights file: neither safetensors nor torch.save's format (it "
            f"begins {head!r})"
        )
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


def require_match(
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    subject: str,
    optional: tuple = (),
) -> None:
    """ValueError "{subject}; {mismatches}" unless ``state`` fits ``expected`` key for key."""
    problems = mismatches(expected, state, optional)
    if problems:
        raise ValueError(f"{subject}; {problems}")


def write_checkpoint(
    directory: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    config: Mapping,
    tokenizer: SavesPretrained | None = None,
) -> Path:
    """A checkpoint directory: ``model.safetensors``, ``config.json`` and, if given, the
    tokenizer's files; each file written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_weights(directory / "model.safetensors", state)
    write_json(directory / "config.json", config)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
