"""Image-caption datasets for CLIP training and zero-shot evaluation.

Every dataset yields ``(image, caption)``: a uint8 RGB tensor (3, H, W) and a str. The training
loop applies ``fastclip.transforms.ImageTransform`` and the tokenizer itself.

- ``ShapesDataset``: generated coloured shapes and their spatial relations (no download). Splits
  "train", "test" (retrieval), "zeroshot" (seen colour-shape pairs) and "compositional"
  (``HELD_OUT`` pairs, never drawn in training).
- ``DigitsDataset``: scikit-learn's 1,797 handwritten 8x8 digits (bundled, no download).
- ``WebDatasetPairs`` / ``write_shards``: img2dataset-style tar shards (``key.jpg`` + ``key.txt``).
- ``CsvPairs``: a CSV of image paths and captions.

Bad samples never crash training: shards skip them, ``CsvPairs`` returns None for them and
``collate_pairs`` drops the Nones. Both count them in ``skipped`` (by reason in ``skip_reasons``)
and warn. With DataLoader workers, each worker counts its own.
"""

from __future__ import annotations

import csv
import functools
import importlib
import io
import operator
import random
import tarfile
import warnings
from collections import Counter, namedtuple
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from fastclip.transforms import to_tensor

# ---------------------------------------------------------------------------------------------
# Generated coloured shapes

COLOURS = {  # pairwise RGB distance >= 75; drawn shaded by a factor in [0.85, 1]
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (235, 215, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "purple": (150, 60, 200),
    "white": (235, 235, 235),
}
_MASKS = {  # offsets (dx, dy) from the centre, radius r -> the shape's pixels; all span 2r
    "circle": lambda dx, dy, r: dx**2 + dy**2 <= r**2,
    "square": lambda dx, dy, r: np.maximum(abs(dx), abs(dy)) <= 0.85 * r,
    "triangle": lambda dx, dy, r: (dy <= r) & (abs(dx) <= (dy + r) / 2),  # apex up
    "cross": lambda dx, dy, r: (
        (np.maximum(abs(dx), abs(dy)) <= r) & (np.minimum(abs(dx), abs(dy)) <= r / 3)
    ),
}
SHAPES = tuple(_MASKS)
RELATIONS = ("above", "below", "to the left of", "to the right of")
# Never drawn in train/test/zeroshot; every colour and shape still appears with other partners.
HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "cross"), ("purple", "square"))
PAIRS = [(colour, shape) for colour in COLOURS for shape in SHAPES]  # CLASSNAMES' order
_SEEN = [p for p in PAIRS if p not in HELD_OUT]
_OTHER_COLOUR = {c: [p for p in _SEEN if p[0] != c] for c in COLOURS}  # a second object's pairs


def _phrase(colour: str, shape: str) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


CLASSNAMES = [_phrase(*p) for p in PAIRS]  # the zero-shot classes: "a red circle", ...
TEMPLATES = ("{}.", "a photo of {}.", "a drawing of {}.", "an image of {}.")  # zero-shot prompts
CAPTIONS = ("{}", "a photo of {}", "a picture of {}", "{} on a black background")  # training
SPLITS = {"train": 20000, "test": 1000, "zeroshot": 1000, "compositional": 1000}  # default sizes
NOISE_SHIFT = 3  # background noise: random bytes >> 3, so 0..31 (dark)

_Object = namedtuple("_Object", "colour shape x y r rgb")
_Scene = namedtuple("_Scene", "objects caption label noise_seed")


