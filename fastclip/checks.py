"""Argument checking shared by the public functions: clear errors before any launch."""

from __future__ import annotations

import math
import numbers
import operator
from collections import Counter
from collections.abc import Sequence

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(name: str, value: object, low: int = 1) -> int:
    """``value`` as an int >= ``low``; a TypeError or ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_index(name: str, value: object, low: int | None = 1) -> int:
    """Any integral number (int, numpy integer, 0-d integer tensor) >= ``low`` (None: any), as
    an int."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.is_floating_point()):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        index = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if low is not None and index < low:
        raise ValueError(f"{name} must be >= {low}, got {index}")
    return index


def check_device(name: str, t: torch.Tensor) -> None:
    """The meta device holds shapes, not values: every op here computes values."""
    if t.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device, which holds no values; fastclip's ops compute "
            "numbers (for shapes alone, run the eager reference of fastclip.reference)"
        )


def check_features(image_features: object, text_features: object) -> None:
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_device(name, t)
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


def check_same_dtype(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """For the ops that, like ``a @ b.T``, take one dtype (the losses promote instead)."""
    if image_features.dtype != text_features.dtype:
        raise TypeError(
            f"image_features is {image_features.dtype} but text_features is "
            f"{text_features.dtype}; cast one of them"
        )


def promote_features(
    image_features: torch.Tensor, text_features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both feature tensors in torch's promoted dtype (``torch.promote_types``: a bf16 tower
    and an fp32 one compute in fp32), each cast only where it differs; the gradients come back
    in each tensor's own dtype."""
    dtype = torch.promote_types(image_features.dtype, text_features.dtype)
    return image_features.to(dtype), text_features.to(dtype)


def as_scalar(name: str, value: object, device: torch.device) -> torch.Tensor:
    """A one-element tensor on the features' device; python numbers become fp32 constants.

    Numbers and CPU tensors must be finite. A tensor on a GPU is not read: reading it would make
    the host wait for the device on every call (and break CUDA graphs and
    ``torch.compile(fullgraph=True)``); a non-finite one gives NaN, as in eager PyTorch. Under
    torch.compile a CPU tensor is checked by an assertion in the graph (a RuntimeError when it
    fails), not by a Python branch on its value.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a tensor or a number, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        return torch.full((), float(value), dtype=torch.float32, device=device)  # no copy, no wait
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the features are on {device}")
    if value.device.type == "cpu":
        finite = torch.isfinite(value.detach()).all()
        if torch.compiler.is_compiling():  # a branch on the value would break the graph
            torch._assert_async(finite, f"{name} must be finite")
        elif not finite:
            raise ValueError(f"{name} must be finite, got {value.detach().reshape(()).item()}")
    return value


def check_inputs(
    image_features: object, text_features: object, logit_scale: object, logit_bias: object
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check the features and return (scale, bias) as one-element tensors on their device.

    Scale and bias must be finite where given as numbers or CPU tensors (``as_scalar``).
    """
    check_features(image_features, text_features)
    device = image_features.device
    scale = as_scalar("logit_scale", logit_scale, device)
    bias = None if logit_bias is None else as_scalar("logit_bias", logit_bias, device)
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
        allowed = number_range(low, high, integer=integer, open_low=open_low, open_high=open_high)
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value) if integer else float(value)


def number_range(
    low: float | None = None,
    high: float | None = None,
    *,
    integer: bool = False,
    open_low: bool = False,
    open_high: bool = False,
) -> str:
    """What ``check_number`` with these arguments accepts, in words: "an int >= 1",
    "a finite number in (0, 1]"."""
    if low is not None and high is not None:
        bounds = f" in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    elif low is not None:
        bounds = f" {'>' if open_low else '>='} {low}"
    else:
        bounds = "" if high is None else f" {'<' if open_high else '<='} {high}"
    return f"{'an int' if integer else 'a finite number'}{bounds}"


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
