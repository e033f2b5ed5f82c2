"""The fused SigLIP loss against the float64 eager reference: values and all four gradients."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import DEVICE, LOSS_BACKENDS, assert_close, check_siglip, make_inputs, needs_cuda

import fastclip.kernels.siglip as ks
import fastclip.kernels.tiles as kt
from fastclip import chunked, siglip_loss
from fastclip.measure import peak_memory_bytes
from fastclip.reference import siglip_loss_reference

BACKENDS = LOSS_BACKENDS
# A G buffer of 24 x 24 fp32 entries: the bounded-block backends run many blocks, ragged ones.
TINY_BLOCKS = 24 * 24 * 8
SMALL = kt.INTERPRETER_CONFIG  # 16 x 16 tiles: even n ~ 40 runs several tiles and masked edges
WIDE = kt.TileConfig(block_m=16, block_n=16, block_k=64, block_d=128, num_stages=1)


@pytest.fixture
def flags(monkeypatch):
    """Records (need_dx, need_dy, need_dparams) of every siglip_forward call, either backend."""
    seen = []

    def recording(forward):
        def record(*args, **kwargs):
            seen.append(args[5:8])  # called positionally: x, y, scale, bias, offset, flags...
            return forward(*args, **kwargs)

        return record

    for ops in (chunked, ks):
        monkeypatch.setattr(ops, "siglip_forward", recording(ops.siglip_forward))
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n_img, n_txt, offset",
    [
        (1, 1, 0),
        (37, 37, 0),  # not a multiple of the tile
        (64, 64, 0),  # exactly four tiles
        (20, 45, 7),  # rectangular, positives shifted
        (20, 45, 25),  # positives in the last columns
        (20, 45, None),  # negatives only (another rank's texts)
        (45, 20, None),  # negatives only, more images than texts
    ],
)
def test_shapes(backend, tiles, n_img, n_txt, offset):
    tiles(SMALL)
    ours, ref = make_inputs(n_img, n_txt, 24, seed=n_img + n_txt)
    check_siglip(ours, ref, backend, torch.float32, offset or 0, negatives_only=offset is None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_img, n_txt, offset", [(70, 70, 0), (45, 83, 30), (45, 83, None)])
def test_many_small_blocks(backend, tiles, n_img, n_txt, offset):
    """A G buffer far smaller than the problem: blocks of 16-24 rows and columns, ragged at the
    edges, the positives crossing block boundaries (PyTorch path too: the same driver)."""
    tiles(SMALL)
    ours, ref = make_inputs(n_img, n_txt, 24, bias=-3.0, seed=n_img)
    check_siglip(ours, ref, backend, torch.float32, offset or 0, negatives_only=offset is None,
                 block_bytes=TINY_BLOCKS)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [1, 17, 64, 500, 512, 768, 1000, 1024])
def test_feature_widths(backend, tiles, dim):
    # Wider chunks keep the interpreter fast; D = 500, 1000 still end in a masked chunk.
    tiles(WIDE)
    ours, ref = make_inputs(19, 23, dim, seed=dim)
    check_siglip(ours, ref, backend, torch.float32, offset=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0, 1000.0])
def test_scales_and_unnormalized_features(backend, tiles, scale):
    tiles(SMALL)
    # Logits in the thousands: softplus and sigmoid must not overflow for either sign of S.
    ours, ref = make_inputs(29, 29, 20, scale=scale, bias=-10.0, norm=False, seed=3)
    check_siglip(ours, ref, backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_python_numbers(backend, tiles):
    tiles(SMALL)
    ours, ref = make_inputs(21, 21, 16, bias=None)
    check_siglip(ours, ref, backend, torch.float32)
    for bias in (None, -3.0):
        x, y = (t.detach().clone().requires_grad_() for t in ours[:2])
        ref_x, ref_y = (t.detach().clone().requires_grad_() for t in ref[:2])
        loss = siglip_loss(x, y, 7.5, bias, backend=backend)
        expected = siglip_loss_reference(ref_x, ref_y, 7.5, bias)
        assert_close(loss, expected, torch.float32, f"loss, bias {bias}")
        loss.backward()
        expected.backward()
        assert_close(x.grad, ref_x.grad, torch.float32, f"d_image, bias {bias}")
        assert_close(y.grad, ref_y.grad, torch.float32, f"d_text, bias {bias}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, tiles):
    tiles(SMALL)
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(33, 48, generator=gen, dtype=torch.float64)
    stored_transposed = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    x = wide.float().to(DEVICE)[:, ::2].detach()  # column stride 2
    y = stored_transposed.float().to(DEVICE).T.detach()  # (40, 24), row stride 1
    assert not x.is_contiguous() and not y.is_contiguous()
    scale, bias = (torch.tensor(v, device=DEVICE, requires_grad=True) for v in (5.0, -2.0))
    ours = [x.requires_grad_(), y.requires_grad_(), scale, bias]
    ref = [wide[:, ::2].clone(), stored_transposed.T.clone()]
    ref += [torch.tensor(5.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)]
    check_siglip(ours, [t.requires_grad_() for t in ref], backend, torch.float32, offset=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "frozen", [(0,), (1,), (2,), (3,), (2, 3), (0, 1)], ids=lambda f: "frozen" + str(list(f))
)
def test_only_some_inputs_require_grad(backend, tiles, flags, frozen):
    """Locked towers, a fixed scale or bias: no gradient for them, and none computed; the rest
    stays exact."""
    tiles(SMALL)
    ours, ref = make_inputs(18, 26, 16, seed=len(frozen) + frozen[0])
    for i in frozen:
        ours[i].requires_grad_(False)
        ref[i].requires_grad_(False)
    check_siglip(ours, ref, backend, torch.float32, offset=4)
    assert all(ours[i].grad is None for i in frozen)
    live = [t.requires_grad for t in ours]
    assert flags == [(live[0], live[1], live[2] or live[3])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_features_give_non_finite_loss(backend, tiles):
    tiles(SMALL)
    for which in (0, 1):
        for bad in (float("nan"), float("inf"), float("-inf")):
            ours, _ = make_inputs(17, 19, 16)
            features = [t.detach().clone() for t in ours[:2]]
            features[which][3, 5] = bad
            loss = siglip_loss(*features, *ours[2:], offset=1, backend=backend)
            assert not torch.isfinite(loss), (which, bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("negatives_only", [False, True])
def test_evaluation_computes_the_loss_alone(backend, tiles, flags, negatives_only):
    """Under no_grad, or with nothing requiring grad, no gradient work is done (1 pass)."""
    tiles(SMALL)
    ours, ref = make_inputs(23, 30, 16, seed=7)
    expected = siglip_loss_reference(*ref, offset=None if negatives_only else 5)
    kw = {"offset": 5, "negatives_only": negatives_only, "backend": backend}
    with torch.no_grad():
        loss = siglip_loss(*ours, **kw)
    assert not loss.requires_grad
    assert_close(loss, expected, torch.float32, "loss under no_grad")
    loss = siglip_loss(*(t.detach() for t in ours), **kw)
    assert_close(loss, expected, torch.float32, "loss of detached inputs")
    assert flags == [(False, False, False)] * 2


def test_workspace_in_row_slices(monkeypatch, tiles):
    """A workspace budget smaller than the problem: both sweeps run in several row slices, the
    positives straddling the slice boundaries."""
    tiles(kt.TileConfig(16, 16, 16, 16, num_stages=1, col_split=2))
    monkeypatch.setattr(kt, "WORKSPACE_BYTES", 2 * 64 * 24 * 4)  # 64 rows per slice
    ours, ref = make_inputs(100, 110, 24, seed=9)
    check_siglip(ours, ref, "fused", torch.float32, offset=6)


def test_workspace_in_row_slices_with_idle_column_chunks(monkeypatch, tiles):
    """More column chunks than column blocks (autotuned BN = 128 tiles give that whenever
    cdiv(n, 128) < col_split) and a last row slice shorter than the others."""
    tiles(kt.TileConfig(16, 16, 16, 16, num_stages=1, col_split=7))  # 40 texts: 3 blocks
    monkeypatch.setattr(kt, "WORKSPACE_BYTES", 7 * 64 * 16 * 4)  # 64 rows per slice
    ours, ref = make_inputs(100, 40, 16, seed=10)
    check_siglip(ours, ref, "fused", torch.float32, negatives_only=True)


KERNEL_CALLS = {
    f"{method}-{name}": functools.partial(ks.siglip_forward, method=method, config=config)
    for method in ks.METHODS
    for name, config in {
        "auto-split": SMALL,
        "split-3": kt.TileConfig(16, 16, 16, 16, num_stages=1, col_split=3),
        "one-program": kt.TileConfig(16, 32, 16, 32, num_stages=1, col_split=1),
        # More column chunks than column blocks: idle programs and empty column chunks.
        "oversplit": kt.TileConfig(16, 16, 16, 16, num_stages=1, col_split=7),
    }.items()
    if method == "fused" or name in ("auto-split", "one-program")
} | {
    "torch-blocks-of-16": functools.partial(chunked.siglip_forward, block_bytes=16 * 16 * 8),
    "blocks-of-16": functools.partial(ks.siglip_forward, config=SMALL, block_bytes=16 * 16 * 2),
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
    [chunked.siglip_forward, KERNEL_CALLS["fused-auto-split"], KERNEL_CALLS["blocks-auto-split"]],
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


# ---------------------------------------------------------------------------------------------
# CUDA only: low precision, autotuned configs, large shapes, memory
# ---------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("backend", ks.METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, dim", [(1000, 512), (4096, 768), (3001, 1000)])
def test_low_precision_no_worse_than_eager(backend, dtype, n, dim):
    # SigLIP's initialization: scale 10, bias -10.
    ours, ref = make_inputs(n, n, dim, dtype=dtype, scale=10.0, bias=-10.0, seed=n)
    loss = siglip_loss(*ours, backend=backend)
    loss.backward()
    expected = siglip_loss_reference(*ref)
    expected.backward()
    eager_in = [t.detach().clone().requires_grad_() for t in ours]
    eager = siglip_loss_reference(*eager_in)
    eager.backward()
    names = ("d_image", "d_text", "d_scale", "d_bias")
    triples = [("loss", loss, expected, eager)]
    triples += [
        (name, a.grad, b.grad, e.grad)
        for name, a, b, e in zip(names, ours, ref, eager_in, strict=True)
    ]
    for name, a, b, e in triples:
        err = (a.double().cpu() - b.double().cpu()).abs().max().item()
        eager_err = (e.double().cpu() - b.double().cpu()).abs().max().item()
        bound = 2 * eager_err + 1e-3 * b.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > 2 x eager's {eager_err:.3g} (+slack)"


@needs_cuda
@pytest.mark.parametrize("backend", ks.METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("negatives_only", [False, True])
def test_autotuned_matches_reference(backend, dtype, negatives_only, monkeypatch):
    monkeypatch.setenv("FASTCLIP_AUTOTUNE", "1")
    warm_up, _ = make_inputs(2500, 2600, 512, dtype=dtype, bias=-5.0, seed=2)
    siglip_loss(*warm_up, backend=backend).backward()  # tunes (see the next test)
    ours, ref = make_inputs(2500, 2600, 512, dtype=dtype, bias=-5.0, seed=2)
    check_siglip(ours, ref, backend, dtype, offset=50, negatives_only=negatives_only)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autotuning_call_matches_reference(dtype, monkeypatch):
    """The call that runs the tuning returns the chosen config's results, nothing else."""
    monkeypatch.setenv("FASTCLIP_AUTOTUNE", "1")
    ks._sweep_tuned.cache.clear()  # the next call tunes every sweep afresh
    ks._block_tuned.cache.clear()
    for backend in ks.METHODS:
        ours, ref = make_inputs(2500, 2600, 512, dtype=dtype, bias=-5.0, seed=2)
        check_siglip(ours, ref, backend, dtype, offset=50)


@needs_cuda
@pytest.mark.parametrize("backend", ks.METHODS)
def test_memory_grows_linearly_not_quadratically(backend):
    n, dim = 16384, 256
    ours, _ = make_inputs(n, n, dim, dtype=torch.bfloat16, bias=-10.0)
    block = 32 * 2**20
    run = lambda: siglip_loss(*ours, backend=backend, block_bytes=block).backward()  # noqa: E731
    extra = peak_memory_bytes(run, DEVICE)
    bound = n * dim * 8 + 2 * block  # the gradients, their fp32 accumulator, the G buffer
    assert extra < bound, f"fwd+bwd added {extra / 2**20:.0f} MiB; N x N is 512 MiB"


@needs_cuda
@pytest.mark.parametrize("backend", ks.METHODS)
def test_fixed_default_tiles_without_autotuning(backend, monkeypatch):
    monkeypatch.setenv("FASTCLIP_AUTOTUNE", "0")
    ours, ref = make_inputs(1500, 1700, 768, dtype=torch.bfloat16, bias=-10.0, seed=4)
    check_siglip(ours, ref, backend, torch.bfloat16, offset=100)
