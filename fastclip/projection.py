"""The normalized projection y = normalize(x W^T + b), as CLIP's towers end: public function
and drop-in ``nn.Linear``. The Triton kernels are in ``kernels/projection.py``; the PyTorch path
is eager ``F.normalize(F.linear(...))`` with the same backward written out
(``fastclip.chunked``); both run as the custom operator ``torch.ops.fastclip.normalized_linear``
(``fastclip.backends``), with its autograd.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import torch
from torch import nn

from fastclip import backends
from fastclip.backends import check_backend, check_config, choose
from fastclip.checks import _FLOAT_DTYPES, check_device

if TYPE_CHECKING:
    from fastclip.kernels.launch import TileConfig


def check_eps(eps: object) -> None:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be positive and finite, got {eps}")


def check_projection(x: object, weight: object, bias: object, eps: object) -> None:
    """Clear errors, naming the argument, for everything F.linear and the kernels cannot take."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if name == "bias" and t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_device(name, t)
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    if 0 in weight.shape:
        raise ValueError(f"weight has no elements: shape {tuple(weight.shape)}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., in_features), got a scalar")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x has {x.shape[-1]} in-features (its last dimension) but weight has "
            f"{weight.shape[1]}: x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"x is empty: shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias must have shape (out_features,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} is {t.dtype} but x is {x.dtype}; cast one of them")
    check_eps(eps)


def normalized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-12,
    backend: str = "auto",
    config: TileConfig | None = None,
) -> torch.Tensor:
    """F.normalize(F.linear(x, weight, bias), dim=-1, eps=eps), fused.

    On the Triton backend the matmul ends with the normalization, so y is written once; the
    backward keeps only y and one norm per row, and never stores the gradient of x W^T + b.

    Args:
        x: (..., in_features) float32, float16 or bfloat16 (float64 on the torch backend); any
            strides and leading dimensions.
        weight: (out_features, in_features), same dtype and device; bias: (out_features,) or None.
        eps: lower bound of the norm, as in F.normalize.
        backend: "triton" (fused kernels; CUDA), "torch" (eager PyTorch, any device) or "auto"
            (Triton on CUDA, PyTorch otherwise).
        config: fixed Triton tiles (``fastclip.kernels.launch.TileConfig``); None autotunes.

    Inside ``torch.autocast`` the operands are cast to the autocast dtype, as for ``F.linear``.

    Returns:
        (..., out_features) in x's dtype (the autocast dtype under autocast), each row of unit
        norm (or ||z|| / eps below eps).
    """
    x, weight, bias = _autocast(x, weight, bias)
    check_projection(x, weight, bias, eps)
    check_config(config)
    method = choose("projection", backend, x)
    x2d = x.reshape(-1, x.shape[-1])  # (n_rows, in_features)
    y = backends.normalized_linear(x2d, weight, bias, float(eps), method=method, config=config)
    return y.reshape(*x.shape[:-1], weight.shape[0])  # (..., out_features)


def _autocast(*tensors: object) -> tuple:
    """Inside an autocast region, the autocast dtype for every operand, as nn.Linear gets."""
    device = next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), None)
    if device in (None, "meta") or not torch.is_autocast_enabled(device):  # meta: checked next
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_FROM else t
        for t in tensors
    )


_AUTOCAST_FROM = (torch.float32, torch.float16, torch.bfloat16)  # float64 is never autocast


class NormalizedLinear(nn.Linear):
    """``nn.Linear`` followed by ``F.normalize(..., dim=-1)``, fused (see ``normalized_linear``).

    Same constructor, parameters, initialization and state-dict keys as ``nn.Linear``: a model
    can swap one for the other and keep its checkpoints.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        eps: lower bound of the norm, as in F.normalize.
        backend, config: see ``normalized_linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        eps: float = 1e-12,
        backend: str = "auto",
        config: TileConfig | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        check_eps(eps)
        check_backend(backend, "projection")
        check_config(config)
        self.eps = eps
        self.backend = backend
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kw = {"eps": self.eps, "backend": self.backend, "config": self.config}
        return normalized_linear(x, self.weight, self.bias, **kw)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, backend={self.backend!r}"
