"""img2dataset-style tar shards: each sample ``key.jpg`` (or png/jpeg/webp) and ``key.txt``."""

from __future__ import annotations

import io
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch.utils.data import IterableDataset

from fastclip.checks import check_number
from fastclip.data.imagefiles import decode_image
from fastclip.extras import require
from fastclip.transforms import to_tensor

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # image members of a shard sample, by priority
_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


class WebDatasetPairs(IterableDataset):
    """(image, caption) pairs streamed from tar shards as img2dataset writes them: each sample
    ``key.jpg`` (or png/jpeg/webp) and ``key.txt``. ``urls``: paths or URLs, brace patterns
    allowed ("data/{000000..000099}.tar").

    Shards are split across torch.distributed ranks, then DataLoader workers (a process with no
    shard yields nothing: use at least ranks x workers shards). ``shuffle`` > 0 shuffles the
    shard order and then samples in a buffer of that size, from ``seed`` and ``set_epoch``'s
    epoch: every pass reads the same order until the epoch changes. Bad samples (undecodable
    image, missing image or caption, empty caption) and unreadable shards (the samples before the
    break kept) are skipped, counted in ``skipped`` / ``skip_reasons`` as they are met, and
    summarised by a warning at the end of each pass. A bad sample counts at every pass that meets
    it, an unreadable shard once: its URL goes into ``unreadable`` (each DataLoader worker keeps
    its own counts and set; the union of the workers' sets is the run's bad shards).
    """

    def __init__(self, urls: str | Path | list[str | Path], *, shuffle: int = 0, seed: int = 0):
        wds = require("webdataset", "WebDatasetPairs", "fastclip-triton[webdataset]")
        urls = [urls] if isinstance(urls, (str, Path)) else list(urls)
        self.urls = [u for url in urls for u in wds.shardlists.expand_urls(str(url))]
        if not self.urls:
            raise ValueError("urls names no shard")
        check_number("shuffle", shuffle, 0, integer=True)  # a buffer size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.skipped, self.skip_reasons = 0, Counter()
        self.unreadable = set()  # the URLs of the shards found unreadable, each counted once

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        wds = require("webdataset", "WebDatasetPairs", "fastclip-triton[webdataset]")
        reasons, kept = Counter(), 0  # this pass's

        def skip(why: str, shard: str | None = None) -> None:  # counted as it happens
            reasons[why] += 1
            if shard is not None:  # an unreadable shard: once, whatever the pass
                if shard in self.unreadable:
                    return
                self.unreadable.add(shard)
            self.skipped += 1
            self.skip_reasons[why] += 1

        order_seed = f"{self.seed}/{self.epoch}" if self.shuffle else None
        stages = [wds.SimpleShardList(self.urls, seed=order_seed), wds.split_by_node]
        stages += [wds.split_by_worker, lambda shards: _read_shards(wds, shards, skip)]
        if self.shuffle:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            seed = f"{self.seed}/{self.epoch}/{rank}/{worker}"
            stages.append(wds.shuffle(self.shuffle, seed=seed))
        for sample in wds.DataPipeline(*stages):
            pair, why = _shard_pair(sample)
            if pair is None:
                skip(why)
            else:
                kept += 1
                yield pair
        if reasons:
            counts = ", ".join(f"{n} {why}" for why, n in reasons.most_common())
            warnings.warn(f"WebDatasetPairs read {kept} samples, skipped {counts}", stacklevel=2)


def _read_shards(wds: ModuleType, shards: Iterable[dict], skip: Callable) -> Iterator[dict]:
    """The samples of each shard ({"url": ...}) as far as it reads: its first error (a missing
    file, a truncated or corrupt tar) ends that shard, whose samples so far are kept (a tar
    stream cannot resume past a broken member), and is reported once: ``skip(why, url)``."""
    errors = []

    def stop(error: Exception) -> bool:
        errors.append(error)
        return False

    for shard in shards:
        errors.clear()
        yield from wds.tarfile_samples([shard], handler=stop)
        if errors:
            skip(f"unreadable shard ({type(errors[0]).__name__})", shard["url"])


def _shard_pair(sample: dict) -> tuple[tuple[torch.Tensor, str] | None, str]:
    """A shard sample's (image, caption), or None and why not."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        return None, "missing image"
    if "txt" not in sample:
        return None, "missing caption"
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "caption not utf-8"
    if not caption:
        return None, "empty caption"
    try:
        image = decode_image(sample[ext], name=f"{sample.get('__url__')}:{sample['__key__']}")
    except ValueError:
        return None, "undecodable image"
    return (image, caption), ""


def write_shards(
    samples: Iterable[tuple[torch.Tensor | np.ndarray, str]],
    directory: str | Path,
    *,
    per_shard: int = 1000,
    image_format: str = "png",
) -> list[Path]:
    """Write (image, caption) pairs as tar shards ``000000.tar``, ``000001.tar``, ... of
    ``per_shard`` samples (``key.png`` + ``key.txt``) that ``WebDatasetPairs`` reads. An image is
    a (3, H, W) or (1, H, W) tensor, an (H, W) or (H, W, 3) array, uint8 or float in [0, 1].
    ``image_format``: "png" (lossless), "jpg" (quality 95) or "webp". Returns the shard paths."""
    if image_format not in _FORMATS:
        raise ValueError(f"image_format must be one of {list(_FORMATS)}, got {image_format!r}")
    check_number("per_shard", per_shard, 1, integer=True)
    Image = require("PIL.Image", "write_shards", "pillow")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths, tar = [], None
    try:
        for i, (image, caption) in enumerate(samples):
            x = to_tensor(image, f"samples[{i}] image")
            if x.dim() != 3:
                raise ValueError(f"samples[{i}] image must be one image, got {tuple(x.shape)}")
            if i % per_shard == 0:
                if tar is not None:
                    tar.close()
                paths.append(directory / f"{len(paths):06d}.tar")
                tar = tarfile.open(paths[-1], "w")
            pixels = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
            encoded = io.BytesIO()
            Image.fromarray(pixels).save(encoded, _FORMATS[image_format], quality=95)
            for member, data in ((image_format, encoded.getvalue()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{i:09d}.{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    finally:
        if tar is not None:
            tar.close()
    return paths
