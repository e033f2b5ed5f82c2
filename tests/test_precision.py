"""Confident batches: losses and gradients stay exact when the model is sure of every pair.

A trained CLIP puts p_ii close to 1 and its gradient lives in 1 - p_ii. Every backend must keep
that number: fp32 within 1e-5 (relative, over the whole gradient and over the confident rows
alone) of the float64 reference on the same inputs; fp16 and bf16 within twice what rounding the
exact result allows, under every loss scale a GradScaler may apply. The losses are never
negative.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, LOSS_BACKENDS, needs_cuda

from fastclip import infonce, siglip_loss
from fastclip.reference import clip_loss_exact, siglip_loss_reference

SCALES = [14.3, 30.0, 100.0]
LOSSES = {"infonce": (infonce, clip_loss_exact), "siglip": (siglip_loss, siglip_loss_reference)}
FP32_BOUND = 1e-5


def confident_batch(n: int, dim: int, hard: int = 0, seed: int = 0):
    """Unit image features and their texts (the image plus 5% noise): every row confident at a
    trained logit scale. The last ``hard`` texts are unrelated to their images instead."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=-1)
    noise = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    y = F.normalize(x + 0.05 * noise, dim=-1)
    if hard:
        y[n - hard :] = F.normalize(noise[n - hard :], dim=-1)
    return x, y