def _scene(seed: int, split: str, index: int, size: int) -> _Scene:
    """Item ``index`` of a split, from its own RNG: the same whatever the access order."""
    rng, s = random.Random(f"shapes/{seed}/{split}/{index}"), size / 32  # s: pixels per unit
    if split in ("zeroshot", "compositional"):  # classes in turn: balanced
        pool = _SEEN if split == "zeroshot" else HELD_OUT
        pairs = [pool[index % len(pool)]]
    else:
        pairs = [rng.choice(_SEEN)]
        if split == "test" or rng.random() < 0.5:  # a second object of another colour
            pairs.append(rng.choice(_OTHER_COLOUR[pairs[0][0]]))
    rgb = [tuple(round(v * rng.uniform(0.85, 1)) for v in COLOURS[c]) for c, _ in pairs]  # shade
    if len(pairs) == 1:  # 10-16 px across (at 32 px), anywhere inside a 1 px margin
        r = rng.uniform(5, 8) * s
        x, y = (rng.uniform(r + s, size - r - s) for _ in range(2))
        objects = [_Object(*pairs[0], x, y, r, rgb[0])]
        text, label = _phrase(*pairs[0]), PAIRS.index(pairs[0])
    else:  # 10-13 px across, >= 3 px apart along the relation's axis, <= 4 px off its line
        relation = rng.choice(RELATIONS)
        r = [rng.uniform(5, 6.5) * s for _ in pairs]
        first = 0 if relation in ("above", "to the left of") else 1  # the one at smaller x or y
        r1, r2 = r[first], r[1 - first]
        slack = size - 2 * s - (2 * r1 + 2 * r2 + 3 * s)
        lead = rng.uniform(0, slack)
        along = [s + lead + r1, s + lead + 2 * r1 + 3 * s + rng.uniform(0, slack - lead) + r2]
        if first:
            along.reverse()
        centre = rng.uniform(9.5 * s, size - 9.5 * s)
        across = [centre + rng.uniform(-2, 2) * s for _ in pairs]
        objects = []
        for pair, a, c, radius, colour in zip(pairs, along, across, r, rgb, strict=True):
            x, y = (c, a) if relation in ("above", "below") else (a, c)
            objects.append(_Object(*pair, x, y, radius, colour))
        text, label = f"{_phrase(*pairs[0])} {relation} {_phrase(*pairs[1])}", -1
    return _Scene(objects, rng.choice(CAPTIONS).format(text), label, rng.getrandbits(32))


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> np.ndarray:
    return np.mgrid[:size, :size] + 0.5  # (2, H, W): y, x


def _render(scene: _Scene, size: int) -> torch.Tensor:
    """The scene as uint8 (3, size, size): filled shapes on dark noise."""
    noise = random.Random(scene.noise_seed).randbytes(3 * size * size)
    image = np.frombuffer(noise, np.uint8).reshape(3, size, size) >> NOISE_SHIFT  # (3, H, W)
    ys, xs = _pixel_centres(size)  # (H, W) each
    for obj in scene.objects:
        mask = _MASKS[obj.shape](xs - obj.x, ys - obj.y, obj.r)  # (H, W)
        image = np.where(mask, np.array(obj.rgb, np.uint8)[:, None, None], image)
    return torch.from_numpy(image)


