"""A run directory and what the run wrote into it.

A run records each entry it writes into its directory (checkpoints, ``latest``, the tokenizer,
the records, the trackers' folders) in a manifest, ``fastclip-run.json``, rewritten atomically
*before* the entry is written: whatever a kill or a full disk leaves, the manifest lists it.
``--overwrite``, a new run over a failed start and the pruning of old checkpoints delete what the
manifest lists and nothing else: the directory's other files stay, whatever their names.

A directory written before runs kept a manifest is read by layout: an entry is the run's if it
has exactly the layout a run writes under its name (a ``step-NNNNNN`` folder of a checkpoint's
files and no others, a ``latest`` naming one, a ``tokenizer`` folder of a tokenizer's files,
``metrics.jsonl`` of records, ...). The run's first write adopts them into a manifest.

An entry under a name the run writes that is not the run's (a folder ``step-000100`` of one's
own notes, say) is in the way: the run refuses the directory rather than write over it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from glob import escape
from pathlib import Path

from fastclip.files import read_json, write_json
from fastclip.hub import repo_id
from fastclip.tokenizer import HUB_LAYOUTS

MANIFEST = "fastclip-run.json"
TRAINER = "trainer.pt"  # a checkpoint's optimizer, step, loss scaling, RNG states and config
TOKENIZER_FILES = frozenset(f for lay in HUB_LAYOUTS for f in (lay.marker, *lay.one_of, *lay.also))
REQUIRED = frozenset({"model.safetensors", "config.json", TRAINER})  # in every checkpoint
CHECKPOINT_FILES = REQUIRED | TOKENIZER_FILES
LEFTOVER = re.compile(r"\.(.+)\.[0-9a-f]{16}\.tmp")  # what an atomic write of NAME left, killed
PNG = b"\x89PNG\r\n\x1a\n"
ENTRIES = ("latest", "tokenizer", "metrics.jsonl", "metrics.png")  # and checkpoints, trackers'


def checkpoint_name(step: int) -> str:
    """The folder of step ``step``'s checkpoint: ``step-NNNNNN``."""
    return f"step-{step:06d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder's name (``step-000300``: 300); None for any other name,
    ``step-1-notes.txt`` or ``step-300`` included."""
    match = re.fullmatch(r"step-(\d{6,})", name)
    return int(match[1]) if match and checkpoint_name(int(match[1])) == name else None


def temporary(name: str) -> str:
    """The name a checkpoint folder is written under until it is complete."""
    return f".tmp-{name}"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of a run directory (the one ``latest`` names), or None. A
    ``latest`` that names no folder of ``out`` is a ValueError."""
    pointer = out / "latest"
    if not pointer.is_file():
        return None
    checkpoint = out / pointer.read_text().strip()
    if not checkpoint.is_dir() or checkpoint.parent != out:
        raise ValueError(f"{pointer} names {checkpoint.name}, which {out} does not hold")
    return checkpoint


def checkpoint_of(path: str | os.PathLike) -> Path:
    """A checkpoint directory as given, or the latest checkpoint of a run directory."""
    return latest_checkpoint(Path(path)) or Path(path)


def existing_checkpoint(path: str) -> str | Path:
    """A checkpoint as a flag names it: a checkpoint directory or weights file, a run
    directory (its latest checkpoint), or a Hugging Face Hub name (fetched when loaded); a
    ValueError if there is nothing at ``path``."""
    if repo_id(path):
        return path
    if not Path(path).exists():
        raise ValueError(f"no checkpoint at {path}: no such file or directory")
    return checkpoint_of(path)


@dataclass
class RunFiles:
    """The entries of ``out`` that its run wrote, by name: a manifest's, or an older run's
    recognized by layout (``recorded`` False). Rank 0 keeps the manifest; ``add`` and ``discard``
    rewrite it atomically."""

    out: Path
    names: set[str] = field(default_factory=set)
    recorded: bool = True

    @classmethod
    def read(cls, out: Path) -> RunFiles:
        """The manifest of ``out``; without one, the entries laid out as a run writes them. A
        ValueError if ``out`` holds a manifest that is not one."""
        path = out / MANIFEST
        if not path.exists():
            return cls(out, set(_by_layout(out)) if out.is_dir() else set(), recorded=False)
        entries = read_json(path).get("entries")
        if not isinstance(entries, list) or not all(_plain_name(e) for e in entries):
            raise ValueError(
                f"{path} is not a fastclip run manifest (no list of entries): move it away, or "
                "choose another --out"
            )
        return cls(out, set(entries))

    def add(self, *names: str) -> None:
        """Record entries about to be written."""
        if not set(names) <= self.names or not self.recorded:
            self.names.update(names)
            self._write()

    def discard(self, *names: str) -> None:
        """Forget entries deleted, or never written."""
        if set(names) & self.names:
            self.names.difference_update(names)
            self._write()

    def _write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        manifest = {"written_by": "fastclip train", "entries": sorted(self.names)}
        write_json(self.out / MANIFEST, manifest)
        self.recorded = True

    def checkpoints(self) -> dict[int, Path]:
        """The run's checkpoint folders there, by step."""
        steps = {step_of(name): self.out / name for name in self.names}
        steps.pop(None, None)  # the other entries
        return {step: steps[step] for step in sorted(steps) if steps[step].is_dir()}

    def latest(self) -> Path | None:
        """The checkpoint ``--resume`` continues from: the one ``latest`` names, else the newest
        (a first save cut short between its folder's rename and ``latest``)."""
        named = latest_checkpoint(self.out) if "latest" in self.names else None
        checkpoints = self.checkpoints()
        return named or (checkpoints[max(checkpoints)] if checkpoints else None)

    def in_the_way(self, writes: Iterable[str]) -> list[str]:
        """Entries of ``out`` under a name the run writes (``writes``, checkpoints' and their
        temporary names) that are not the run's."""
        if not self.out.is_dir():
            return []
        names = set(writes)
        return sorted(
            entry.name
            for entry in self.out.iterdir()
            if entry.name not in self.names
            and (entry.name in names or step_of(entry.name.removeprefix(".tmp-")) is not None)
        )

    def remove(self, names: Iterable[str]) -> list[str]:
        """Delete entries of the run, with what atomic writes of them left, and forget them.
        Returns the names of the entries there were."""
        names = sorted(set(names) & self.names)
        deleted = [name for name in names if _remove(self.out / name)]
        for name in names:
            for leftover in _leftovers(self.out, name):
                _remove(leftover)
        self.discard(*names)
        return deleted

    def clear(self) -> list[str]:
        """Delete every entry of the run, then its manifest; the directory's other files stay.
        Returns the names of the entries there were."""
        deleted = self.remove(self.names)
        for path in (self.out / MANIFEST, *_leftovers(self.out, MANIFEST)):
            _remove(path)
        self.recorded = False
        return deleted


