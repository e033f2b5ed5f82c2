"""CLIP image preprocessing as open_clip does it: resize, crop, convert to RGB, normalize.

Evaluation (``preprocess``), open_clip's ``image_transform(size, is_train=False)``: resize the
shorter side to ``size`` (bicubic), take the center ``size`` x ``size`` crop, convert to RGB, scale
to [0, 1] and normalize with CLIP's mean and std. Training (``ImageTransform(train=True)``),
open_clip's ``is_train=True``: torchvision's ``RandomResizedCrop`` (a box covering ``scale`` of the
area, aspect w/h in ``ratio``, resized to ``size`` x ``size``, bicubic), then the same conversion.
Sizes, crop offsets and random boxes are computed as torchvision's ``Resize(int)``, ``CenterCrop``
and ``RandomResizedCrop`` compute them.

PIL images (any mode Pillow converts to RGB) take open_clip's own path: Pillow resizes the image in
its own mode by its own rules (nearest for ``1`` and ``P``, alpha premultiplied for ``LA`` and
``RGBA``, 32-bit values for ``I`` and ``F``), crops it, and only then converts it to RGB, so the
result is open_clip's, pixel for pixel.

Arrays and tensors take a torch path that follows Pillow's bicubic resize in float (two passes,
each clamped to [0, 1]; ``_resize`` says which runs first): within about 1/255 of what Pillow
gives for ``Image.fromarray`` of the same RGB or L pixels, without Pillow's rounding to uint8.
Where open_clip differs: it rejects numpy arrays (torchvision's ``Resize`` takes PIL images and
tensors); on a float tensor it runs one unclamped antialiased interpolation, so next to sharp
edges its values overshoot [0, 1] where fastclip's are clamped (up to ~18/255 apart on images with
hard stripes, identical where nothing overshoots); a uint8 tensor fails in its ``Normalize``, where
fastclip scales it by 1/255. A 4-channel array's alpha is dropped, not premultiplied as Pillow
does for an RGBA image.

Images: a PIL image, a uint8 numpy array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (alpha
dropped), a (C, H, W) or (B, C, H, W) tensor with C = 1 or 3, uint8 (0-255) or float in [0, 1],
or a list of these (sizes may differ). One image gives (3, S, S); a batch (B, 3, S, S).
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
    if _is_pil(image):
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
    items, batched = _batches(images)
    crops = []
    for name, item in items:
        if isinstance(item, torch.Tensor):  # (b, 3, H, W)
            crops.append(_center_crop(_resize(item, *_short_side_to(*item.shape[-2:], size)), size))
        else:
            h, w = _pil_hw(item, name)
            nh, nw = _short_side_to(h, w, size)
            top, left = _center_offsets(nh, nw, size)
            crop = _pil_resize(item, nh, nw).crop((left, top, left + size, top + size))
            crops.append(_pil_rgb(crop, item.mode, name))
    return _normalize(torch.cat(crops), mean, std, batched)


class ImageTransform:
    """CLIP preprocessing as a callable: ``preprocess`` when ``train`` is False, else a random
    resized crop (area fraction in ``scale``, aspect w/h in ``ratio``) drawn per image from
    ``generator`` (the global RNG when None).

    The boxes are drawn as torchvision's ``RandomResizedCrop.get_params`` draws them, with the
    same torch calls in the same order, so for a CPU generator in a given state the boxes equal
    those open_clip's training transform draws from the global RNG in that state: on PIL images,
    ``ImageTransform(s, train=True, generator=torch.Generator().manual_seed(k))(images)`` equals
    open_clip's transform applied to each image in order after ``torch.manual_seed(k)``. Not
    comparable: a CUDA generator (another stream), and open_clip's crops inside a training run,
    where DataLoader workers seed the global RNG their own way and other code draws from it too.
    open_clip always uses the ratio (3/4, 4/3)."""

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
        items, batched = _batches(images)
        crops = [self._crop(img, name) for name, item in items for img in _split(item)]
        return _normalize(torch.cat(crops), self.mean, self.std, batched)

    def _crop(self, image: torch.Tensor | PILImage, name: str) -> torch.Tensor:
        """One image's random resized crop: (1, 3, size, size) in [0, 1]."""
        s = self.size
        if isinstance(image, torch.Tensor):  # (1, 3, H, W)
            top, left, h, w = _random_crop_box(
                *image.shape[-2:], self.scale, self.ratio, self.generator
            )
            return _resize(image[..., top : top + h, left : left + w], s, s)
        top, left, h, w = _random_crop_box(
            *_pil_hw(image, name), self.scale, self.ratio, self.generator
        )
        crop = image.crop((left, top, left + w, top + h))
        return _pil_rgb(_pil_resize(crop, s, s), image.mode, name)

    def __repr__(self) -> str:
        extra = f", scale={self.scale}, ratio={self.ratio}" if self.train else ""
        return f"ImageTransform(size={self.size}, train={self.train}{extra})"


