"""Shared test helpers: tolerances by dtype and comparisons that explain their failures."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastclip import backends, infonce, registry, siglip_loss
from fastclip.reference import clip_loss_exact, siglip_loss_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# The losses' implementations (``fastclip.backends``): each test of a loss runs them all.
LOSS_BACKENDS = list(registry.names("contrastive"))  # SigLIP's are the same
# (rtol, atol relative to the reference's largest magnitude) per input dtype. Low precision
# follows flash-attention's rule: no worse than about twice eager PyTorch's own error there.
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 2e-5),
    torch.float16: (2e-2, 5e-3),
    torch.bfloat16: (5e-2, 2e-2),
}


def require(*modules: str) -> None:
    """Skip the calling test module where a package is missing: on the GPU machine, which has
    no network, unless its wheels were carried (benchmarks/fetch_wheels.sh)."""
    for module in modules:
        pytest.importorskip(module, reason=f"{module} is not installed")


# Where each loss's route is told which gradients to compute, and the flags' positions among its
# arguments: InfoNCE's backward (need_dx, need_dy), SigLIP's forward (need_dx, need_dy,
# need_dparams), as ``fastclip.backends`` passes them to every implementation.
GRADIENT_REQUESTS = {
    "clip": ("contrastive_backward", slice(8, 10)),
    "siglip": ("siglip_forward", slice(5, 8)),
}


def gradient_requests(monkeypatch, loss: str) -> list[tuple]:
    """A list that each call of ``loss``'s route (``GRADIENT_REQUESTS``) appends its gradient
    flags to, whatever the implementation, for the rest of the test."""
    name, flags = GRADIENT_REQUESTS[loss]
    route = getattr(backends, name)
    seen = []

    def record(*args, **kwargs):
        seen.append(tuple(args[flags]))
        return route(*args, **kwargs)

    monkeypatch.setattr(backends, name, record)
    return seen


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    slack: float = 1,
    floor: float = 1e-6,
):
    """actual ~ expected within slack * TOLERANCES[dtype]; the message locates the worst element.

    ``slack`` widens the tolerance where rounding grows with the data, e.g. logits in the
    thousands, whose fp32 rounding error alone is ~1e-4. atol is relative to the reference's
    largest magnitude, but to no less than ``floor``: pass the quantity's natural size where the
    reference can vanish while the rounding error does not.
    """
    rtol, atol = (slack * t for t in TOLERANCES[dtype])
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, floor)
    bound = atol * scale + rtol * expected.abs()
    err = (actual - expected).abs()
    bad = ~(err <= bound)
    if bad.any():
        worst = int(torch.argmax(torch.where(bad, err.nan_to_num(float("inf")), -1.0)))
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), actual.shape))
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())}/{bad.numel()} elements off "
            f"(NaN {int(actual.isnan().sum())}, inf {int(actual.isinf().sum())}); worst at "
            f"{index}: got {actual.flatten()[worst].item():.8g}, expected "
            f"{expected.flatten()[worst].item():.8g} (rtol={rtol}, atol={atol}*{scale:.3g})"
        )


def make_inputs(
    n_img,
    n_txt,
    dim,
    dtype=torch.float32,
    scale=10.0,
    bias=0.5,
    norm=True,
    seed=0,
    row_norms=None,
):
    """Random (ours, ref) argument lists [image, text, scale, bias]: ours on DEVICE in ``dtype``
    (scale and bias fp32), ref the float64 originals; every tensor a leaf that requires grad.

    ``row_norms=(lo, hi)`` rescales each (normalized) row to a norm drawn log-uniformly in
    [lo, hi], as unnormalized embeddings have.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_img, dim, generator=gen, dtype=torch.float64)
    y = torch.randn(n_txt, dim, generator=gen, dtype=torch.float64)
    if norm:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    if row_norms is not None:
        lo, hi = (math.log(r) for r in row_norms)
        norms = torch.empty(n_img + n_txt, 1, dtype=torch.float64)
        norms = norms.uniform_(lo, hi, generator=gen).exp()
        x, y = x * norms[:n_img], y * norms[n_img:]
    leaves = [x, y, torch.tensor(scale, dtype=torch.float64)]
    leaves.append(None if bias is None else torch.tensor(bias, dtype=torch.float64))
    ours = [
        None if t is None else t.to(DEVICE, dtype if t.dim() else torch.float32, copy=True)
        for t in leaves
    ]
    return [None if t is None else t.requires_grad_() for t in ours], [
        None if t is None else t.clone().requires_grad_() for t in leaves
    ]


def check(ours, ref, backend, dtype, offset=0, both=True, vanishing=False, block_bytes=None,
          config=None):  # fmt: skip
    """The fused InfoNCE against its reference: loss and every gradient (see ``compare``)."""
    kw = {"backend": backend, "block_bytes": block_bytes, "config": config}
    loss = infonce(*ours, offset=offset, both_directions=both, **kw)
    expected = clip_loss_exact(*ref, offset=offset, both_directions=both)
    compare(loss, expected, ours, ref, dtype, vanishing, d_bias_size=1e-6)  # d_bias is exactly 0


def check_siglip(ours, ref, backend, dtype, offset=0, negatives_only=False, vanishing=False,
                 block_bytes=None, config=None):  # fmt: skip
    """The fused SigLIP loss against its reference: loss and every gradient (see ``compare``)."""
    kw = {"backend": backend, "block_bytes": block_bytes, "config": config}
    loss = siglip_loss(*ours, offset=offset, negatives_only=negatives_only, **kw)
    expected = siglip_loss_reference(*ref, offset=None if negatives_only else offset)
    # d_bias = (sum_ij sigmoid(S_ij) - n_positives) / n_img, of O(1) like the loss.
    compare(loss, expected, ours, ref, dtype, vanishing, d_bias_size=1.0)


def compare(loss, expected, ours, ref, dtype, vanishing=False, d_bias_size=1e-6):
    """Backward through a fused loss and its float64 reference, compare loss and every gradient.

    ``vanishing``: the references may be ~0 where their rounding error is not (a softmax made
    one-hot, or sigmoids saturated, by huge logits: loss and gradients underflow in float64 but
    round to O(eps |S|) in fp32); measure atol against each quantity's natural size then, not
    the reference's. ``d_bias_size`` is d_bias's natural size.
    """
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # fp32 logits carry a rounding error proportional to their size: widen beyond |S| ~ 100.
    norm_x, norm_y = (t.norm(dim=1).max().item() for t in ref[:2])
    scale = ref[2].item()
    max_logit = scale * norm_x * norm_y
    slack = max(1.0, max_logit / 100)
    # Natural sizes: a loss of O(1); a row of dL/dx of O(s max|y| / n_img), of dL/dy of
    # O(s max|x| / n_img); dL/ds of O(max|x| max|y|) (InfoNCE: |dL/ds| <= 2 max|x| max|y|).
    n_img = ref[0].shape[0]
    natural = [1.0, scale * norm_y / n_img, scale * norm_x / n_img, norm_x * norm_y, d_bias_size]
    floors = natural if vanishing else [1e-6] * 5
    assert_close(loss, expected, dtype, "loss", slack, floors[0])
    loss.backward()
    expected.backward()
    names = ("d_image", "d_text", "d_scale", "d_bias")
    for name, a, b, floor in zip(names, ours, ref, floors[1:], strict=True):
        if a is not None and a.requires_grad:
            assert a.grad is not None and a.grad.dtype == a.dtype, name
            assert_close(a.grad, b.grad, dtype, name, slack, floor)
