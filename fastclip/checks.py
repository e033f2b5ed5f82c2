"""Argument checking and backend choice shared by the losses: clear errors before any launch."""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Sequence
from types import ModuleType

import torch

from fastclip import chunked

try:
    from fastclip.kernels.tiles import interpreting
except ImportError:  # no Triton on this platform
    interpreting = None

BACKENDS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(name: str, value: object, low: int = 1) -> int:
    """``value`` as an int >= ``low``; a TypeError or ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_features(image_features: object, text_features: object) -> None:
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch: shape {tuple(t.shape)}")
        if t.shape[1] == 0:
            raise ValueError(f"{name} has zero feature width: shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            "image_features and text_features must have the same feature width, got "
            f"{image_features.shape[1]} and {text_features.shape[1]}"
        )
    if image_features.device != text_features.device:
        raise ValueError(
            f"image_features is on {image_features.device} but text_features is on "
            f"{text_features.device}"
        )
    if image_features.dtype != text_features.dtype:
        raise TypeError(
            f"image_features is {image_features.dtype} but text_features is "
            f"{text_features.dtype}; cast one of them"
        )


def as_scalar(name: str, value: object, device: torch.device) -> torch.Tensor:
    """A one-element tensor on the features' device; python numbers become fp32 constants."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a tensor or a number, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=torch.float32, device=device)
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the features are on {device}")
    return value


def select_backend(
    backend: str,
    features: torch.Tensor,
    kernels: ModuleType | None,
    torch_ops: ModuleType | None = chunked,
) -> ModuleType | None:
    """The module that computes an op: its Triton ``kernels`` module (None when Triton is not
    installed) or ``torch_ops``, its PyTorch path (``fastclip.chunked`` for the losses; None
    for ops whose caller runs the PyTorch path itself)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        fused = kernels is not None and features.is_cuda and features.dtype != torch.float64
        return kernels if fused else torch_ops
    if backend == "torch":
        return torch_ops
    if kernels is None:
        raise ValueError("backend='triton' needs the triton package, which is not installed")
    if not (features.is_cuda or interpreting()):
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
            f"imported, to run Triton's interpreter on the CPU); the features are on "
            f"{features.device}"
        )
    if features.dtype == torch.float64:
        raise TypeError("backend='triton' supports float32, float16 and bfloat16 features")
    return kernels


def check_inputs(
    image_features: object, text_features: object, logit_scale: object, logit_bias: object
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check the features and return (scale, bias) as one-element tensors on their device.

    The scale must be finite; testing that reads one number back from the device.
    """
    check_features(image_features, text_features)
    device = image_features.device
    scale = as_scalar("logit_scale", logit_scale, device)
    bias = None if logit_bias is None else as_scalar("logit_bias", logit_bias, device)
    if not bool(torch.isfinite(scale.detach()).all()):
        raise ValueError(f"logit_scale must be finite, got {scale.detach().reshape(()).item()}")
    return scale, bias


def check_offset(offset: object, n_img: int, n_txt: int) -> None:
    """Image i pairs with text i + offset: a non-negative int with n_img + offset <= n_txt."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if n_img + offset > n_txt:
        raise ValueError(
            f"image i is paired with text i + offset, so n_img + offset must be <= n_txt; got "
            f"n_img={n_img}, offset={offset}, n_txt={n_txt} (swap the arguments if there are "
            "more images than texts)"
        )


def check_rank(rank: object, world_size: object) -> None:
    """A process's place in a torch.distributed group: ints with 0 <= rank < world_size."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world={world_size}")


# ---------------------------------------------------------------------------------------------
# Settings of the application layer: choices, numbers in a range, class names


def one_of(choices: Sequence[str]) -> str:
    """Choices as a sentence: "a, b or c"."""
    return ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; a ValueError naming ``name`` and them otherwise."""
    if value not in choices:
        raise ValueError(f"{name} must be {one_of(choices)}, got {value!r}")
    return value


def check_number(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    integer: bool = False,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """``value`` as a finite number (an int if ``integer``) within ``low``..``high`` (ends
    excluded where ``open_low``/``open_high``); a ValueError naming ``name`` otherwise, wrong
    types included, as settings from a config or the command line have it."""
    kind = numbers.Integral if integer else numbers.Real
    ok = not isinstance(value, bool) and isinstance(value, kind) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if not ok:
        if low is not None and high is not None:
            bounds = f" in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        elif low is not None:
            bounds = f" {'>' if open_low else '>='} {low}"
        else:
            bounds = "" if high is None else f" {'<' if open_high else '<='} {high}"
        what = "an int" if integer else "a finite number"
        raise ValueError(f"{name} must be {what}{bounds}, got {value!r}")
    return int(value) if integer else float(value)


def check_classnames(classnames: object) -> list[str]:
    """Class names as a list: a non-empty sequence of distinct str."""
    if isinstance(classnames, str) or not isinstance(classnames, Sequence):
        raise TypeError(f"classnames must be a sequence of str, got {type(classnames).__name__}")
    if len(classnames) == 0:
        raise ValueError("classnames is empty")
    for i, name in enumerate(classnames):
        if not isinstance(name, str):
            raise TypeError(f"classnames[{i}] must be a str, got {type(name).__name__}")
    duplicates = sorted(n for n, count in Counter(classnames).items() if count > 1)
    if duplicates:
        raise ValueError(f"classnames must be distinct, got duplicates: {duplicates}")
    return list(classnames)
