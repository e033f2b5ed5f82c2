"""What both fused losses, InfoNCE (CLIP) and SigLIP, must do alike, each against its float64
eager reference: the loss and every gradient, on every implementation.

Each test runs both losses (``LOSSES``); where a loss has options the other lacks (InfoNCE's one
direction, SigLIP's negatives-only blocks), its cases add them. What only one loss does is in
test_contrastive.py and test_siglip.py.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
import triton
from helpers import (
    DEVICE,
    LOSS_BACKENDS,
    assert_close,
    check,
    check_siglip,
    gradient_requests,
    make_inputs,
    needs_cuda,
)

from fastclip import clip_loss, siglip_loss
from fastclip.kernels import launch
from fastclip.kernels.launch import INTERPRETER_CONFIG, TileConfig
from fastclip.measure import peak_memory_bytes
from fastclip.reference import clip_loss_exact, clip_loss_reference, siglip_loss_reference


class Loss(NamedTuple):
    fn: Callable  # the public function: (image, text, scale, bias, *, options)
    exact: Callable  # the float64 reference tests compare against
    eager: Callable  # the eager formula, whose low-precision error bounds ours
    check: Callable  # loss and every gradient against ``exact`` (helpers)


LOSSES = {
    "clip": Loss(clip_loss, clip_loss_exact, clip_loss_reference, check),
    "siglip": Loss(siglip_loss, siglip_loss_reference, siglip_loss_reference, check_siglip),
}
BACKENDS = LOSS_BACKENDS
TRITON = [name for name in BACKENDS if name != "torch"]
SMALL = INTERPRETER_CONFIG  # 16 x 16 tiles: even n ~ 40 runs several tiles and masked edges
# Wider chunks keep the interpreter fast at large D.
WIDE = TileConfig(block_m=16, block_n=16, block_k=64, block_d=128, num_stages=1)
# A G buffer of 24 x 24 fp32 entries: the bounded-block backends run many blocks, ragged ones.
TINY_BLOCKS = 24 * 24 * 8


def per_loss(common: list, **own: list) -> list:
    """Parameters (loss, n_img, n_txt, options): every common case for both losses, then each
    loss's own. ``options`` are keywords of the loss's check: offset, and InfoNCE's ``both``
    (directions) or SigLIP's ``negatives_only``."""
    cases = [(loss, case) for loss in LOSSES for case in common]
    cases += [(loss, case) for loss, extra in own.items() for case in extra]
    return [pytest.param(loss, *case, id=case_id(loss, *case)) for loss, case in cases]


def case_id(loss: str, n_img: int, n_txt: int, options: dict) -> str:
    return "-".join([loss, f"{n_img}x{n_txt}", *(f"{k}={v}" for k, v in options.items())])


def kernel_modules() -> list:
    """The modules of ``fastclip.kernels`` (all imported by ``fastclip.backends``)."""
    return [m for name, m in list(sys.modules.items()) if name.startswith("fastclip.kernels.")]


@pytest.fixture
def launches(monkeypatch):
    """(config, arguments) of every tiled kernel launch (``launch.launch``), in order."""
    seen, original = [], launch.launch

    def record(kernel, tuned, grid, config, args, *rest):
        seen.append((config, args))
        return original(kernel, tuned, grid, config, args, *rest)

    for module in kernel_modules():
        if getattr(module, "launch", None) is original:
            monkeypatch.setattr(module, "launch", record)
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "loss, n_img, n_txt, options",
    per_loss(
        [
            (1, 1, {}),
            (37, 37, {}),  # not a multiple of the tile
            (64, 64, {}),  # exactly four tiles
            (20, 45, {"offset": 7}),  # rectangular, positives shifted
            (20, 45, {"offset": 25}),  # positives in the last columns
        ],
        clip=[
            (20, 45, {"offset": 7, "both": False}),  # one direction (the distributed local loss)
            (45, 45, {"both": False}),
        ],
        siglip=[
            (20, 45, {"negatives_only": True}),  # another rank's texts
            (45, 20, {"negatives_only": True}),  # more images than texts
        ],
    ),
)
def test_shapes(backend, loss, n_img, n_txt, options):
    ours, ref = make_inputs(n_img, n_txt, 24, seed=n_img + n_txt)
    LOSSES[loss].check(ours, ref, backend, torch.float32, **options, config=SMALL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "loss, n_img, n_txt, options",
    per_loss(
        [(70, 70, {})],
        clip=[(45, 83, {"offset": 30, "both": False})],
        siglip=[(45, 83, {"offset": 30}), (45, 83, {"negatives_only": True})],
    ),
)
def test_many_small_blocks(backend, loss, n_img, n_txt, options):
    """A G buffer far smaller than the problem: blocks of 16-24 rows and columns, ragged at the
    edges, the positives crossing block boundaries (PyTorch path too: the same driver)."""
    ours, ref = make_inputs(n_img, n_txt, 24, bias=-3.0, seed=n_img)
    kw = {"block_bytes": TINY_BLOCKS, "config": SMALL}
    LOSSES[loss].check(ours, ref, backend, torch.float32, **options, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [1, 17, 64, 500, 512, 768, 1000, 1024])
