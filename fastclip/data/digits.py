"""scikit-learn's 1,797 handwritten 8x8 digits (bundled with scikit-learn, no download)."""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch.utils.data import Dataset

from fastclip.checks import check_number
from fastclip.extras import require

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
        check_number("test_fraction", test_fraction, 0, 1, open_low=True, open_high=True)
        datasets = require("sklearn.datasets", "DigitsDataset", "fastclip-triton[digits]")
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
