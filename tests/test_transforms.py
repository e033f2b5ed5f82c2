"""CLIP preprocessing: exact hand-computed cases, open_clip's transforms rebuilt from Pillow's own
operations as the reference for PIL images of every mode and shape, Pillow's bicubic resize as the
reference for arrays, every input type, the training crop, and the argument errors."""

from __future__ import annotations

import math
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
# PIL images take Pillow's own path, so they match open_clip's pixels (measured: 0 levels, up to
# float32 rounding); the contract is at most one level.
OPEN_CLIP_LEVELS = 1.0  # worst pixel, in 1/255 units
# Arrays take the float path; Pillow rounds to uint8 after each pass, about one level apart.
PIL_MAX_LEVELS = 1.25  # worst pixel, in 1/255 units (measured: up to 1.03)
PIL_MEAN_LEVELS = 0.35  # mean over pixels (measured: ~0.25-0.3, uniform rounding gives 0.25)
PILLOW_13 = int(Image.__version__.split(".")[0]) >= 13  # picks the pass order per shape
MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "I", "I;16", "F", "HSV"]
SHAPES = {  # name: (height, width, size)
    "tiny": (3, 2, 4),
    "smaller than the crop": (10, 17, 32),
    "odd": (97, 61, 40),
    "square": (64, 64, 48),
    "tall": (2000, 300, 224),
    "wide": (300, 2000, 224),
    "huge": (3000, 4000, 224),
    "exact": (24, 37, 24),  # already the size: no resize
}


def pixels(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """A random uint8 (h, w, channels) image."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def expected(hwc: np.ndarray) -> torch.Tensor:
    """(3, H, W) float64 (v / 255 - mean) / std of a uint8 (H, W, 3) array."""
    return (torch.tensor(hwc, dtype=torch.float64).permute(2, 0, 1) / 255 - MEAN) / STD


def image(mode: str, h: int, w: int, seed: int = 0) -> Image.Image:
    """A PIL image of ``mode``: noise over stripes (edges that make bicubic overshoot), alpha
    varying per pixel, a 40-color palette, ``I`` and ``F`` values beyond 0-255, ``I;16`` beyond
    255."""
    rng = np.random.default_rng(seed)
    stripes = np.where((np.arange(w) // max(1, w // 5)) % 2 == 0, 255, 0).astype(np.uint16)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[:, :, :3] = (3 * stripes[:, None] + 2 * rgba[:, :, :3].astype(np.uint16)) // 5
    rgb, first = Image.fromarray(rgba[:, :, :3]), rgba[:, :, 0]
    alpha = Image.fromarray(rgba[:, :, 3])
    palette = Image.fromarray(first % 40, "L").convert("P")
    palette.putpalette(rng.integers(0, 256, 40 * 3, dtype=np.uint8).tobytes())
    made = {
        "P": lambda: palette,
        "PA": lambda: palette.convert("PA"),
        "LA": lambda: rgb.convert("LA"),
        "RGBA": lambda: rgb.convert("RGBA"),
        "I": lambda: Image.fromarray(first.astype(np.int32) * 3 - 200),
        "F": lambda: Image.fromarray(first.astype(np.float32) * 1.4 - 60),
        "I;16": lambda: Image.fromarray(first.astype(np.uint16) * 200),
    }
    img = made[mode]() if mode in made else rgb.convert(mode)
    if mode in ("RGBA", "LA", "PA"):
        img.putalpha(alpha)
    return img


def open_clip_eval(img: Image.Image, size: int) -> torch.Tensor:
    """open_clip's evaluation transform from Pillow's own operations, in its order (float64):
    torchvision's Resize(size) on a PIL image (``Image.resize``, bicubic; the shorter side to
    size, the longer to int(size * long / short); no call when the size is already that), its
    CenterCrop (offsets int(round((d - size) / 2))), convert("RGB"), ToTensor, Normalize."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    nw, nh = (size, int(size * long / short)) if w <= h else (int(size * long / short), size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return expected(np.array(img.crop((left, top, left + size, top + size)).convert("RGB")))


def open_clip_train(img: Image.Image, size: int, scale) -> torch.Tensor:
    """open_clip's training transform from Pillow's own operations (float64): torchvision's
    RandomResizedCrop(size, scale, ratio=(3/4, 4/3), bicubic) drawing from the global RNG, then
    convert("RGB"), ToTensor, Normalize."""
    w, h = img.size
    log_ratio = torch.log(torch.tensor((3 / 4, 4 / 3)))
    box = None
    for _ in range(10):
        target = w * h * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = torch.randint(0, h - ch + 1, size=(1,)).item()
            left = torch.randint(0, w - cw + 1, size=(1,)).item()
            box = (left, top, left + cw, top + ch)
            break
    if box is None:  # no box fits: the center crop, aspect clamped to the ratio
        cw, ch = w, h
        if w / h < 3 / 4:
            ch = int(round(w / (3 / 4)))
        elif w / h > 4 / 3:
            cw = int(round(h * 4 / 3))
        box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
    img = img.crop(box)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return expected(np.array(img.convert("RGB")))


