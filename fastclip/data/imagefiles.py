"""Image-caption pairs from image files: decoding them, a CSV table that lists them with their
captions, and batching that drops bad samples."""

from __future__ import annotations

import csv
import importlib
import io
import operator
import warnings
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch.utils.data import Dataset


def require(module: str, user: str, install: str) -> ModuleType:
    """Import an optional dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{user} needs {module.split('.')[0]}: pip install {install}") from e


def decode_image(data: bytes | str | Path, *, name: str | None = None) -> torch.Tensor:
    """Encoded image bytes, or a file path, as uint8 RGB (3, H, W). Raises ValueError naming the
    source (``name``, else the path or the byte count) if undecodable, FileNotFoundError if the
    path does not exist."""
    Image = require("PIL.Image", "decode_image", "pillow")
    is_bytes = isinstance(data, (bytes, bytearray, memoryview))
    source = name or (f"<{len(data)} bytes>" if is_bytes else str(data))
    try:
        with Image.open(io.BytesIO(data) if is_bytes else data) as img:
            array = np.asarray(img.convert("RGB"))  # (H, W, 3); convert() loads every byte
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image {source}: {e}") from e
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class CsvPairs(Dataset):
    """(image, caption) pairs from a CSV with an image path column and a caption column; paths
    are relative to ``root`` (default: the CSV's folder).

    An image that is missing or undecodable, or an empty caption, makes ``__getitem__`` return
    None (counted in ``skipped`` / ``skip_reasons``, with a warning): batch with
    ``collate_pairs``, which drops them, so a bad file never stops training.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        image_key: str = "filepath",
        caption_key: str = "caption",
        root: str | Path | None = None,
        delimiter: str = ",",
    ):
        path = Path(path)
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = reader.fieldnames or []
            missing = [k for k in (image_key, caption_key) if k not in header]
            if missing:
                raise ValueError(
                    f"{path} has no column {', '.join(map(repr, missing))} (image_key="
                    f"{image_key!r}, caption_key={caption_key!r}); its header is {header}"
                )
            rows = [(row[image_key] or "", row[caption_key] or "") for row in reader]
        self.root = path.parent if root is None else Path(root)
        self.paths = [self.root / p for p, _ in rows]  # an absolute path stays as it is
        self.captions = [c.strip() for _, c in rows]
        self.skipped, self.skip_reasons = 0, Counter()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str] | None:
        i = range(len(self))[operator.index(index)]
        why = "empty caption" if not self.captions[i] else None
        try:
            image = None if why else decode_image(self.paths[i])
        except FileNotFoundError:
            why = "missing image"
        except ValueError:
            why = "undecodable image"
        if why is None:
            return image, self.captions[i]
        self.skipped += 1
        self.skip_reasons[why] += 1
        warnings.warn(f"CsvPairs skipped row {i} ({self.paths[i]}): {why}", stacklevel=2)
        return None


def collate_pairs(batch: list) -> tuple[list[torch.Tensor], list[str]]:
    """DataLoader ``collate_fn``: drop None items (bad samples), return (images, captions) as
    lists (image sizes may differ). Both are empty if every item was bad."""
    kept = [item for item in batch if item is not None]
    return [image for image, _ in kept], [caption for _, caption in kept]
