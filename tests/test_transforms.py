"""CLIP preprocessing: exact hand-computed cases, Pillow's bicubic resize as the reference, every
input type, the training crop, and the argument errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import needs_cuda, require
from torch.testing import assert_close

require("PIL")
from PIL import Image

from fastclip.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    ImageTransform,
    _random_crop_box,
    denormalize,
    preprocess,
    to_tensor,
)

MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(3, 1, 1)
STD = torch.tensor(CLIP_STD, dtype=torch.float64).view(3, 1, 1)
# Pillow rounds to uint8 after each pass, so it differs from the float path by about one level.
PIL_MAX_LEVELS = 1.25  # worst pixel, in 1/255 units (measured: up to 1.03)
PIL_MEAN_LEVELS = 0.35  # mean over pixels (measured: ~0.25-0.3, uniform rounding gives 0.25)


def pixels(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """A random uint8 (h, w, channels) image."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def expected(hwc: np.ndarray) -> torch.Tensor:
    """(3, H, W) float64 (v / 255 - mean) / std of a uint8 (H, W, 3) array."""
    return (torch.tensor(hwc, dtype=torch.float64).permute(2, 0, 1) / 255 - MEAN) / STD


@pytest.mark.parametrize(
    "h, w, top, left",
    [(4, 6, 0, 1), (6, 4, 1, 0), (4, 7, 0, 2), (4, 9, 0, 2), (4, 4, 0, 0)],  # 1.5 -> 2, 2.5 -> 2
)
def test_identity_resize_crops_and_normalizes_exactly(h, w, top, left):
    """Shorter side already 4: no resampling, the crop offsets round as torchvision's."""
    img = pixels(h, w)
    ref = expected(img[top : top + 4, left : left + 4])
    assert_close(preprocess(img, 4).double(), ref, atol=1e-6, rtol=0)  # float32 rounding


@pytest.mark.parametrize("h, w, size", [(5, 9, 3), (3, 4, 7), (40, 25, 16)])
def test_constant_image_stays_constant(h, w, size):
    img = np.broadcast_to(np.array([200, 17, 90], dtype=np.uint8), (h, w, 3))
    out = preprocess(img, size)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    assert_close(out.double(), expected(img[:1, :1]).expand(3, size, size), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "h, w, size",
    [(37, 53, 24), (200, 150, 64), (300, 451, 224), (10, 17, 32), (64, 64, 48), (97, 61, 40)],
)
def test_matches_pillow_bicubic(h, w, size):
    img = pixels(h, w, seed=h * w)
    long = int(size * max(h, w) / min(h, w))
    nh, nw = (size, long) if h <= w else (long, size)
    resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
    top, left = round((nh - size) / 2), round((nw - size) / 2)
    ref = expected(resized[top : top + size, left : left + size])
    levels = ((preprocess(img, size).double() - ref) * STD * 255).abs()
    worst = np.unravel_index(int(levels.argmax()), levels.shape)
    assert levels.max() <= PIL_MAX_LEVELS, f"{levels.max():.3f}/255 off Pillow at {worst}"
    assert levels.mean() <= PIL_MEAN_LEVELS, f"mean {levels.mean():.3f}/255 off Pillow"


def test_input_types_agree():
    img = pixels(30, 41)
    chw = torch.from_numpy(img).permute(2, 0, 1)
    ref = preprocess(img, 16)
    for same in (Image.fromarray(img), chw, chw / 255.0, chw.double() / 255, img / 255.0):
        assert_close(preprocess(same, 16), ref)
    assert_close(preprocess(chw[None], 16), ref[None])
    assert_close(preprocess([img, Image.fromarray(img)], 16), torch.stack([ref, ref]))
    assert_close(to_tensor(img), chw / 255.0)


def test_grayscale_and_rgba():
    gray = pixels(20, 12, channels=1)
    rgb = preprocess(np.repeat(gray, 3, axis=2), 8)
    for same in (
        gray,
        gray[:, :, 0],
        Image.fromarray(gray[:, :, 0]),
        torch.from_numpy(gray).permute(2, 0, 1),
    ):
        assert_close(preprocess(same, 8), rgb)
    assert_close(
        to_tensor(gray[:, :, 0]), torch.from_numpy(gray).permute(2, 0, 1).expand(3, -1, -1) / 255.0
    )
    rgba = pixels(20, 12, channels=4)
    ref = preprocess(rgba[:, :, :3], 8)
    assert_close(preprocess(rgba, 8), ref)
    assert_close(preprocess(Image.fromarray(rgba, "RGBA"), 8), ref)


