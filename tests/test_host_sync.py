"""No call makes the host wait for the GPU: no value of a device tensor is read back in any
forward or backward, argument checks included.

On a CPU: the argument checks run on fake CUDA tensors (``FakeTensorMode``: shapes and devices
without values), where reading any value raises; every op's forward and backward runs under a
dispatch mode that records each read of a value (with the scale and bias as numbers, which the
checks test for free, or as tensors, backward alone: the checks read CPU tensors by design). On
a GPU, CUDA's sync debug mode turns every synchronizing call into an error around the forward
and backward of each op.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LOSS_BACKENDS, needs_cuda
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastclip import (
    ClipLoss,
    SigLipLoss,
    clip_loss,
    normalized_linear,
    siglip_loss,
    similarity,
    topk_similarity,
)
from fastclip.checks import check_inputs

N, D = 48, 32
aten = torch.ops.aten
# The operators that hand a tensor's value (or a shape that depends on it) to the host.
READS = (aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default)


class Reads(TorchDispatchMode):
    """Records the value reads among the operators that run under it, and counts them all."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func in READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def each_op(device: str, backend: str, numbers: bool = False) -> dict:
    """name -> (forward, its differentiable inputs): every public op on ``device``, its scale
    and bias learnable tensors there, or plain numbers."""

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(shape, device=device).requires_grad_()

    x, y, weight, proj_bias = leaf(N, D), leaf(N, D), leaf(16, D), leaf(16)
    scale, bias = (10.0, -1.0) if numbers else (leaf(), leaf())
    params = () if numbers else (scale, bias)
    loss = {"backend": backend}
    op = {"backend": "torch" if backend == "torch" else "triton"}
    return {
        "clip_loss": (lambda: clip_loss(x, y, scale, bias, **loss), (x, y, *params)),
        "ClipLoss": (lambda: ClipLoss(**loss)(x, y, scale), (x, y, *params[:1])),
        "siglip_loss": (lambda: siglip_loss(x, y, scale, bias, **loss), (x, y, *params)),
        "SigLipLoss": (lambda: SigLipLoss(**loss)(x, y, scale, bias), (x, y, *params)),
        "similarity": (
            lambda: similarity(x, y, scale, bias, normalize=True, **op),
            (x, y, *params),
        ),
        "topk_similarity": (lambda: topk_similarity(x, y, 5, scale=scale, **op)[0], ()),
        "normalized_linear": (
            lambda: normalized_linear(x, weight, proj_bias, **op),
            (x, weight, proj_bias),
        ),
    }


OPS = list(each_op("cpu", "torch"))


def step(forward, inputs) -> None:
    """A forward, and its backward where it has one."""
    value = forward().float().sum()
    if inputs:
        torch.autograd.grad(value, inputs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", OPS)
def test_no_value_is_read(name, backend):
    """Forward and backward with the scale and bias as numbers; then the backward alone with
    them as tensors. The mode sees the operators of either path (Triton's launches are no
    operators, but its launchers' torch calls are)."""
    with Reads() as seen:
        step(*each_op("cpu", backend, numbers=True)[name])
    assert seen.ops > 0, "the mode saw no operator"
    assert not seen.reads, f"values read back: {seen.reads}"
    forward, inputs = each_op("cpu", backend)[name]
    if inputs:
        value = forward().float().sum()
        with Reads() as seen:
            torch.autograd.grad(value, inputs)
        assert not seen.reads, f"the backward read values back: {seen.reads}"


@pytest.mark.parametrize("bias", [None, "tensor", "number"])
@pytest.mark.parametrize("scale", ["tensor", "number"])
def test_the_checks_read_no_gpu_value(scale, bias):
    """What every op checks first, on fake CUDA tensors (the ops themselves cannot run there)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        x, y = torch.randn(N, D, device="cuda"), torch.randn(N, D, device="cuda")
        values = {"tensor": torch.tensor(14.3, device="cuda"), "number": 14.3, None: None}
        got_scale, got_bias = check_inputs(x, y, values[scale], values[bias])
        assert got_scale.is_cuda and (got_bias is None or got_bias.is_cuda)


def test_host_values_are_still_checked():
    """Numbers and CPU tensors cost nothing to read: a non-finite one is refused up front."""
    x, y = torch.randn(N, D), torch.randn(N, D)
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        check_inputs(x, y, torch.tensor(float("nan")), None)
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        check_inputs(x, y, 1.0, float("inf"))


@needs_cuda
@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_no_host_sync_on_the_gpu(name, backend):
    """Each op's second forward and backward (the first compiles its kernels and probes cuBLAS)
    under CUDA's sync debug mode set to "error"."""
    if backend not in ("torch", "blocks") and not name.lower().startswith(("clip", "siglip")):
        pytest.skip("one Triton implementation: the blocks case covers it")
    for numbers in (True, False):
        case = each_op("cuda", backend, numbers)[name]
        step(*case)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(*case)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


@needs_cuda
def test_a_nan_scale_on_the_gpu_gives_a_nan_loss():
    """Not read back, a non-finite GPU scale propagates, as in eager PyTorch."""
    x, y = F.normalize(torch.randn(N, D, device="cuda"), dim=-1), torch.randn(N, D, device="cuda")
    assert clip_loss(x, y, torch.tensor(float("nan"), device="cuda")).isnan()