class ShapesDataset(Dataset):
    """Coloured shapes on a dark background, captioned ("a photo of a red circle", "a blue
    square below an orange cross"). Item i is generated from (seed, split, i) alone.

    Splits (default sizes in ``SPLITS``): "train" (1 or 2 objects, no ``HELD_OUT`` pair), "test"
    (2 objects, another random stream: retrieval), "zeroshot" (1 object of a seen pair),
    "compositional" (1 object of a ``HELD_OUT`` pair). ``labels[i]`` indexes ``classnames`` for one
    object, -1 for two; ``captions`` lists every caption without drawing.
    """

    classnames, templates = CLASSNAMES, TEMPLATES

    def __init__(
        self, split: str = "train", n: int | None = None, *, image_size: int = 32, seed: int = 0
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        n = SPLITS[split] if n is None else n
        for name, value, low in (("n", n, 1), ("image_size", image_size, 16)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.split, self.image_size, self.seed = split, image_size, seed
        self._scenes = [_scene(seed, split, i, image_size) for i in range(n)]
        self.captions = [s.caption for s in self._scenes]
        self.labels = [s.label for s in self._scenes]

    def __len__(self) -> int:
        return len(self._scenes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scene = self._scenes[range(len(self))[operator.index(index)]]  # IndexError past the end
        return _render(scene, self.image_size), scene.caption


# ---------------------------------------------------------------------------------------------
# scikit-learn's handwritten digits

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_CLASSNAMES = list(DIGIT_WORDS)
DIGIT_CAPTIONS = (  # training captions: {word} "seven", {num} "7"
    "a handwritten {word}",
    "the number {num}",
    "a photo of the digit {word}",
    "{num}",
    "the digit {num}",
    "a scanned {word}",
    "{word}",
    "the handwritten number {word}",
)
DIGIT_TEMPLATES = (  # zero-shot prompts, worded unlike every training caption
    "a blurry image of the number {}.",
    "a low resolution scan of the digit {}.",
    "{}, written by hand.",
    "the symbol for {}.",
)


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 digits as uint8 (3, 8, 8) grey images (0-16 scaled to 0-255).

    A permutation drawn from ``seed`` puts ``round(test_fraction * 1797)`` images in "test", the
    rest in "train" (each kept in the original order). Captions come from ``DIGIT_CAPTIONS``, one
    per image fixed by (seed, image); ``templates`` (``DIGIT_TEMPLATES``) are held out from them.
    """

    classnames, templates = DIGIT_CLASSNAMES, DIGIT_TEMPLATES

    def __init__(self, split: str = "train", *, seed: int = 0, test_fraction: float = 0.2):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
        datasets = _require("sklearn.datasets", "DigitsDataset", "fastclip-triton[digits]")
        digits = datasets.load_digits()
        count = len(digits.target)
        order = np.random.default_rng([seed, 0]).permutation(count)
        n_test = round(test_fraction * count)
        if not 0 < n_test < count:
            raise ValueError(f"test_fraction {test_fraction} leaves a split of {count} empty")
        self.indices = np.sort(order[:n_test] if split == "test" else order[n_test:]).tolist()
        pixels = np.round(digits.images[self.indices] * (255 / 16)).astype(np.uint8)
        self.images = torch.from_numpy(pixels)  # (N, 8, 8)
        self.labels = digits.target[self.indices].tolist()
        choice = np.random.default_rng([seed, 1]).integers(len(DIGIT_CAPTIONS), size=count)
        self.captions = [
            DIGIT_CAPTIONS[choice[i]].format(word=DIGIT_WORDS[y], num=y)
            for i, y in zip(self.indices, self.labels, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        i = range(len(self))[operator.index(index)]
        return self.images[i].expand(3, -1, -1).contiguous(), self.captions[i]


# ---------------------------------------------------------------------------------------------
# Files: decoding, tar shards, CSV

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # image members of a shard sample, by priority
_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


def _require(module: str, user: str, install: str):
    """Import an optional dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{user} needs {module.split('.')[0]}: pip install {install}") from e


def decode_image(data: bytes | str | Path, *, name: str | None = None) -> torch.Tensor:
    """Encoded image bytes, or a file path, as uint8 RGB (3, H, W). Raises ValueError naming the
    source (``name``, else the path or the byte count) if undecodable, FileNotFoundError if the
    path does not exist."""
    Image = _require("PIL.Image", "decode_image", "pillow")
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


class WebDatasetPairs(IterableDataset):
    """(image, caption) pairs streamed from tar shards as img2dataset writes them: each sample
    ``key.jpg`` (or png/jpeg/webp) and ``key.txt``. ``urls``: paths or URLs, brace patterns
    allowed ("data/{000000..000099}.tar").

    Shards are split across torch.distributed ranks, then DataLoader workers (a process with no
    shard yields nothing: use at least ranks x workers shards). ``shuffle`` > 0 shuffles the
    shard order and then samples in a buffer of that size, from ``seed`` and ``set_epoch``'s
    epoch: every pass reads the same order until the epoch changes. Bad samples (undecodable
    image, missing image or caption, empty caption) and unreadable shards are skipped, counted
    in ``skipped`` / ``skip_reasons`` and summarised by a warning at the end of each pass.
    """

    def __init__(self, urls: str | Path | list[str | Path], *, shuffle: int = 0, seed: int = 0):
        wds = _require("webdataset", "WebDatasetPairs", "fastclip-triton[webdataset]")
        urls = [urls] if isinstance(urls, (str, Path)) else list(urls)
        self.urls = [u for url in urls for u in wds.shardlists.expand_urls(str(url))]
        if not self.urls:
            raise ValueError("urls names no shard")
        if isinstance(shuffle, bool) or not isinstance(shuffle, int) or shuffle < 0:
            raise ValueError(f"shuffle must be an int >= 0 (a buffer size), got {shuffle!r}")
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.skipped, self.skip_reasons = 0, Counter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        wds = _require("webdataset", "WebDatasetPairs", "fastclip-triton[webdataset]")
        reasons, kept = Counter(), 0

        def unreadable(error: Exception) -> bool:  # a broken tar: keep what was read, go on
            reasons[f"unreadable shard ({type(error).__name__})"] += 1
            return True

        order_seed = f"{self.seed}/{self.epoch}" if self.shuffle else None
        stages = [wds.SimpleShardList(self.urls, seed=order_seed), wds.split_by_node]
        stages += [wds.split_by_worker, wds.tarfile_to_samples(handler=unreadable)]
        if self.shuffle:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            seed = f"{self.seed}/{self.epoch}/{rank}/{worker}"
            stages.append(wds.shuffle(self.shuffle, seed=seed))
        for sample in wds.DataPipeline(*stages):
            pair, why = _shard_pair(sample)
            if pair is None:
                reasons[why] += 1
            else:
                kept += 1
                yield pair
        self.skipped += sum(reasons.values())
        self.skip_reasons.update(reasons)
        if reasons:
            counts = ", ".join(f"{n} {why}" for why, n in reasons.most_common())
            warnings.warn(f"WebDatasetPairs read {kept} samples, skipped {counts}", stacklevel=2)


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
    if isinstance(per_shard, bool) or not isinstance(per_shard, int) or per_shard < 1:
        raise ValueError(f"per_shard must be an int >= 1, got {per_shard!r}")
    Image = _require("PIL.Image", "write_shards", "pillow")
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