def test_batches_of_mixed_sizes():
    imgs = [pixels(30, 20, 1), torch.from_numpy(pixels(9, 50, 2)).permute(2, 0, 1)]
    out = preprocess(imgs, 12)
    assert out.shape == (2, 3, 12, 12) and out.dtype == torch.float32
    for row, img in zip(out, imgs, strict=True):
        assert_close(row, preprocess(img, 12))
    batch = torch.from_numpy(np.stack([pixels(15, 22, s) for s in range(3)])).permute(0, 3, 1, 2)
    assert_close(preprocess(batch, 10), torch.stack([preprocess(b, 10) for b in batch]))


def test_denormalize_inverts_preprocess():
    img = pixels(8, 8)
    assert_close(denormalize(preprocess(img, 8)), torch.from_numpy(img).permute(2, 0, 1) / 255.0)


def test_train_transform_is_seeded_and_random():
    img = pixels(60, 80)
    batch = torch.from_numpy(pixels(60, 80, 1)).permute(2, 0, 1).expand(4, -1, -1, -1)

    def run(seed, images=img):
        t = ImageTransform(
            24, train=True, scale=(0.3, 1.0), generator=torch.Generator().manual_seed(seed)
        )
        return t(images)

    assert run(0).shape == (3, 24, 24) and run(0).dtype == torch.float32
    assert_close(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    out = run(0, batch)
    assert out.shape == (4, 3, 24, 24) and not torch.equal(out[0], out[1])  # a crop per image


def test_train_full_crop_is_plain_resize():
    """scale = ratio = (1, 1) on a square image crops the whole image: the eval resize."""
    img = pixels(50, 50)
    t = ImageTransform(20, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert_close(t(img), preprocess(img, 20))
    assert_close(ImageTransform(20)(img), preprocess(img, 20))


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0), (0.5, 0.5)])
def test_crop_box_area_and_aspect(scale):
    gen, ratio = torch.Generator().manual_seed(0), (3 / 4, 4 / 3)
    for _ in range(200):
        top, left, h, w = _random_crop_box(600, 700, scale, ratio, gen)
        assert 0 <= top <= 600 - h and 0 <= left <= 700 - w
        assert scale[0] - 0.005 <= h * w / (600 * 700) <= scale[1] + 0.005
        assert ratio[0] - 0.005 <= w / h <= ratio[1] + 0.005


@pytest.mark.parametrize("h, w, box", [(10, 1000, (0, 493, 10, 13)), (1000, 10, (493, 0, 13, 10))])
def test_crop_box_falls_back_to_center(h, w, box):
    """No box this elongated fits: the center crop, aspect clamped to 4/3 (or 3/4)."""
    gen = torch.Generator().manual_seed(0)
    assert _random_crop_box(h, w, (0.9, 1.0), (3 / 4, 4 / 3), gen) == box


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: preprocess("cat.jpg"), TypeError, "images must be"),
        (lambda: preprocess([]), ValueError, "images is an empty list"),
        (lambda: preprocess([pixels(4, 4), 3]), TypeError, r"images\[1\]"),
        (lambda: preprocess(pixels(4, 4, channels=2)), ValueError, "images as an array"),
        (lambda: preprocess(pixels(4, 4).astype(np.int32)), TypeError, "uint8 or float array"),
        (lambda: preprocess(torch.zeros(4, 4, 3)), ValueError, "C = 1 or 3"),
        (lambda: preprocess(torch.zeros(3, 4, 4, dtype=torch.int64)), TypeError, "int64"),
        (lambda: preprocess(torch.full((3, 4, 4), 255.0)), ValueError, r"\[0, 1\]"),
        (lambda: preprocess(torch.zeros(3, 0, 4)), ValueError, "images is empty"),
        (lambda: preprocess(pixels(4, 4), 0), ValueError, "size must be >= 1"),
        (lambda: preprocess(pixels(4, 4), 2.5), TypeError, "size must be an int"),
        (lambda: preprocess(pixels(4, 4), mean=(0.5, 0.5)), ValueError, "mean must be"),
        (lambda: preprocess(pixels(4, 4), std=(1, 0, 1)), ValueError, "std must be positive"),
        (lambda: ImageTransform(8, train=True, scale=(0.9, 0.5)), ValueError, "scale must"),
        (lambda: ImageTransform(8, scale=(0.0, 1.0)), ValueError, "scale must"),
        (lambda: ImageTransform(8, ratio=(2.0,)), ValueError, "ratio must be a pair"),
        (lambda: ImageTransform(8, generator=0), TypeError, "generator must"),
        (lambda: denormalize(torch.zeros(4, 8, 8)), ValueError, "x must be"),
    ],
)
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_imports_without_pillow():
    code = (
        "import sys; sys.modules['PIL'] = None; import fastclip.transforms as t; print(t.CLIP_MEAN)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@needs_cuda
def test_cuda_matches_cpu():
    img = torch.from_numpy(pixels(45, 70)).permute(2, 0, 1)
    out = preprocess(img.cuda(), 32)
    assert out.is_cuda
    assert_close(out.cpu(), preprocess(img, 32), atol=1e-4, rtol=0)
