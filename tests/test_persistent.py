"""The persistent sweeps (kernels/persistent.py, persistent_siglip.py) against the float64
references, in fp16: what their TMA descriptors read (16-bit rows of 16-byte multiples).
Padding, offsets, bias, one and both directions, confident batches, the one-exponential path and
its range fallback, one program and more programs than tiles, many blocks; which kernels ran,
and that features TMA cannot read take the bounded blocks' kernels. test_losses.py runs
"persistent" beside the other implementations on every shared case.
"""

from __future__ import annotations

import pytest
import torch
from helpers import check, check_siglip, make_inputs, needs_cuda

from fastclip.kernels import contrastive, persistent, persistent_siglip, sweeps
from fastclip.kernels.launch import TileConfig, persistent_programs

FP16 = torch.float16


def tiles(programs: int) -> TileConfig:
    """16 x 16 tiles (the smallest ``tl.dot`` compiles) over ``programs`` persistent programs."""
    return TileConfig(block_m=16, block_n=16, block_k=16, num_stages=1, programs=programs)


@pytest.fixture
def launched(monkeypatch):
    """(kernel, grid) of every launch of the forwards and the block sweeps."""
    seen = []
    for module in (contrastive, sweeps):
        original = module.launch

        def record(kernel, tuned, grid, config, args, *rest, original=original):
            seen.append((kernel, grid({"BM": 16, "BN": 16})))
            return original(kernel, tuned, grid, config, args, *rest)

        monkeypatch.setattr(module, "launch", record)
    return seen


# (n_img, n_txt, D, offset, programs, block_bytes): ragged edges (40 = 2 x 16 + 8), offsets,
# one program, more programs than tiles, and many blocks of G (offsets across blocks).
CASES = [
    (40, 40, 24, 0, 3, None),
    (20, 45, 16, 7, 2, None),
    (33, 33, 32, 0, 1, None),
    (17, 19, 16, 1, 50, None),
    (70, 70, 16, 0, 4, 32 * 48 * 2),
]


@pytest.mark.parametrize("n_img, n_txt, dim, offset, programs, block_bytes", CASES)
@pytest.mark.parametrize("both", [True, False])
def test_infonce(launched, n_img, n_txt, dim, offset, programs, block_bytes, both):
    ours, ref = make_inputs(n_img, n_txt, dim, dtype=FP16, seed=n_img)
    check(ours, ref, "persistent", FP16, offset=offset, both=both, block_bytes=block_bytes,
          config=tiles(programs))  # fmt: skip
    kernels = {kernel for kernel, _ in launched}
    assert kernels == {persistent._forward_kernel, persistent._gradient_kernel}, kernels
    grids = [grid for kernel, grid in launched if kernel is persistent._gradient_kernel]
    assert grids and all(grid == (programs,) for grid in grids), grids


@pytest.mark.parametrize("n_img, n_txt, dim, offset, programs, block_bytes", CASES)
@pytest.mark.parametrize("bias", [0.5, None])
def test_siglip(launched, n_img, n_txt, dim, offset, programs, block_bytes, bias):
    ours, ref = make_inputs(n_img, n_txt, dim, dtype=FP16, bias=bias, seed=n_img)
    check_siglip(ours, ref, "persistent", FP16, offset=offset, block_bytes=block_bytes,
                 config=tiles(programs))  # fmt: skip
    assert {kernel for kernel, _ in launched} == {persistent_siglip._gradient_kernel}


def test_siglip_negatives_only(launched):
    ours, ref = make_inputs(30, 40, 16, dtype=FP16, bias=-2.0, seed=3)
    check_siglip(ours, ref, "persistent", FP16, negatives_only=True, config=tiles(3))
    assert {kernel for kernel, _ in launched} == {persistent_siglip._gradient_kernel}


@pytest.mark.parametrize("scale", [100.0, 1000.0])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_confident_batches(loss, scale):
    """Positives far above the negatives: softmaxes one-hot, sigmoids saturated."""
    ours, ref = make_inputs(40, 40, 16, dtype=FP16, scale=scale, seed=5)
    checker = check if loss == "clip" else check_siglip
    checker(ours, ref, "persistent", FP16, vanishing=True, config=tiles(3))


@pytest.mark.parametrize("guard", [0.0, 1e9])
def test_range_fallback_and_one_exponential(monkeypatch, guard):
    """Rows of very different norms spread the tiles' log-normalizers: with the guard at 0 every
    tile of G takes the two exponentials, at 1e9 every one the single one; both exact here."""
    monkeypatch.setattr(persistent, "RANGE", guard)
    ours, ref = make_inputs(40, 40, 16, dtype=FP16, scale=5.0, seed=8, row_norms=(0.5, 2.0))
    check(ours, ref, "persistent", FP16, config=tiles(3))


def test_wide_spread_takes_both_paths():
    """Log-normalizers spread far beyond the guard within some tiles and not others: the
    fallback keeps the gradients exact where the single exponential would underflow."""
    ours, ref = make_inputs(64, 64, 16, dtype=FP16, scale=30.0, seed=2, row_norms=(0.05, 20.0))
    check(ours, ref, "persistent", FP16, vanishing=True, config=tiles(3))


@pytest.mark.parametrize("dtype, dim", [(torch.float32, 16), (FP16, 20)])
def test_features_tma_cannot_read_take_the_blocks(launched, dtype, dim):
    """fp32 features, and 16-bit rows of 40 bytes, are not TMA's: the bounded blocks' kernels
    compute them."""
    ours, ref = make_inputs(20, 20, dim, dtype=dtype, seed=4)
    check(ours, ref, "persistent", dtype, config=tiles(3))
    assert launched and not any(k.__module__ == persistent.__name__ for k, _ in launched)


def test_programs_default_to_a_few_under_the_interpreter():
    assert persistent_programs(torch.device("cpu")) == 3
    assert persistent_programs(torch.device("cpu"), tiles(7)) == 7


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, dim, offset", [(4096, 512, 0), (3001, 768, 40)])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_gpu_configs_match_the_reference(launched, loss, dtype, n, dim, offset):
    """On a GPU, with the configs it launches (the first that fits, or autotuned) and one wave
    of 2 CTAs per SM: the persistent kernels ran, and match the float64 reference."""
    ours, ref = make_inputs(n - offset, n, dim, dtype=dtype, scale=30.0, bias=-5.0, seed=n)
    checker = check if loss == "clip" else check_siglip
    checker(ours, ref, "persistent", dtype, offset=offset)
    g_kernels = {persistent._gradient_kernel, persistent_siglip._gradient_kernel}
    grids = [grid for kernel, grid in launched if kernel in g_kernels]
    assert grids and set(grids) == {(persistent_programs(ours[0].device),)}, launched
