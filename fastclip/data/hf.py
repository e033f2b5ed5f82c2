"""Hugging Face ``datasets`` as a data source: ``--data hf:<path or name>[:split]``.

- A directory ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` wrote is read with
  ``datasets.load_from_disk``.
- Anything else, a folder of data files (parquet, CSV, JSON, images) or a dataset's name on the
  Hub, goes to ``datasets.load_dataset``, which reads its cache (``HF_HOME``; without a
  connection under ``HF_HUB_OFFLINE=1``) and downloads what it lacks.

The split defaults to "train". The image column holds ``datasets.Image`` values, decoded here
so that a bad image is skipped rather than fatal, or image file paths; the caption column holds
strings.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from fastclip.data.imagefiles import PairTable
from fastclip.extras import require

SAVED = ("dataset_dict.json", "state.json")  # what save_to_disk writes: one means a saved dataset
DEFAULT_SPLIT = "train"


class HfPairs(PairTable):
    """(image, caption) pairs from a ``datasets`` dataset (``spec``: "path or name[:split]"):
    ``image_key`` and ``caption_key`` name its columns. Bad rows give None (``PairTable``)."""

    def __init__(self, spec: str, *, image_key: str = "image", caption_key: str = "text"):
        super().__init__()
        datasets = require("datasets", "hf: data", '"fastclip-triton[datasets]"')
        source, _, split = spec.partition(":")
        data = _load(datasets, source, split)
        missing = [k for k in (image_key, caption_key) if k not in data.column_names]
        if missing:
            raise ValueError(
                f"{source} has no column {', '.join(map(repr, missing))} (image_key="
                f"{image_key!r}, caption_key={caption_key!r}); its columns are {data.column_names}"
            )
        image, caption = data.features[image_key], data.features[caption_key]
        if isinstance(image, datasets.Image):
            data = data.cast_column(image_key, datasets.Image(decode=False))  # {bytes, path}
        elif not _is_text(image):
            raise ValueError(f"column {image_key!r} of {source} holds {image}, not images or paths")
        if not _is_text(caption):
            raise ValueError(f"column {caption_key!r} of {source} holds {caption}, not strings")
        self.data = data.select_columns([image_key, caption_key])
        self.source, self.image_key, self.caption_key = source, image_key, caption_key

    def __len__(self) -> int:
        return len(self.data)

    @property
    def captions(self) -> Iterable[str]:
        """Every caption, without decoding images (an iterable column)."""
        return self.data[self.caption_key]

    def row(self, i: int) -> tuple[bytes | str | None, str, str]:
        """Row ``i``'s encoded image (or its path), caption, and ``source[i]`` to name it."""
        item = self.data[i]
        image = item[self.image_key]
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        return image, (item[self.caption_key] or "").strip(), f"{self.source}[{i}]"


def _load(datasets: ModuleType, source: str, split: str):
    """The split of the dataset ``source`` names (a ``datasets.Dataset``)."""
    if not any((Path(source) / name).is_file() for name in SAVED):
        return datasets.load_dataset(source, split=split or DEFAULT_SPLIT)
    data = datasets.load_from_disk(source)
    if isinstance(data, datasets.DatasetDict):
        name = split or DEFAULT_SPLIT
        if name not in data:
            raise ValueError(
                f"{source} has no split {name!r}: use hf:{source}:<split>, one of {list(data)}"
            )
        return data[name]
    if split:
        raise ValueError(f"{source} holds one saved dataset, not splits: drop :{split}")
    return data


def _is_text(feature: object) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")
