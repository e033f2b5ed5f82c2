"""Image-caption pairs from image files: decoding them, a CSV table that lists them with their
captions, and batching that drops bad samples."""

from __future__ import annotations

import codecs
import csv
import io
import operator
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fastclip.extras import require


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


class PairTable(Dataset):
    """Rows of (image, caption) decoded on access, images from files or encoded bytes. A row
    whose image is missing or undecodable, or whose caption is empty, gives None (counted in
    ``skipped`` / ``skip_reasons``, with a warning): batch with ``collate_pairs``, which drops
    them, so a bad file never stops training. Subclasses say what a row holds (``row``)."""

    def __init__(self) -> None:
        self.skipped, self.skip_reasons = 0, Counter()

    def row(self, i: int) -> tuple[bytes | Path | str | None, str, str]:
        """Row ``i``'s image (a path, encoded bytes, or None if it has none), its caption, and
        how a warning names the row."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str] | None:
        i = range(len(self))[operator.index(index)]
        data, caption, name = self.row(i)
        why = "empty caption" if not caption else "missing image" if data is None else None
        try:
            image = None if why else decode_image(data, name=name)
        except FileNotFoundError:
            why = "missing image"
        except ValueError:
            why = "undecodable image"
        if why is None:
            return image, caption
        self.skipped += 1
        self.skip_reasons[why] += 1
        warnings.warn(f"{type(self).__name__} skipped row {i} ({name}): {why}", stacklevel=2)
        return None


class CsvPairs(PairTable):
    """(image, caption) pairs from a CSV with an image path column and a caption column; paths
    are relative to ``root`` (default: the CSV's folder). Bad rows give None (``PairTable``)."""

    def __init__(
        self,
        path: str | Path,
        *,
        image_key: str = "filepath",
        caption_key: str = "caption",
        root: str | Path | None = None,
        delimiter: str = ",",
    ):
        super().__init__()
        path = Path(path)
        reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""), delimiter=delimiter)
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

    def __len__(self) -> int:
        return len(self.paths)

    def row(self, i: int) -> tuple[Path, str, str]:
        """Row ``i``'s image path, caption, and the path again to name it."""
        return self.paths[i], self.captions[i], str(self.paths[i])


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file (a byte-order mark dropped); a ValueError naming the file, the
    line and the column of the first byte that is not UTF-8."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise ValueError(
            f"{path}, line {line}, column {column}: byte 0x{data[e.start]:02x} is not UTF-8 "
            "(save the file as UTF-8)"
        ) from None


def collate_pairs(batch: list) -> tuple[list[torch.Tensor], list[str]]:
    """DataLoader ``collate_fn``: drop None items (bad samples), return (images, captions) as
    lists (image sizes may differ). Both are empty if every item was bad."""
    kept = [item for item in batch if item is not None]
    return [image for image, _ in kept], [caption for _, caption in kept]