def _batches(images: Images) -> tuple[list[tuple[str, torch.Tensor | PILImage]], bool]:
    """(name, image) per item, PIL images as they are and the rest as float (b, 3, H, W)
    tensors in [0, 1]; and whether the input was a batch."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list")
        named = [(f"images[{i}]", img) for i, img in enumerate(images)]
    else:
        named = [("images", images)]
    items, batched = [], isinstance(images, (list, tuple))
    for name, img in named:
        if not _is_pil(img):
            img = to_tensor(img, name)
            batched |= img.dim() == 4
            img = img if img.dim() == 4 else img[None]
        items.append((name, img))
    return items, batched


def _split(item: torch.Tensor | PILImage) -> list:
    """The single images of an item: a (b, 3, H, W) tensor as b (1, 3, H, W) views."""
    return list(item.split(1)) if isinstance(item, torch.Tensor) else [item]


def _is_pil(image: object) -> bool:
    pil = sys.modules.get("PIL.Image")  # a PIL image implies Pillow is already imported
    return pil is not None and isinstance(image, pil.Image)


def _pil_hw(image: PILImage, name: str) -> tuple[int, int]:
    """(height, width) of a PIL image; ValueError for an empty one."""
    w, h = image.size
    if h == 0 or w == 0:
        raise ValueError(f"{name} is empty: size {w} x {h}")
    return h, w


def _pil_resize(image: PILImage, h: int, w: int) -> PILImage:
    """Pillow's bicubic resize to (h, w), as torchvision's resize calls it (not at all when the
    size is already right). Pillow applies its own per-mode rules: nearest for ``1`` and ``P``,
    premultiplied alpha for ``LA`` and ``RGBA``, unclamped 32-bit values for ``I`` and ``F``."""
    if image.size == (w, h):
        return image
    return image.resize((w, h), sys.modules["PIL.Image"].Resampling.BICUBIC)


def _pil_rgb(image: PILImage, mode: str, name: str) -> torch.Tensor:
    """open_clip's ``convert("RGB")`` and ``ToTensor``: (1, 3, H, W) float32 in [0, 1]."""
    try:
        rgb = image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"{name}: Pillow cannot convert a mode {mode!r} image to RGB ({e})") from e
    return to_tensor(np.asarray(rgb), name)[None]


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(b, 3, H, W) -> (b, 3, h, w), bicubic and antialiased (Pillow's filter), in two passes
    clamped to [0, 1] as Pillow clamps each pass to uint8; a side that keeps its length is not
    resampled. The width pass runs first unless the height shrinks by more than twice as many
    pixels as the width does, the order Pillow 13 picks (earlier Pillows: always width first)."""
    passes = [(x.shape[-2], w), (h, w)]  # width, then height
    if h < x.shape[-2] and x.shape[-2] - h > 2 * (x.shape[-1] - w):
        passes = [(h, x.shape[-1]), (h, w)]  # height, then width
    for size in passes:
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, **_BICUBIC).clamp(0, 1)  # (b, 3, *size)
    return x


def _short_side_to(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) with the shorter side ``size`` and the longer int(size * long / short), as
    torchvision's ``Resize(int)`` computes it."""
    long = int(size * max(h, w) / min(h, w))
    return (size, long) if h <= w else (long, size)


def _center_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    """(top, left) of the centered size x size crop, rounded as torchvision's ``CenterCrop``
    (half to even: 1.5 -> 2, 2.5 -> 2)."""
    return round((h - size) / 2), round((w - size) / 2)


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(b, 3, H, W) -> (b, 3, size, size) around the center."""
    top, left = _center_offsets(*x.shape[-2:], size)
    return x[..., top : top + size, left : left + size]


def _random_crop_box(
    height: int, width: int, scale, ratio, generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop with area fraction uniform in ``scale`` and aspect w/h
    log-uniform in ``ratio``; after MAX_TRIES boxes that do not fit, the center crop with the
    image's aspect clamped to ``ratio``. The draws are torchvision's ``RandomResizedCrop``'s:
    float32 uniforms, one for the area and one for the log aspect, then the offsets."""
    device = generator.device if generator is not None else None
    area = height * width
    log_lo, log_hi = torch.tensor(ratio).log().tolist()  # float32 logs, as torchvision
    for _ in range(MAX_TRIES):
        fraction = torch.empty(1, device=device).uniform_(*scale, generator=generator).item()
        log_aspect = torch.empty(1, device=device).uniform_(log_lo, log_hi, generator=generator)
        aspect = log_aspect.exp().item()
        w = round(math.sqrt(area * fraction * aspect))
        h = round(math.sqrt(area * fraction / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, (1,), generator=generator, device=device)
            left = torch.randint(0, width - w + 1, (1,), generator=generator, device=device)
            return int(top), int(left), h, w
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