@pytest.mark.parametrize("loss, offset", [("clip", 0), ("siglip", 2)])
def test_feature_widths(backend, dim, loss, offset):
    # D = 500, 1000 end in a masked chunk of WIDE's.
    ours, ref = make_inputs(19, 23, dim, seed=dim)
    LOSSES[loss].check(ours, ref, backend, torch.float32, offset=offset, config=WIDE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0, 1000.0])
@pytest.mark.parametrize("loss", LOSSES)
def test_scales_and_unnormalized_features(backend, scale, loss):
    # Unnormalized features at scale 1000 put logits in the thousands: InfoNCE needs an exact
    # logsumexp with a running max (a fixed maximum would overflow or underflow); SigLIP's
    # softplus and sigmoid must not overflow for either sign of S.
    ours, ref = make_inputs(29, 29, 20, scale=scale, bias=-10.0, norm=False, seed=3)
    LOSSES[loss].check(ours, ref, backend, torch.float32, config=SMALL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_no_bias_and_python_numbers(backend, loss):
    fn, exact, _, check_loss = LOSSES[loss]
    ours, ref = make_inputs(21, 21, 16, bias=None)
    check_loss(ours, ref, backend, torch.float32, config=SMALL)
    for bias in (None, -3.0):
        x, y = (t.detach().clone().requires_grad_() for t in ours[:2])
        ref_x, ref_y = (t.detach().clone().requires_grad_() for t in ref[:2])
        got = fn(x, y, 7.5, bias, backend=backend, config=SMALL)
        expected = exact(ref_x, ref_y, 7.5, bias)
        assert_close(got, expected, torch.float32, f"loss, bias {bias}")
        got.backward()
        expected.backward()
        assert_close(x.grad, ref_x.grad, torch.float32, f"d_image, bias {bias}")
        assert_close(y.grad, ref_y.grad, torch.float32, f"d_text, bias {bias}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_non_contiguous_inputs(backend, loss):
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
    ref = [t.requires_grad_() for t in ref]
    LOSSES[loss].check(ours, ref, backend, torch.float32, offset=3, config=SMALL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "loss, frozen",
    [(loss, (i,)) for loss in LOSSES for i in range(3)]
    + [("siglip", frozen) for frozen in [(3,), (2, 3), (0, 1)]],
    ids=lambda p: "frozen" + str(list(p)) if isinstance(p, tuple) else p,
)
def test_only_some_inputs_require_grad(backend, monkeypatch, loss, frozen):
    """Locked towers, a fixed scale or bias: no gradient for them, and none computed (InfoNCE's
    dL/ds comes with either feature gradient); the rest stays exact."""
    requests = gradient_requests(monkeypatch, loss)
    ours, ref = make_inputs(18, 26, 16, seed=len(frozen) + frozen[0])
    for i in frozen:
        ours[i].requires_grad_(False)
        ref[i].requires_grad_(False)
    LOSSES[loss].check(ours, ref, backend, torch.float32, offset=4, config=SMALL)
    assert all(ours[i].grad is None for i in frozen)
    live = [t.requires_grad for t in ours]
    wanted = (live[0], live[1]) if loss == "clip" else (live[0], live[1], live[2] or live[3])
    assert requests == [wanted]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_non_finite_features_give_non_finite_loss(backend, loss):
    for which in (0, 1):
        for bad in (float("nan"), float("inf"), float("-inf")):
            ours, _ = make_inputs(17, 19, 16)
            features = [t.detach().clone() for t in ours[:2]]
            features[which][3, 5] = bad
            got = LOSSES[loss].fn(*features, *ours[2:], offset=1, backend=backend, config=SMALL)
            assert not torch.isfinite(got), (which, bad)


@pytest.mark.parametrize("method", TRITON)
@pytest.mark.parametrize("loss", LOSSES)
def test_config_reaches_every_kernel(launches, loss, method):
    """The config given to the public function is the one every tiled kernel launches with,
    forward and backward."""
    config = TileConfig(16, 32, 16, 32, num_stages=1, col_split=2)
    ours, ref = make_inputs(20, 45, 16, seed=13)
    LOSSES[loss].check(ours, ref, method, torch.float32, offset=7, config=config)
    assert launches, "no kernel launched"
    assert all(c is config for c, _ in launches), [c for c, _ in launches]


@pytest.mark.parametrize("loss, n_img, n_txt", [("clip", 150, 160), ("siglip", 100, 110)])
def test_workspace_in_row_slices(launches, loss, n_img, n_txt):
    """A workspace budget smaller than the problem: both sweeps run in several row slices, the
    positives straddling the slice boundaries."""
    config = TileConfig(16, 16, 16, 16, num_stages=1, col_split=2)
    ours, ref = make_inputs(n_img, n_txt, 24, seed=9)
    workspace = 2 * 64 * 24 * 4  # 64 rows per slice
    LOSSES[loss].check(
        ours, ref, "fused", torch.float32, offset=6, block_bytes=workspace, config=config
    )
    assert_sliced(launches, config, n_img + n_txt, 64)


@pytest.mark.parametrize(
    "loss, n_img, n_txt, options",
    per_loss(
        [],
        clip=[(20, 100, {"offset": 30})],  # dy: 100 rows of y against 2 blocks of x
        siglip=[(100, 40, {"negatives_only": True})],  # 40 texts: 3 blocks
    ),
)
def test_workspace_in_row_slices_with_idle_column_chunks(launches, loss, n_img, n_txt, options):
    """More column chunks than column blocks (autotuned BN = 128 tiles give that whenever
    cdiv(n, 128) < col_split, so idle programs), and a last row slice shorter than the others:
    every chunk's workspace partial must be fresh, never a previous slice's."""
    config = TileConfig(16, 16, 16, 16, num_stages=1, col_split=7)
    ours, ref = make_inputs(n_img, n_txt, 16, seed=10)
    workspace = 7 * 64 * 16 * 4  # 64 rows per slice
    LOSSES[loss].check(
        ours, ref, "fused", torch.float32, **options, block_bytes=workspace, config=config
    )
    assert_sliced(launches, config, n_img + n_txt, 64)


def assert_sliced(launches, config, rows, slice_rows):
    """The fused gradient sweeps (the launches with a workspace) ran with ``config`` and its
    column chunks, over every row once, in slices of at most ``slice_rows``, some full."""
    swept = [(c, args) for c, args in launches if "acc_ptr" in args]
    assert swept, "no fused sweep launched"
    assert all(c is config for c, _ in swept), [c for c, _ in swept]
    assert all(args["acc_ptr"].shape[0] == config.col_split for _, args in swept)
    sliced = [args["n_a"] for _, args in swept]
    assert sum(sliced) == rows and max(sliced) == slice_rows, sliced


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", ["torch", "blocks", "blocks-mm"])
def test_block_memory_stays_within_the_budget(backend, loss):
    """Forward and backward with a 32 x 32 block buffer: the extra memory is the gradients, their
    accumulators and a few blocks, far below one N x N matrix (which eager allocates)."""
    n, dim, block = 256, 16, 32 * 32 * 8
    ours, ref = make_inputs(n, n, dim, bias=-1.0)
    fn = LOSSES[loss].fn
    run = lambda: fn(*ours, backend=backend, block_bytes=block, config=SMALL).backward()  # noqa: E731
    extra = peak_memory_bytes(run, DEVICE)
    bound = 4 * n * dim * 4 + 8 * block  # dx, dy, dy's accumulator, a panel; G, dots, scratch
    assert extra <= bound, f"{extra} bytes added, budget {bound}"
    eager = peak_memory_bytes(lambda: clip_loss_reference(*ref[:3]).backward(), DEVICE)
    assert eager > n * n * 8  # the measure sees an N x N matrix where there is one


# ---------------------------------------------------------------------------------------------
# CUDA only: low precision, autotuned configs, large shapes, memory
# ---------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, dim", [(1000, 512), (4096, 768), (3001, 1000)])
@pytest.mark.parametrize(
    "loss, scale, bias, compared",
    [
        pytest.param("clip", 100.0, 0.5, ("d_image", "d_text"), id="clip"),
        # SigLIP's initialization: scale 10, bias -10.
        pytest.param("siglip", 10.0, -10.0, ("d_image", "d_text", "d_scale", "d_bias"),
                     id="siglip"),
    ],
)  # fmt: skip
def test_low_precision_no_worse_than_eager(backend, dtype, n, dim, loss, scale, bias, compared):
    fn, exact, eager_fn, _ = LOSSES[loss]
    ours, ref = make_inputs(n, n, dim, dtype=dtype, scale=scale, bias=bias, seed=n)
    got = fn(*ours, backend=backend)
    got.backward()
    expected = exact(*ref)
    expected.backward()
    eager_in = [t.detach().clone().requires_grad_() for t in ours]
    eager = eager_fn(*eager_in)
    eager.backward()
    names = ("d_image", "d_text", "d_scale", "d_bias")
    triples = [("loss", got, expected, eager)]
    triples += [
        (name, a.grad, b.grad, e.grad)
        for name, a, b, e in zip(names, ours, ref, eager_in, strict=True)
        if name in compared
    ]
    for name, a, b, e in triples:
        err = (a.double().cpu() - b.double().cpu()).abs().max().item()
        eager_err = (e.double().cpu() - b.double().cpu()).abs().max().item()
        bound = 2 * eager_err + 1e-3 * b.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > 2 x eager's {eager_err:.3g} (+slack)"


@needs_cuda
@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "loss, options",
    [("clip", {}), ("siglip", {}), ("siglip", {"negatives_only": True})],
    ids=["clip", "siglip", "siglip-negatives-only"],
)
def test_autotuned_matches_reference(backend, dtype, loss, options, monkeypatch):
    monkeypatch.setenv("FASTCLIP_AUTOTUNE", "1")
    warm_up, _ = make_inputs(2500, 2600, 512, dtype=dtype, bias=-5.0, seed=2)
    LOSSES[loss].fn(*warm_up, backend=backend).backward()  # tunes (see the next test)
    ours, ref = make_inputs(2500, 2600, 512, dtype=dtype, bias=-5.0, seed=2)
    LOSSES[loss].check(ours, ref, backend, dtype, offset=50, **options)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", LOSSES)
def test_autotuning_call_matches_reference(dtype, loss, monkeypatch):
    """The call that runs the tuning returns the chosen config's results, nothing else."""
    monkeypatch.setenv("FASTCLIP_AUTOTUNE", "1")
    for module in kernel_modules():  # the next call tunes every kernel afresh
        for tuned in vars(module).values():
            if isinstance(tuned, triton.runtime.Autotuner):
                tuned.cache.clear()
    for backend in TRITON:
        ours, ref = make_inputs(2500, 2600, 512, dtype=dtype, bias=-5.0, seed=2)
        LOSSES[loss].check(ours, ref, backend, dtype, offset=50)


@needs_cuda
@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("loss", LOSSES)
def test_memory_grows_linearly_not_quadratically(backend, loss):
    n, dim = 16384, 256
    ours, _ = make_inputs(n, n, dim, dtype=torch.bfloat16, bias=-10.0)
    block = 32 * 2**20
    fn = LOSSES[loss].fn
    run = lambda: fn(*ours, backend=backend, block_bytes=block).backward()  # noqa: E731
    extra = peak_memory_bytes(run, DEVICE)
    bound = n * dim * 8 + 2 * block  # the gradients, their fp32 accumulator, the G buffer
    assert extra < bound, f"fwd+bwd added {extra / 2**20:.0f} MiB; N x N is 512 MiB"


@needs_cuda
@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("loss", LOSSES)
def test_fixed_default_tiles_without_autotuning(backend, loss, monkeypatch):
    monkeypatch.setenv("FASTCLIP_AUTOTUNE", "0")
    ours, ref = make_inputs(1500, 1700, 768, dtype=torch.bfloat16, bias=-10.0, seed=4)
    LOSSES[loss].check(ours, ref, backend, torch.bfloat16, offset=100)


@needs_cuda
@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("loss", LOSSES)
def test_a_step_captures_in_a_cuda_graph(backend, loss):
    """No host sync and static shapes: a full step captures in a CUDA graph (after warm-up runs
    on a side stream), and replaying it on new features copied into the captured ones gives the
    eager step's loss and gradients."""
    ours, _ = make_inputs(1000, 1000, 512, dtype=torch.bfloat16, bias=-5.0, seed=1)
    fresh, _ = make_inputs(1000, 1000, 512, dtype=torch.bfloat16, bias=-5.0, seed=2)
    fn = LOSSES[loss].fn

    def step():
        value = fn(*ours, backend=backend)
        return value, *torch.autograd.grad(value, ours[:2])

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for static, new in zip(ours, fresh, strict=True):
            static.copy_(new)
    graph.replay()
    expected = (lambda v: (v, *torch.autograd.grad(v, fresh[:2])))(fn(*fresh, backend=backend))
    for name, got, want in zip(("loss", "dx", "dy"), captured, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6, msg=name)
