"""CLIP image preprocessing in plain torch ops: resize, crop, scale to [0, 1], normalize.

Evaluation (``preprocess``): resize the shorter side to ``size`` (bicubic, antialiased), take the
center ``size`` x ``size`` crop, clamp to [0, 1] and normalize with CLIP's mean and std. Training
(``ImageTransform(train=True)``): a random crop covering ``scale`` of the area with aspect ratio
in ``ratio``, resized to ``size`` x ``size``. Sizes and crop offsets round as torchvision's
``Resize(int)``, ``CenterCrop`` and ``RandomResizedCrop`` do; the resize follows Pillow's (width
pass, clamp, height pass), so it agrees with ``PIL.Image.resize(..., BICUBIC)`` to ~1/255.

Images: a PIL image (any mode), a uint8 numpy array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)
(alpha dropped), a (C, H, W) or (B, C, H, W) tensor with C = 1 or 3, uint8 (0-255) or float in
[0, 1], or a list of these (sizes may differ). One image gives (3, S, S); a batch (B, 3, S, S).
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F

from fastclip.checks import check_int

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Pillow's bicubic filter (a = -0.5), widened by the scale factor when downscaling.
_BICUBIC = dict(mode="bicubic", antialias=True, align_corners=False)
MAX_TRIES = 10  # random crop boxes drawn before falling back to the center crop, as torchvision

ImageLike: TypeAlias = "PILImage | np.ndarray | torch.Tensor"
Images: TypeAlias = "ImageLike | Sequence[ImageLike]"


def to_tensor(image: ImageLike, name: str = "image") -> torch.Tensor:
    """One image as float32 RGB in [0, 1]: (3, H, W); a (B, C, H, W) tensor gives (B, 3, H, W)."""
    pil = sys.modules.get("PIL.Image")  # a PIL image implies Pillow is already imported
    if pil is not None and isinstance(image, pil.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(
                f"{name} as an array must be (H, W) or (H, W, 1|3|4), got {image.shape}"
            )
        if image.dtype != np.uint8 and image.dtype.kind != "f":
            raise TypeError(f"{name} must be a uint8 or float array, got {image.dtype}")
        hwc = image[:, :, None] if image.ndim == 2 else image[:, :, :3]
        image = torch.tensor(np.ascontiguousarray(hwc)).permute(2, 0, 1)  # (C, H, W)
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            f"{name} must be a PIL image, numpy array or tensor, got {type(image).__name__}"
        )
    if image.dim() not in (3, 4) or image.shape[-3] not in (1, 3):
        raise ValueError(
            f"{name} must be a (C, H, W) or (B, C, H, W) tensor (channels first) with C = 1 or 3, "
            f"got shape {tuple(image.shape)}"
        )
    if image.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        x = image.float() / 255
    elif image.is_floating_point():
        x = image.float()
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"{name} is a float image and must lie in [0, 1] (uint8 for 0-255)")
    else:
        raise TypeError(f"{name} must be uint8 or floating point, got {image.dtype}")
    return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()


def denormalize(x: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Undo the normalization for viewing: (..., 3, H, W) -> the same shape, clamped to [0, 1]."""
    if not isinstance(x, torch.Tensor) or x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"x must be a (..., 3, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    mean, std = _stats(mean, std, x)
    return (x * std + mean).clamp(0, 1)


