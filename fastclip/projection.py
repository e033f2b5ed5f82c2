"""The normalized projection y = normalize(x W^T + b), as CLIP's towers end: public function,
drop-in ``nn.Linear`` and autograd wiring. The Triton kernels are in ``kernels/projection.py``;
the PyTorch path is eager ``F.normalize(F.linear(...))``.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from fastclip.backends import check_backend, choose
from fastclip.checks import _FLOAT_DTYPES, check_device

try:
    from fastclip.kernels import projection as triton_projection
except ImportError:  # no Triton on this platform: the PyTorch path serves everything
    triton_projection = None


class _NormalizedLinear(torch.autograd.Function):
    """Saves y and the row norms, and x or W only for the gradient that needs it."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        y, norm = triton_projection.projection_forward(x, weight, bias, eps)
        need_dx, need_dw, _ = ctx.needs_input_grad[:3]
        ctx.save_for_backward(x if need_dw else None, weight if need_dx else None, y, norm)
        ctx.eps = eps
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, y, norm = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        grads = triton_projection.projection_backward(
            grad, y, norm, x, weight, ctx.eps, need_dx, need_dw, need_db
        )
        return *grads, None


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

    Inside ``torch.autocast`` the operands are cast to the autocast dtype, as for ``F.linear``.

    Returns:
        (..., out_features) in x's dtype (the autocast dtype under autocast), each row of unit
        norm (or ||z|| / eps below eps).
    """
    x, weight, bias = _autocast(x, weight, bias)
    check_projection(x, weight, bias, eps)
    if not choose("projection", backend, x).triton:
        return F.normalize(F.linear(x, weight, bias), dim=-1, eps=eps)
    x2d = x.reshape(-1, x.shape[-1])  # (n_rows, in_features)
    inputs = (x2d, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        y = _NormalizedLinear.apply(*inputs, float(eps))
    else:
        y = triton_projection.projection_forward(*inputs, float(eps))[0]
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
        backend: see ``normalized_linear``.
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
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        check_eps(eps)
        check_backend(backend, "projection")
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalized_linear(x, self.weight, self.bias, eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, backend={self.backend!r}"