def run(loss_fn, x, y, scale, bias, dtype, **kw):
    """The loss and its gradients (image, text, scale) for features cast to ``dtype``."""
    leaves = [x.to(DEVICE, dtype).requires_grad_(), y.to(DEVICE, dtype).requires_grad_()]
    leaves.append(torch.tensor(scale, dtype=torch.float32, device=DEVICE, requires_grad=True))
    loss = loss_fn(*leaves, bias, **kw)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def reference(loss_fn, x, y, scale, bias, dtype, **kw):
    """The float64 reference on the features as rounded to ``dtype``: what an exact computation
    of the same inputs gives."""
    leaves = [t.to(dtype).double().requires_grad_() for t in (x, y)]
    leaves.append(torch.tensor(scale, dtype=torch.float64, requires_grad=True))
    loss = loss_fn(*leaves, bias, **kw)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error: how much of the quantity is wrong."""
    return ((got.double().cpu() - expected).norm() / expected.norm()).item()


def assert_fp32_exact(loss, grads, ref_loss, ref_grads):
    """A non-negative loss and every gradient (image, text, scale) within FP32_BOUND."""
    assert loss >= 0
    assert relative(loss, ref_loss) < FP32_BOUND, f"loss {loss.item()} vs {ref_loss.item()}"
    for name, g, r in zip(("d_image", "d_text", "d_scale"), grads, ref_grads, strict=True):
        assert relative(g, r) < FP32_BOUND, f"{name}: {relative(g, r):.2e}"


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("hard", [0, 48], ids=["all-confident", "half-hard"])
def test_infonce_fp32_is_exact_on_confident_rows(backend, scale, hard):
    x, y = confident_batch(96, 64, hard=hard, seed=int(scale))
    loss, grads = run(infonce, x, y, scale, None, torch.float32, backend=backend)
    ref_loss, ref_grads = reference(clip_loss_exact, x, y, scale, None, torch.float32)
    assert_fp32_exact(loss, grads, ref_loss, ref_grads)
    confident = slice(0, 96 - hard)  # their gradient, tiny beside the hard rows', on its own
    for name, g, r in zip(("d_image", "d_text"), grads[:2], ref_grads[:2], strict=True):
        err = relative(g[confident], r[confident])
        assert err < FP32_BOUND, f"{name}, confident rows: {err:.2e}"


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("bias", [None, -5.0])
def test_siglip_fp32_is_exact_on_confident_pairs(backend, scale, bias):
    x, y = confident_batch(96, 64, seed=int(scale))
    bias = None if bias is None else bias * scale / 10  # a bias that scales with the logits
    loss, grads = run(siglip_loss, x, y, scale, bias, torch.float32, backend=backend)
    ref_loss, ref_grads = reference(siglip_loss_reference, x, y, scale, bias, torch.float32)
    assert_fp32_exact(loss, grads, ref_loss, ref_grads)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("logit", [15.0, 6.5, -3.0])
def test_a_single_siglip_pair(backend, logit):
    """softplus(-S) of one pair: exact in fp32, never 0 or negative (softplus(-15) = 3.06e-7)."""
    x = torch.ones(1, 1, device=DEVICE)
    loss = siglip_loss(x, x, logit, backend=backend)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-logit)), rel=1e-6)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_a_single_clip_pair_has_zero_loss_and_gradient(backend):
    """One pair: the softmax has one entry, the loss is log 1 = 0 whatever the logit."""
    x = torch.randn(1, 8, device=DEVICE, requires_grad=True)
    y = torch.randn(1, 8, device=DEVICE, requires_grad=True)
    loss = infonce(x, y, 50.0, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any() and not y.grad.any()


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
def test_confident_rows_pull_towards_their_positives(backend, scale):
    """Gradient descent on a confident row's image moves it towards its own text: for the
    image->text loss, <dL/dx_i, y_i> = s sum_j p_ij (<y_j, y_i> - 1) < 0 exactly, in fp32 and
    fp16 alike (the sign survives every rounding of G)."""
    x, y = confident_batch(64, 32, seed=3)
    for dtype in (torch.float32, torch.float16):
        _, (dx, _, _) = run(infonce, x, y, scale, None, dtype, both_directions=False,
                            backend=backend)  # fmt: skip
        pull = (dx.double().cpu() * y.to(dtype).double()).sum(dim=1)
        moving = dx.abs().sum(dim=1).cpu() > 0  # fp16 flushes the most confident rows' to 0
        assert moving.any() or dtype == torch.float16, "every row's gradient vanished in fp32"
        assert (pull[moving] < 0).all(), f"{dtype}: rows {torch.nonzero(pull >= 0).flatten()}"


def batch_of(kind: str, n: int, dim: int):
    """A confident batch, a half-confident one (half its texts unrelated to their images) or
    a random one."""
    if kind == "random":
        gen = torch.Generator().manual_seed(5)
        return (F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=-1)
                for _ in range(2))  # fmt: skip
    return confident_batch(n, dim, hard=n // 2 if kind == "half-confident" else 0, seed=7)


# (dtype, N, D): fp16 through the interpreter; bf16 on a GPU, at a real batch's size.
HALVES = [
    pytest.param(torch.float16, 96, 64, id="fp16"),
    pytest.param(torch.bfloat16, 4096, 512, id="bf16", marks=needs_cuda),
]


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kind", ["confident", "half-confident", "random"])
@pytest.mark.parametrize("loss", ["infonce", "siglip"])
@pytest.mark.parametrize("dtype, n, dim", HALVES)
def test_16_bit_at_the_rounding_floor_under_loss_scaling(dtype, n, dim, loss, kind, scale,
                                                         backend):  # fmt: skip
    """16-bit inputs under a GradScaler's loss scale L (the loss times L, its gradients
    unscaled by the optimizer later): for every L from 1 to 2^16 at which the scaled gradients
    are finite in the dtype, the gradients are within twice the error of the exact scaled
    gradient rounded to it (the floor: what any result in that dtype has), plus 1e-4."""
    x, y = (t.to(dtype) for t in batch_of(kind, n, dim))  # the reference is exact on these
    bias = None if loss == "infonce" else -scale / 3
    fn, exact = LOSSES[loss]
    ours = [t.to(DEVICE).requires_grad_() for t in (x, y)]
    value = fn(*ours, scale, bias, backend=backend)
    ref = [t.double().requires_grad_() for t in (x, y)]
    ref_value = exact(*ref, torch.tensor(scale, dtype=torch.float64), bias)
    finite = 0
    for loss_scale in (1.0, 2.0**8, 2.0**16):
        expected = torch.autograd.grad(ref_value * loss_scale, ref, retain_graph=True)
        if not all(torch.isfinite(g.to(dtype)).all() for g in expected):
            continue
        finite += 1
        grads = torch.autograd.grad(value * loss_scale, ours, retain_graph=True)
        for name, g, r in zip(("d_image", "d_text"), grads, expected, strict=True):
            floor = relative(r.to(dtype), r)
            err = relative(g, r)
            assert err <= 2 * floor + 1e-4, f"L={loss_scale:g}, {name}: {err:.3g} vs {floor:.3g}"
    assert finite, "no loss scale kept the gradients finite"


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_rectangular_confident_batch_with_offset_and_bias(backend, loss):
    """More texts than images, the pairs shifted by an offset (a rank's rows against gathered
    texts), a bias: exact on confident rows too, at a trained scale."""
    scale, offset = 30.0, 17
    x, texts = confident_batch(64, 64, seed=21)
    extra = F.normalize(torch.randn(40, 64, generator=torch.Generator().manual_seed(22),
                                    dtype=torch.float64), dim=-1)  # fmt: skip
    y = torch.cat([extra[:offset], texts, extra[offset:]])  # image i pairs with text i + offset
    bias = -15.0
    if loss == "infonce":
        fn, ref_fn, kw = infonce, clip_loss_exact, {"offset": offset}
    else:
        fn, ref_fn = siglip_loss, siglip_loss_reference
        kw = {"offset": offset}
    got, grads = run(fn, x, y, scale, bias, torch.float32, backend=backend, **kw)
    expected, ref_grads = reference(ref_fn, x, y, scale, bias, torch.float32, **kw)
    assert_fp32_exact(got, grads, expected, ref_grads)
