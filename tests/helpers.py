"""Shared test helpers: tolerances by dtype and comparisons that explain their failures."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# (rtol, atol relative to the reference's largest magnitude) per input dtype. Low precision
# follows flash-attention's rule: no worse than about twice eager PyTorch's own error there.
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 2e-5),
    torch.float16: (2e-2, 5e-3),
    torch.bfloat16: (5e-2, 2e-2),
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, slack: float = 1
):
    """actual ~ expected within slack * TOLERANCES[dtype]; the message locates the worst element.

    ``slack`` widens the tolerance where rounding grows with the data, e.g. logits in the
    thousands, whose fp32 rounding error alone is ~1e-4.
    """
    rtol, atol = (slack * t for t in TOLERANCES[dtype])
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    bound = atol * max(scale, 1e-6) + rtol * expected.abs()
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
