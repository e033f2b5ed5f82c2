"""What only the SigLIP loss has: gradients computed by its forward, only those asked for, and
none for the loss alone; each implementation's siglip_forward with every split. What it shares
with InfoNCE is in test_losses.py."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import DEVICE, LOSS_BACKENDS, assert_close, gradient_requests, make_inputs

import fastclip.backends as fb
from fastclip import siglip_loss
from fastclip.kernels.launch import INTERPRETER_CONFIG, TileConfig
from fastclip.reference import siglip_loss_reference

BACKENDS = LOSS_BACKENDS
SMALL = INTERPRETER_CONFIG  # 16 x 16 tiles: even n ~ 40 runs several tiles and masked edges


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("negatives_only", [False, True])
def test_evaluation_computes_the_loss_alone(backend, monkeypatch, negatives_only):
    """Under no_grad, or with nothing requiring grad, no gradient work is done (1 pass)."""
    requests = gradient_requests(monkeypatch, "siglip")
    ours, ref = make_inputs(23, 30, 16, seed=7)
    expected = siglip_loss_reference(*ref, offset=None if negatives_only else 5)
    kw = {"offset": 5, "negatives_only": negatives_only, "backend": backend, "config": SMALL}
    with torch.no_grad():
        loss = siglip_loss(*ours, **kw)
    assert not loss.requires_grad
    assert_close(loss, expected, torch.float32, "loss under no_grad")
    loss = siglip_loss(*(t.detach() for t in ours), **kw)
    assert_close(loss, expected, torch.float32, "loss of detached inputs")
    assert requests == [(False, False, False)] * 2


def forward_of(method: str, config: TileConfig | None = None, block_bytes: int | None = None):
    """An implementation's siglip_forward (through its route), its options bound."""
    return functools.partial(fb.siglip_forward, method=method, block_bytes=block_bytes,
                             config=config)  # fmt: skip


KERNEL_CALLS = {
    f"{method}-{name}": forward_of(method, config)
    for method in fb.implementations("siglip", triton=True)
    for name, config in {
        "auto-split": SMALL,
        "split-3": TileConfig(16, 16, 16, 16, num_stages=1, col_split=3),
        "one-program": TileConfig(16, 32, 16, 32, num_stages=1, col_split=1),
        # More column chunks than column blocks: idle programs and empty column chunks.
        "oversplit": TileConfig(16, 16, 16, 16, num_stages=1, col_split=7),
    }.items()
    if method == "fused" or name in ("auto-split", "one-program")
} | {
    "torch-blocks-of-16": forward_of("torch", block_bytes=16 * 16 * 8),
    "blocks-of-16": forward_of("blocks", SMALL, block_bytes=16 * 16 * 2),
}


@pytest.mark.parametrize("offset", [11, None], ids=["offset-11", "negatives-only"])
@pytest.mark.parametrize("forward", KERNEL_CALLS.values(), ids=KERNEL_CALLS.keys())
def test_forward_outputs(forward, offset):
    """Loss and every gradient straight from a backend's siglip_forward, with each split."""
    gen = torch.Generator().manual_seed(1)
    leaves = [torch.randn(50, 40, generator=gen, dtype=torch.float64)]
    leaves.append(torch.randn(70, 40, generator=gen, dtype=torch.float64))
    leaves += [torch.tensor(0.3, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)]
    leaves = [t.requires_grad_() for t in leaves]
    expected = siglip_loss_reference(*leaves, offset=offset)
    expected.backward()
    got = forward(*(t.detach().float().to(DEVICE) for t in leaves), offset, True, True, True)
    assert_close(got[0], expected, torch.float32, "loss")
    for name, g, leaf in zip(("d_image", "d_text", "d_scale", "d_bias"), got[1:], leaves,
                             strict=True):  # fmt: skip
        assert_close(g, leaf.grad, torch.float32, name)


@pytest.mark.parametrize(
    "forward",
    [forward_of("torch"), KERNEL_CALLS["fused-auto-split"], KERNEL_CALLS["blocks-auto-split"]],
    ids=["torch", "fused", "blocks"],
)
@pytest.mark.parametrize("need", [(dx, dy, dp) for dx in (0, 1) for dy in (0, 1) for dp in (0, 1)])
def test_forward_returns_what_was_asked(forward, need):
    """Each gradient only on request; dL/ds and dL/db from whichever sweep runs."""
    ours, ref = make_inputs(19, 21, 16, seed=11)
    expected = siglip_loss_reference(*ref, offset=2)
    expected.backward()
    inputs = [t.detach() for t in ours]
    got = forward(*inputs, 2, *map(bool, need))
    assert_close(got[0], expected, torch.float32, "loss")
    wanted = [need[0], need[1], need[2], need[2]]
    for name, g, leaf, want in zip(("d_image", "d_text", "d_scale", "d_bias"), got[1:], ref,
                                   wanted, strict=True):  # fmt: skip
        if want:
            assert_close(g, leaf.grad, torch.float32, name)
        else:
            assert g is None, f"{name} computed though not asked for"