def claim(out: Path, resume: bool, overwrite: bool, writes: Iterable[str]) -> RunFiles:
    """What the run of ``out`` wrote, checked before a new run writes anything: a ValueError if an
    entry under a name it writes (``writes``, checkpoints) is not the run's, or if ``out`` holds an
    earlier run (a checkpoint) that the new one neither continues (``resume``) nor deletes first
    (``overwrite``). A tokenizer or records without a checkpoint, what a failed start left, are no
    earlier run: the new one deletes them."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    files = RunFiles.read(out)
    blocking = files.in_the_way(writes)
    if blocking:
        whose = f"listed in its {MANIFEST}" if files.recorded else "laid out as a run writes it"
        raise ValueError(
            f"{out / blocking[0]}{f' (and {len(blocking) - 1} more)' if len(blocking) > 1 else ''}"
            f" is in the way: a run writes under that name, and it is not the run's (not {whose});"
            " move it, or choose another --out"
        )
    found = [path.name for path in files.checkpoints().values()]
    if found and not (resume or overwrite):
        names = ", ".join(found[-3:]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ValueError(
            f"{out} holds an earlier run (checkpoints {names}): pass --resume to continue it, or "
            "--overwrite to delete it and start over (or choose another --out)"
        )
    return files


def _plain_name(name: object) -> bool:
    """An entry's name, not a path that could leave the directory."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def _remove(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    else:
        return False
    return True


def _leftovers(out: Path, name: str) -> list[Path]:
    """What atomic writes of ``out/name`` left when killed mid-write."""
    candidates = out.glob(f".{escape(name)}.*.tmp")
    return [p for p in candidates if (m := LEFTOVER.fullmatch(p.name)) and m[1] == name]


# ---------------------------------------------------------------------------------------------
# The layout of an older run's entries, which no manifest lists


def _files(path: Path) -> set[str] | None:
    """The names in a folder of plain files, an atomic write's leftover counted as the file it
    was writing; None if ``path`` is not such a folder."""
    if not path.is_dir() or path.is_symlink():
        return None
    names = set()
    for entry in path.iterdir():
        if not entry.is_file() or entry.is_symlink():
            return None
        leftover = LEFTOVER.fullmatch(entry.name)
        names.add(leftover[1] if leftover else entry.name)
    return names


def _is_checkpoint(path: Path) -> bool:
    names = _files(path)
    return names is not None and REQUIRED <= names <= CHECKPOINT_FILES


def _is_partial_checkpoint(path: Path) -> bool:
    names = _files(path)
    return names is not None and names <= CHECKPOINT_FILES


def _is_pointer(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size > 64:
        return False
    name = path.read_text(errors="replace").strip()
    return step_of(name) is not None and _is_checkpoint(path.parent / name)


def _is_tokenizer(path: Path) -> bool:
    names = _files(path)
    return names is not None and "tokenizer.json" in names and names <= TOKENIZER_FILES


def _is_records(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        first = f.readline()
    try:
        return not first or "step" in json.loads(first)
    except (ValueError, TypeError):
        return False


def _is_plot(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(len(PNG)) == PNG


def _is_event_folder(path: Path) -> bool:
    names = _files(path)
    return bool(names) and all(n.startswith("events.out.tfevents.") for n in names)


LAYOUTS: dict[str, Callable[[Path], bool]] = {  # an older run's entries, by name
    "latest": _is_pointer,
    "tokenizer": _is_tokenizer,
    "metrics.jsonl": _is_records,
    "metrics.png": _is_plot,
    "tensorboard": _is_event_folder,
}


def _by_layout(out: Path) -> Iterable[str]:
    """The entries of ``out`` laid out exactly as a run writes them under their names."""
    for entry in out.iterdir():
        name = entry.name
        if step_of(name) is not None:
            if _is_checkpoint(entry):
                yield name
        elif name.startswith(".tmp-") and step_of(name.removeprefix(".tmp-")) is not None:
            if _is_partial_checkpoint(entry):
                yield name
        elif name in LAYOUTS and LAYOUTS[name](entry):
            yield name