def preprocess(images: Images, size: int = 224, *, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """CLIP's evaluation transform: (3, size, size) float32 for one image, (B, 3, size, size)
    for a batch tensor or a list."""
    check_int("size", size)
    batches, batched = _batches(images)
    x = torch.cat([_center_crop(_resize_short(b, size), size) for b in batches])
    return _normalize(x, mean, std, batched)


class ImageTransform:
    """CLIP preprocessing as a callable: ``preprocess`` when ``train`` is False, else a random
    resized crop (area fraction in ``scale``, aspect w/h in ``ratio``) drawn per image from
    ``generator`` (the global RNG when None)."""

    def __init__(
        self,
        size: int = 224,
        *,
        train: bool = False,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        generator: torch.Generator | None = None,
    ) -> None:
        check_int("size", size)
        _check_range("scale", scale, upper=1.0)
        _check_range("ratio", ratio, upper=math.inf)
        _stats(mean, std, torch.empty(0))
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.size, self.train, self.scale, self.ratio = size, bool(train), scale, ratio
        self.mean, self.std, self.generator = tuple(mean), tuple(std), generator

    def __call__(self, images: Images) -> torch.Tensor:
        if not self.train:
            return preprocess(images, self.size, mean=self.mean, std=self.std)
        batches, batched = _batches(images)
        crops = []
        for img in (img for b in batches for img in b):  # (3, H, W) each
            top, left, h, w = _random_crop_box(
                *img.shape[-2:], self.scale, self.ratio, self.generator
            )
            crops.append(
                _resize(img[None, :, top : top + h, left : left + w], self.size, self.size)
            )
        return _normalize(torch.cat(crops), self.mean, self.std, batched)

    def __repr__(self) -> str:
        extra = f", scale={self.scale}, ratio={self.ratio}" if self.train else ""
        return f"ImageTransform(size={self.size}, train={self.train}{extra})"


def _batches(images: Images) -> tuple[list[torch.Tensor], bool]:
    """The images as float (b, 3, H, W) tensors in [0, 1], and whether the input was a batch."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list")
        xs = [to_tensor(img, f"images[{i}]") for i, img in enumerate(images)]
        return [x if x.dim() == 4 else x[None] for x in xs], True
    x = to_tensor(images, "images")
    return [x if x.dim() == 4 else x[None]], x.dim() == 4


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(b, 3, H, W) -> (b, 3, h, w), bicubic and antialiased (PIL's filter). Like PIL, the width
    pass runs first and its overshoot is clamped to [0, 1] before the height pass; a side that
    keeps its length is not resampled."""
    if x.shape[-1] != w:
        x = F.interpolate(x, size=(x.shape[-2], w), **_BICUBIC).clamp(0, 1)  # (b, 3, H, w)
    if x.shape[-2] != h:
        x = F.interpolate(x, size=(h, w), **_BICUBIC)  # (b, 3, h, w)
    return x


def _resize_short(x: torch.Tensor, size: int) -> torch.Tensor:
    """The shorter side to ``size``, the longer to int(size * long / short), as torchvision."""
    h, w = x.shape[-2:]
    long = int(size * max(h, w) / min(h, w))
    return _resize(x, *((size, long) if h <= w else (long, size)))


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(b, 3, H, W) -> (b, 3, size, size) around the center, offsets rounded as torchvision."""
    h, w = x.shape[-2:]
    top, left = round((h - size) / 2), round((w - size) / 2)
    return x[..., top : top + size, left : left + size]


def _random_crop_box(
    height: int, width: int, scale, ratio, generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop with area fraction uniform in ``scale`` and aspect w/h
    log-uniform in ``ratio``; after MAX_TRIES boxes that do not fit, the center crop with the
    image's aspect clamped to ``ratio`` (torchvision's RandomResizedCrop)."""
    device = generator.device if generator is not None else None
    area, log_lo, log_hi = height * width, math.log(ratio[0]), math.log(ratio[1])
    for _ in range(MAX_TRIES):
        u_area, u_ratio = torch.rand(2, generator=generator, device=device).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(height - h + 1, (1,), generator=generator, device=device))
            left = int(torch.randint(width - w + 1, (1,), generator=generator, device=device))
            return top, left, h, w
    h, w = height, width
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (height - h) // 2, (width - w) // 2, h, w


def _normalize(x: torch.Tensor, mean, std, batched: bool) -> torch.Tensor:
    """Clamp the bicubic overshoot to [0, 1] (as a uint8 pipeline would), then (x - mean) / std."""
    mean, std = _stats(mean, std, x)
    x = (x.clamp(0, 1) - mean) / std  # (B, 3, S, S)
    return x if batched else x[0]


def _stats(mean, std, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as (3, 1, 1) float32 tensors on ``like``'s device."""
    out = []
    for name, v in (("mean", mean), ("std", std)):
        if not isinstance(v, Sequence) or len(v) != 3:
            raise ValueError(f"{name} must be a sequence of 3 numbers (R, G, B), got {v!r}")
        if not all(isinstance(c, numbers.Real) and math.isfinite(c) for c in v):
            raise ValueError(f"{name} must hold finite numbers, got {v!r}")
        out.append(torch.tensor(v, dtype=torch.float32, device=like.device).view(3, 1, 1))
    if not (out[1] > 0).all():
        raise ValueError(f"std must be positive, got {std!r}")
    return out[0], out[1]


def _check_range(name: str, r: object, upper: float) -> None:
    """A (lo, hi) pair with 0 < lo <= hi <= upper."""
    if not (
        isinstance(r, Sequence) and len(r) == 2 and all(isinstance(v, numbers.Real) for v in r)
    ):
        raise ValueError(f"{name} must be a pair of numbers (lo, hi), got {r!r}")
    if not 0 < r[0] <= r[1] <= upper:
        raise ValueError(f"{name} must satisfy 0 < lo <= hi <= {upper}, got {tuple(r)}")