def assert_levels(out: torch.Tensor, ref: torch.Tensor, limit: float, what: str) -> None:
    """Normalized outputs at most ``limit`` levels (1/255, before normalization) apart."""
    levels = ((out.double() - ref) * STD * 255).abs()
    worst = np.unravel_index(int(levels.argmax()), levels.shape)
    over = int((levels > limit).sum())
    assert levels.max() <= limit, (
        f"{what}: {over} of {levels.numel()} values over {limit}/255, worst "
        f"{levels.max():.3f}/255 at {worst}"
    )


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
    [
        (37, 53, 24),
        (200, 150, 64),
        (300, 451, 224),
        (10, 17, 32),
        (64, 64, 48),
        (97, 61, 40),
        (300, 2000, 224),
        pytest.param(
            2000, 300, 224, marks=pytest.mark.skipif(not PILLOW_13, reason="Pillow < 13")
        ),  # Pillow 13 takes the height pass first here
        pytest.param(400, 60, 45, marks=pytest.mark.skipif(not PILLOW_13, reason="Pillow < 13")),
    ],
)
def test_matches_pillow_bicubic(h, w, size):
    """Arrays take the float path: within about a level of Pillow's uint8 passes."""
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
    for same in (chw, chw / 255.0, chw.double() / 255, img / 255.0):
        assert_close(preprocess(same, 16), ref)
    assert_close(preprocess(chw[None], 16), ref[None])
    pil = preprocess(Image.fromarray(img), 16)  # Pillow's uint8 path: about a level apart
    assert_levels(pil, ref.double(), PIL_MAX_LEVELS, "PIL image against its array")
    assert_close(preprocess([img, Image.fromarray(img)], 16), torch.stack([ref, pil]))
    assert_close(to_tensor(img), chw / 255.0)


def test_grayscale_and_rgba_arrays():
    gray = pixels(20, 12, channels=1)
    rgb = preprocess(np.repeat(gray, 3, axis=2), 8)
    for same in (gray, gray[:, :, 0], torch.from_numpy(gray).permute(2, 0, 1)):
        assert_close(preprocess(same, 8), rgb)
    assert_close(
        to_tensor(gray[:, :, 0]), torch.from_numpy(gray).permute(2, 0, 1).expand(3, -1, -1) / 255.0
    )
    rgba = pixels(20, 12, channels=4)
    assert_close(preprocess(rgba, 8), preprocess(rgba[:, :, :3], 8))  # alpha dropped


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_pil_eval_matches_open_clip(mode, shape):
    """Pillow resizes in the image's own mode (nearest for 1 and P, premultiplied alpha, 32-bit
    I and F) before the RGB conversion, and picks its pass order per shape."""
    h, w, size = SHAPES[shape]
    img = image(mode, h, w, seed=h * w)
    assert img.mode == mode and img.size == (w, h)
    out = preprocess(img, size)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    assert_levels(out, open_clip_eval(img, size), OPEN_CLIP_LEVELS, f"mode {mode}, {shape}")


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0)])
@pytest.mark.parametrize("mode", ["1", "P", "RGBA", "I", "F", "RGB"])
def test_pil_train_matches_open_clip(mode, scale):
    """Same seed, same boxes: a seeded generator draws what open_clip's RandomResizedCrop draws
    from the global RNG seeded alike, image after image (elongated ones fit no box and fall back
    to the center crop)."""
    imgs = [image(mode, h, w, seed=i) for i, (h, w, _) in enumerate(SHAPES.values()) if h < 2000]
    imgs.append(image(mode, 300, 40, seed=9))  # too elongated for any box: the fallback
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        out = ImageTransform(24, train=True, scale=scale, generator=gen)(imgs)
        torch.manual_seed(seed)
        ref = torch.stack([open_clip_train(img, 24, scale) for img in imgs])
        assert_levels(out, ref, OPEN_CLIP_LEVELS, f"mode {mode}, seed {seed}")
    torch.manual_seed(5)
    global_rng = ImageTransform(24, train=True, scale=scale)(imgs[:2])
    torch.manual_seed(5)
    ref = torch.stack([open_clip_train(img, 24, scale) for img in imgs[:2]])
    assert_levels(global_rng, ref, OPEN_CLIP_LEVELS, f"mode {mode}, global RNG")


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
        (lambda: preprocess(Image.new("RGB", (0, 4))), ValueError, "images is empty"),
        (lambda: preprocess([Image.new("La", (4, 4))]), ValueError, r"images\[0\]: Pillow cannot"),
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
