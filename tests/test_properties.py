"""Property-based: random shapes, scales, norms and options against the float64 reference, for
InfoNCE and SigLIP."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, LOSS_BACKENDS, check, check_siglip, make_inputs
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastclip import infonce, siglip_loss
from fastclip.kernels.launch import INTERPRETER_CONFIG, TileConfig
from fastclip.reference import clip_loss_exact, siglip_loss_reference

TRITON = [name for name in LOSS_BACKENDS if name != "torch"]

# Derandomized: every run (and CI) tries the same examples; no example database to carry over.
PROPERTY = settings(deadline=None, derandomize=True, database=None, print_blob=True)


@dataclass(frozen=True)
class Case:
    n_img: int
    n_txt: int
    offset: int
    dim: int
    scale: float
    bias: float | None
    both: bool  # InfoNCE: both directions
    seed: int
    negatives_only: bool = False  # SigLIP: no positive pairs


@st.composite
def cases(draw) -> Case:
    n_img = draw(st.integers(1, 40))
    extra = draw(st.integers(0, 10))  # texts beyond the positives: extra negatives
    offset = draw(st.integers(0, extra))
    dim = draw(st.integers(1, 40))
    scale = math.exp(draw(st.floats(math.log(0.01), math.log(1000.0))))  # log-uniform
    bias = draw(st.none() | st.floats(-10.0, 10.0))
    both = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return Case(n_img, n_img + extra, offset, dim, scale, bias, both, seed)


@st.composite
def siglip_cases(draw) -> Case:
    """``cases`` for SigLIP (``both`` unused); a negatives-only block may be taller than wide."""
    case = draw(cases())
    if not draw(st.booleans()):
        return case
    n_img, n_txt = draw(st.permutations([case.n_img, case.n_txt]))
    return replace(case, n_img=n_img, n_txt=n_txt, offset=0, negatives_only=True)


# One row whose positive dominates by |S| ~ 10: a loss of 5e-5 with an fp32 rounding of ~1e-6.
DOMINANT_POSITIVE = Case(1, 2, 0, 4, 148.4131591025766, None, False, seed=1)


def check_case(
    case: Case, backend: str, siglip: bool = False, config: TileConfig | None = None
) -> None:
    # Unnormalized features: row norms spread over two decades, so |S| reaches ~1e5.
    ours, ref = make_inputs(
        case.n_img,
        case.n_txt,
        case.dim,
        scale=case.scale,
        bias=case.bias,
        seed=case.seed,
        row_norms=(0.1, 10.0),
    )
    # At large logits the softmaxes go one-hot (the sigmoids saturate) and the float64 loss and
    # gradients underflow towards 0 where fp32 keeps O(eps |S|): measure the error against
    # natural sizes.
    kw = {"vanishing": True, "config": config}
    if siglip:
        check_siglip(ours, ref, backend, torch.float32, case.offset, case.negatives_only, **kw)
    else:
        check(ours, ref, backend, torch.float32, case.offset, case.both, **kw)


@settings(PROPERTY, max_examples=200)
@given(case=cases())
@example(case=DOMINANT_POSITIVE)
def test_torch_backend_matches_reference(case):
    check_case(case, "torch")


@pytest.mark.parametrize("backend", TRITON)
@settings(PROPERTY, max_examples=10)
@given(case=cases())
@example(case=DOMINANT_POSITIVE)
def test_triton_backends_match_reference(backend, case):
    # The smallest tiles: even n ~ 40 spans several row and column tiles with masked edges.
    check_case(case, backend, config=INTERPRETER_CONFIG)


@settings(PROPERTY, max_examples=150)
@given(case=siglip_cases())
@example(case=DOMINANT_POSITIVE)
def test_siglip_torch_backend_matches_reference(case):
    check_case(case, "torch", siglip=True)


@pytest.mark.parametrize("backend", TRITON)
@settings(PROPERTY, max_examples=8)
@given(case=siglip_cases())
@example(case=DOMINANT_POSITIVE)
def test_siglip_triton_backends_match_reference(backend, case):
    # The smallest tiles, the columns in two chunks (one idle when n_txt <= 16).
    check_case(case, backend, siglip=True, config=replace(INTERPRETER_CONFIG, col_split=2))


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@settings(PROPERTY, max_examples=15)
@given(case=siglip_cases(), noise=st.floats(1e-3, 2.0))
@example(case=replace(DOMINANT_POSITIVE, n_txt=1, scale=15.0, bias=None), noise=1e-3)
def test_losses_are_positive(backend, case, noise):
    """However confident the pairs (texts within ``noise`` of their images, logit scales up to
    1000, so that 1 - p_ii falls far below fp32's epsilon), neither loss is ever negative, nor 0
    where its float64 value is an fp32 number (a lone pair at logit 15 loses 3.06e-7)."""
    gen = torch.Generator().manual_seed(case.seed)
    x = F.normalize(torch.randn(case.n_img, case.dim, generator=gen, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(case.n_txt, case.dim, generator=gen, dtype=torch.float64), dim=-1)
    if not case.negatives_only:
        pos = slice(case.offset, case.offset + case.n_img)
        noisy = x + noise * F.normalize(torch.randn(x.shape, generator=gen, dtype=x.dtype), dim=-1)
        y[pos] = F.normalize(noisy, dim=-1)
    x, y = x.float(), y.float()
    offset = None if case.negatives_only else case.offset
    losses = {
        "SigLIP": (siglip_loss, siglip_loss_reference, {"offset": case.offset,
                   "negatives_only": case.negatives_only}, {"offset": offset}),
    }  # fmt: skip
    if not case.negatives_only:
        kw = {"offset": case.offset, "both_directions": case.both}
        losses["InfoNCE"] = (infonce, clip_loss_exact, kw, kw)
    for name, (fn, reference, kw, ref_kw) in losses.items():
        bias = case.bias if name == "SigLIP" else None
        features = x.to(DEVICE), y.to(DEVICE)
        loss = fn(*features, case.scale, bias, backend=backend, config=INTERPRETER_CONFIG, **kw)
        loss = loss.item()
        exact = reference(x.double(), y.double(), case.scale, bias, **ref_kw).item()
        assert loss >= 0, f"{name} loss {loss}"
        assert loss > 0 or exact < 1e-37, f"{name} loss 0, exactly {exact:.3g}"
