"""Generated coloured shapes and their spatial relations, captioned (no download).

Splits "train", "test" (retrieval), "zeroshot" (seen colour-shape pairs) and "compositional"
(``HELD_OUT`` pairs, never drawn in training). Item i of a split is generated from (seed, split, i)
alone, so any order of access gives the same images.
"""

from __future__ import annotations

import functools
import operator
import random
from collections import namedtuple

import numpy as np
import torch
from torch.utils.data import Dataset

from fastclip.checks import check_number

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
        check_number("n", n, 1, integer=True)
        check_number("image_size", image_size, 16, integer=True)
        self.split, self.image_size, self.seed = split, image_size, seed
        self._scenes = [_scene(seed, split, i, image_size) for i in range(n)]
        self.captions = [s.caption for s in self._scenes]
        self.labels = [s.label for s in self._scenes]

    def __len__(self) -> int:
        return len(self._scenes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scene = self._scenes[range(len(self))[operator.index(index)]]  # IndexError past the end
        return _render(scene, self.image_size), scene.caption
