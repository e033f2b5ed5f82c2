"""Tiled similarity and fused top-k retrieval against float64 references: values, gradients,
ties, non-finite scores, forced tiles and argument checking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import CUDA, DEVICE, TOLERANCES, assert_close, make_inputs, needs_cuda

import fastclip.kernels.launch as kt
import fastclip.kernels.similarity as ksim
from fastclip import chunked, similarity, topk_similarity
from fastclip.measure import peak_memory_bytes
from fastclip.reference import similarity_reference

BACKENDS = ["torch", "triton"]
SMALL = kt.INTERPRETER_CONFIG  # 16 x 16 tiles: n ~ 40 runs several tiles and masked edges
WIDE = kt.TileConfig(block_m=16, block_n=16, block_k=128, num_stages=1)
NAN = float("nan")


def inputs(n_a, n_b, dim, seed=0, **kwargs):
    """(ours, ref) for similarity(a, b, scale, bias): unnormalized rows, scale 3, bias -0.5."""
    return make_inputs(n_a, n_b, dim, scale=3.0, bias=-0.5, norm=False, seed=seed, **kwargs)


def check_similarity(ours, ref, backend, normalize=False, out_dtype=None, dtype=torch.float32,
                     config=None):  # fmt: skip
    """S and the gradient of every input that requires grad, for a random dS."""
    kw = {"normalize": normalize, "out_dtype": out_dtype, "backend": backend, "config": config}
    got = similarity(*ours, **kw)
    expected = similarity_reference(*ref, normalize=normalize)
    assert got.dtype == (out_dtype or ours[0].dtype)
    assert_close(got, expected, dtype, "S")
    dS = torch.randn(
        expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    got.backward(dS.to(DEVICE, got.dtype))
    expected.backward(dS)
    floors = row_gradient_sizes(ref, dS, normalize) + [1e-6, 1e-6]
    names = ("d_a", "d_b", "d_scale", "d_bias")[: len(ours)]
    for name, a, b, floor in zip(names, ours, ref, floors[: len(ours)], strict=True):
        if not isinstance(a, torch.Tensor):
            continue
        if a.requires_grad:
            assert a.grad is not None and a.grad.dtype == a.dtype, name
            assert a.grad.shape == a.shape, name
            assert_close(a.grad, b.grad, dtype, name, floor=floor)
        else:
            assert a.grad is None, f"{name} computed though not required"


def row_gradient_sizes(ref, dS, normalize):
    """Natural sizes of d_a and d_b: s dS b_hat / ||a|| before normalization's projection, which
    can cancel it (exactly for D = 1, leaving fp32 rounding of that size)."""
    a, b, s = (t.detach() if isinstance(t, torch.Tensor) else t for t in [*ref, 1.0][:3])
    inv_a = inv_b = 1.0
    if normalize:
        inv_a, inv_b = (1 / x.norm(dim=1, keepdim=True).clamp(min=1e-12) for x in (a, b))
        a, b = a * inv_a, b * inv_b
    s = abs(float(s))
    return [(s * (dS @ b) * inv_a).abs().max().item(), (s * (dS.T @ a) * inv_b).abs().max().item()]


def scores(queries, keys, scale=1.0, normalize=False):
    """The float64 score matrix of the inputs as given (already rounded to their dtype)."""
    q, k = queries.detach().double().cpu(), keys.detach().double().cpu()
    return similarity_reference(q, k, scale, normalize=normalize)


def check_topk(values, indices, expected_scores, k, dtype=torch.float32):
    """values match torch.topk of the float64 scores (to ``dtype``'s tolerance); indices are
    distinct keys that score them (ties and near-ties may pick other keys of the same score;
    the choice is made on fp32 scores)."""
    n_q, n_k = expected_scores.shape
    assert values.shape == indices.shape == (n_q, k)
    assert indices.dtype == torch.int64
    assert not values.requires_grad
    expected = expected_scores.topk(k, dim=1).values
    assert_close(values, expected, dtype, "top-k values")
    idx = indices.cpu()
    out_of_range = (idx < 0) | (idx >= n_k)
    assert not out_of_range.any(), f"indices out of [0, {n_k}): {idx[out_of_range].tolist()[:8]}"
    repeated = (idx.sort(dim=1).values.diff(dim=1) == 0).sum().item()
    assert repeated == 0, f"{repeated} repeated indices"
    chosen = expected_scores.gather(1, idx)
    assert_close(chosen, expected, torch.float32, "scores of the returned keys")


# ---------------------------------------------------------------------------------------------
# similarity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("n_a, n_b", [(1, 1), (17, 33), (33, 17), (32, 48)])
def test_similarity_shapes(backend, normalize, n_a, n_b):
    config = SMALL
    ours, ref = inputs(n_a, n_b, 24, seed=n_a + n_b, row_norms=(0.1, 10.0))
    check_similarity(ours, ref, backend, normalize, config=config)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("dim", [1, 17, 64, 500])
def test_similarity_feature_widths(backend, normalize, dim):
    config = WIDE  # D = 500 ends in a masked chunk of the 128-wide feature loop
    ours, ref = inputs(19, 23, dim, seed=dim)
    check_similarity(ours, ref, backend, normalize, config=config)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float64])
def test_similarity_out_dtype(backend, out_dtype):
    """fp32 features stored as fp32 or fp64 (fp32 products either way)."""
    config = SMALL
    ours, ref = inputs(18, 21, 20, seed=2)
    check_similarity(ours, ref, backend, normalize=True, out_dtype=out_dtype, config=config)


def test_similarity_float64_on_the_torch_backend():
    ours, ref = inputs(12, 15, 20, dtype=torch.float64, seed=3)
    ours[2:] = [t.detach().double().requires_grad_() for t in ours[2:]]
    check_similarity(ours, ref, "torch", normalize=True, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
def test_similarity_non_contiguous_inputs(backend, normalize):
    config = SMALL
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(33, 48, generator=gen, dtype=torch.float64)
    stored_transposed = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    a = wide.float().to(DEVICE)[:, ::2].detach()  # column stride 2
    b = stored_transposed.float().to(DEVICE).T.detach()  # (40, 24), row stride 1
    assert not a.is_contiguous() and not b.is_contiguous()
    ours = [a, b] + [torch.tensor(v, device=DEVICE) for v in (5.0, -2.0)]
    ref = [wide[:, ::2].clone(), stored_transposed.T.clone()]
    ref += [torch.tensor(v, dtype=torch.float64) for v in (5.0, -2.0)]
    ours, ref = ([t.requires_grad_() for t in ts] for ts in (ours, ref))
    check_similarity(ours, ref, backend, normalize, config=config)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "scale, bias",
    [(2.5, -1.0), (2.5, 0.0), (None, None), ("tensor-0d", "tensor-0d"), ("tensor-1", "tensor-1")],
    ids=["numbers", "no-bias", "defaults", "0-d-tensors", "1-element-tensors"],
)
def test_similarity_numbers_and_tensors(backend, scale, bias):
    config = SMALL
    ours, ref = inputs(13, 19, 16, seed=4)
    if scale == "tensor-1":  # shape (1,): gradients keep it
        ours[2:], ref[2:] = (
            [t.detach().reshape(1).requires_grad_() for t in ts[2:]] for ts in (ours, ref)
        )
    elif scale is None:  # similarity's defaults: 1 and 0
        ours, ref = ours[:2], ref[:2]
    elif scale != "tensor-0d":
        ours[2:], ref[2:] = [scale, bias], [scale, bias]
    check_similarity(ours, ref, backend, normalize=True, config=config)


@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_zero_row_with_normalize(backend):
    """A zero row's norm is clamped to 1e-12 (F.normalize): finite scores equal to the bias, and
    finite gradients (dS b / 1e-12 for that row) that match the reference."""
    config = SMALL
    ours, ref = inputs(20, 18, 16, seed=6)
    for i, row in ((0, 3), (1, 17)):
        with torch.no_grad():
            ours[i][row] = 0.0
            ref[i][row] = 0.0
    got = similarity(*ours, normalize=True, backend=backend, config=config)
    expected = similarity_reference(*ref, normalize=True)
    assert torch.isfinite(got).all()
    assert_close(got, expected, torch.float32, "S")
    assert torch.equal(got[3], torch.full_like(got[3], -0.5))
    dS = torch.randn(
        expected.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    got.backward(dS.to(DEVICE, torch.float32))
    expected.backward(dS)
    for name, i, row in (("d_a", 0, 3), ("d_b", 1, 17)):
        grad = ours[i].grad
        assert torch.isfinite(grad).all(), name
        others = torch.arange(grad.shape[0]) != row
        assert_close(grad[row], ref[i].grad[row], torch.float32, f"{name}, zero row")
        assert_close(grad[others], ref[i].grad[others], torch.float32, f"{name}, other rows")
    for name, i in (("d_scale", 2), ("d_bias", 3)):
        assert_close(ours[i].grad, ref[i].grad, torch.float32, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "frozen", [(0,), (1,), (2,), (3,), (0, 1), (0, 2, 3), (1, 2, 3)], ids=lambda f: f"frozen{f}"
)
def test_similarity_only_some_inputs_require_grad(backend, frozen):
    config = SMALL
    ours, ref = inputs(18, 26, 16, seed=len(frozen) + frozen[0], row_norms=(0.5, 2.0))
    for i in frozen:
        ours[i].requires_grad_(False)
        ref[i].requires_grad_(False)
    check_similarity(ours, ref, backend, normalize=True, config=config)


def test_similarity_without_grad_is_a_constant():
    ours, _ = inputs(9, 11, 16)
    with torch.no_grad():
        assert not similarity(*ours, backend="triton").requires_grad
    assert not similarity(*(t.detach() for t in ours), backend="triton").requires_grad


SIMILARITY_CONFIGS = {
    "16x16x16": SMALL,
    "16x32x16": kt.TileConfig(block_m=16, block_n=32, block_k=16, num_stages=1),
    "32x16x64": kt.TileConfig(block_m=32, block_n=16, block_k=64, num_stages=1),  # BK > D
    "64x16x32": kt.TileConfig(block_m=64, block_n=16, block_k=32, num_stages=1),
}


@pytest.mark.parametrize("bias", [None, -0.75], ids=["no-bias", "bias"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("config", SIMILARITY_CONFIGS.values(), ids=SIMILARITY_CONFIGS.keys())
def test_similarity_forward_configs(config, normalize, bias):
    """Straight from the launcher: 150 rows make 10 row blocks of 16, more than one program
    group (8 row blocks), the last group partial."""
    gen = torch.Generator().manual_seed(7)
    a, b = (torch.randn(n, 20, generator=gen, dtype=torch.float64) for n in (150, 40))
    scale = torch.tensor(1.5, device=DEVICE)
    bias_t = None if bias is None else torch.tensor(bias, device=DEVICE)
    a_, b_ = a.float().to(DEVICE), b.float().to(DEVICE)
    inv = [ksim.inverse_norms(x, 1e-12) for x in (a_, b_)] if normalize else [None, None]
    got = ksim.similarity_forward(a_, b_, scale, bias_t, *inv, torch.float32, config=config)
    expected = similarity_reference(a, b, 1.5, bias or 0.0, normalize=normalize)
    assert_close(got, expected, torch.float32, "S")


def test_inverse_norms():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(70, 300, generator=gen, dtype=torch.float64)  # 3 row programs, 3 chunks
    x[5] = 0.0
    got = ksim.inverse_norms(x.float().to(DEVICE), 1e-12)
    assert got.dtype == torch.float32
    expected = 1 / x.norm(dim=1).clamp(min=1e-12)
    assert_close(got[x.norm(dim=1) > 0], expected[x.norm(dim=1) > 0], torch.float32, "1/||x||")
    assert_close(got[5], expected[5], torch.float32, "zero row")


# ---------------------------------------------------------------------------------------------
# topk_similarity
# ---------------------------------------------------------------------------------------------


def random_pair(n_q, n_k, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_q, dim, generator=gen)
    keys = torch.randn(n_k, dim, generator=gen)
    return q.to(DEVICE), keys.to(DEVICE)


# (n_q, n_k, k, normalize, scale): on the interpreter's 16 x 16 tiles
TOPK_CASES = {
    "k1-one-query": (1, 30, 1, False, 1.0),
    "k5-normalized": (13, 30, 5, True, 1.0),
    "k16-negative-scale": (13, 30, 16, False, -2.5),
    "k17-normalized-negative": (13, 45, 17, True, -20.0),  # k pads to 32
    "k-all-keys": (13, 20, 20, False, 0.5),  # 12 padding columns
    "k100": (5, 150, 100, True, 3.0),  # k pads to 128
    "k128-all-keys": (5, 128, 128, False, 1.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", TOPK_CASES.values(), ids=TOPK_CASES.keys())
def test_topk(backend, case):
    n_q, n_k, k, normalize, scale = case
    if backend == "triton" and k > 64 and not CUDA:
        pytest.skip("width-128 merges take ~10 s each under Triton's interpreter")
    q, keys = random_pair(n_q, n_k, 24, seed=k)
    values, indices = topk_similarity(q, keys, k, scale=scale, normalize=normalize, backend=backend)
    assert values.dtype == torch.float32
    check_topk(values, indices, scores(q, keys, scale, normalize), k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_exact_ties(backend):
    """Ten distinct keys, each stored four times, spread over three tiles and two chunks:
    every score is tied, and the top 7 cut through a group of equals."""
    config = kt.TileConfig(block_m=16, block_n=16, block_k=16, num_stages=1, col_split=2)
    q, base = random_pair(6, 10, 8, seed=9)
    keys = base[torch.arange(40) % 10]
    values, indices = topk_similarity(q, keys, 7, backend=backend, config=config)
    check_topk(values, indices, scores(q, keys), 7)
    # All four copies of the best key, then three of the second best's.
    best = scores(q, base).argsort(dim=1, descending=True)[:, :2]
    assert torch.equal(indices.cpu() % 10, best.repeat_interleave(torch.tensor([4, 3]), dim=1))


def test_topk_many_more_keys_than_queries():
    """2000 keys (125 tiles, 2 chunks) for two queries: three relevant keys scattered among
    distractors orthogonal to every query (score 0), so that most tiles are skipped and the
    merges that do run come late. (Random keys merge on most tiles: slow on the interpreter.)"""
    config = kt.TileConfig(block_m=16, block_n=16, block_k=16, num_stages=1, col_split=2)
    gen = torch.Generator().manual_seed(10)
    q = torch.zeros(2, 4)
    q[:, :2] = torch.rand(2, 2, generator=gen) + 0.5  # positive: relevant keys score > 0
    keys = torch.zeros(2000, 4)
    keys[:, 2:] = torch.randn(2000, 2, generator=gen)
    relevant = torch.randperm(2000, generator=gen)[:3]
    keys[relevant, :2] = torch.rand(3, 2, generator=gen) + 0.1
    q, keys = q.to(DEVICE), keys.to(DEVICE)
    # And two tied zeros.
    values, indices = topk_similarity(q, keys, 5, backend="triton", config=config)
    check_topk(values, indices, scores(q, keys), 5)
    assert set(indices[:, :3].flatten().tolist()) == set(relevant.tolist())


@needs_cuda
@pytest.mark.parametrize("normalize", [False, True])
def test_topk_random_keys_many_more_than_queries(normalize):
    q, keys = random_pair(3, 20000, 8, seed=11)
    values, indices = topk_similarity(q, keys, 10, normalize=normalize, backend="triton")
    check_topk(values, indices, scores(q, keys, normalize=normalize), 10)


TOPK_CONFIGS = {
    "split-2": kt.TileConfig(block_m=16, block_n=16, block_k=16, num_stages=1, col_split=2),
    # More chunks than key blocks: two chunks are empty and return only placeholders.
    "oversplit": kt.TileConfig(block_m=16, block_n=16, block_k=16, num_stages=1, col_split=5),
    # 32 rows; 32-wide key tiles, twice k's padded width: each tile's sort keeps its best half.
    "32x32-one-chunk": kt.TileConfig(block_m=32, block_n=32, block_k=32, num_stages=1, col_split=1),
}


@pytest.mark.parametrize("config", TOPK_CONFIGS.values(), ids=TOPK_CONFIGS.keys())
def test_topk_forward_configs(config):
    """Straight from the launcher: 3 key blocks of 16, normalized, non-contiguous operands."""
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(13, 40, generator=gen)[:, ::2].to(DEVICE)  # column stride 2
    keys = torch.randn(20, 40, generator=gen).to(DEVICE).T  # (40, 20), row stride 1
    inv = [ksim.inverse_norms(x, 1e-12) for x in (q, keys)]
    scale = torch.tensor(-4.0, device=DEVICE)
    values, indices = ksim.topk_forward(q, keys, 5, scale, *inv, config=config)
    check_topk(values, indices, scores(q, keys, -4.0, normalize=True), 5)


@pytest.mark.parametrize(
    "chunk",
    [
        2,  # less than k / 2: the first chunks hold fewer than k scores
        3,  # smaller than k, more than k / 2
        5,  # equal to k
        7,
        44,  # one short chunk at the end
        1000,  # all keys in one step
        None,
    ],
)
def test_topk_torch_chunks(chunk):
    q, keys = random_pair(7, 45, 16, seed=13)
    values, indices = topk_similarity(q, keys, 5, scale=2.0, chunk=chunk, backend="torch")
    check_topk(values, indices, scores(q, keys, 2.0), 5)


def test_topk_torch_default_chunks(monkeypatch):
    """chunk=None splits the keys by TOPK_CHUNK_ELEMENTS (here 7 queries x 9 keys per step)."""
    monkeypatch.setattr(chunked, "TOPK_CHUNK_ELEMENTS", 63)
    q, keys = random_pair(7, 45, 16, seed=14)
    values, indices = topk_similarity(q, keys, 5, normalize=True, backend="torch")
    check_topk(values, indices, scores(q, keys, normalize=True), 5)


@pytest.mark.parametrize("n", [4096, 8192])
def test_topk_torch_memory_is_n_k_plus_one_block(n):
    """On the CPU, at any N: the PyTorch top-k's peak memory is its (N, k) result and one block
    of TOPK_CHUNK_ELEMENTS scores (16 MiB), where eager's N x N scores take 64 MiB at N = 4,096."""
    k, cpu = 10, torch.device("cpu")
    gen = torch.Generator().manual_seed(17)
    q, keys = (torch.randn(n, 16, generator=gen) for _ in range(2))
    peak = peak_memory_bytes(lambda: topk_similarity(q, keys, k, backend="torch"), cpu)
    result = n * k * (4 + 8)  # fp32 values, int64 indices
    bound = chunked.TOPK_CHUNK_ELEMENTS * 4 + 4 * result  # the block; the result, merges, top-ks
    assert peak <= bound, f"{peak / 2**20:.1f} MiB at N = {n}, bound {bound / 2**20:.1f} MiB"
    assert peak < n * n * 4 / 3, "not below eager's scores"
    if n == 4096:
        check_topk(*topk_similarity(q, keys, k, backend="torch"), scores(q, keys), k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_has_no_grad(backend):
    q, keys = (t.requires_grad_() for t in random_pair(5, 16, 8, seed=15))
    scale = torch.tensor(2.0, device=DEVICE, requires_grad=True)
    values, indices = topk_similarity(q, keys, 3, scale=scale, normalize=True, backend=backend)
    assert not values.requires_grad and values.grad_fn is None
    assert not indices.requires_grad
    check_topk(values, indices, scores(q, keys, 2.0, normalize=True), 3)


@pytest.mark.parametrize(
    "backend, nan",
    [
        ("torch", NAN),
        ("torch", -NAN),
        ("triton", NAN),
        ("triton", -NAN),
    ],
    ids=["torch-nan", "torch-negative-nan", "triton-nan", "triton-negative-nan"],
)
def test_topk_nan_key_counts_as_largest(backend, nan):
    """As torch.topk: a NaN score, of either sign, ranks above every number."""
    q, keys = random_pair(3, 16, 16, seed=16)
    keys[7, 3] = nan
    values, indices = topk_similarity(q, keys, 16, backend=backend)
    expected = scores(q, keys).topk(16, dim=1)
    assert values[:, 0].isnan().all() and (indices[:, 0] == 7).all()
    assert_close(values[:, 1:], expected.values[:, 1:], torch.float32, "values after the NaN")
    assert torch.equal(indices.sort(dim=1).values.cpu(), torch.arange(16).expand(3, 16))


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        "triton",
    ],
)
def test_topk_minus_inf_scores_return_real_keys(backend):
    q = torch.ones(2, 16, device=DEVICE)
    keys = torch.ones(10, 16, device=DEVICE)
    keys[:, 0] = float("-inf")  # every score is -inf: any 5 distinct keys will do
    values, indices = topk_similarity(q, keys, 5, backend=backend)
    assert (values == float("-inf")).all()
    assert ((indices >= 0) & (indices < 10)).all(), indices.tolist()


# ---------------------------------------------------------------------------------------------
# Argument checking
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch, or the PyTorch top-k, fails the test: errors must come before it."""

    def launched(*args, **kwargs):
        raise AssertionError("work started before the bad argument was rejected")

    for name in ("similarity_forward", "topk_forward", "inverse_norms"):
        monkeypatch.setattr(ksim, name, launched)
    monkeypatch.setattr(chunked, "topk", launched)


def features(n=6, dim=8, dtype=torch.float32, device=DEVICE):
    return torch.randn(n, dim, dtype=dtype, device=device)


# Each case: a function of (x, y) for both ops; `match` names the argument. {x}/{y} become
# a/b for similarity and queries/keys for topk_similarity.
BAD_PAIRS = {
    "x-not-tensor": (
        lambda: ([[0.0] * 8] * 6, features()),
        TypeError,
        "{x} must be a torch.Tensor",
    ),
    "y-not-tensor": (
        lambda: (features(), features().cpu().numpy()),
        TypeError,
        "{y} must be a torch",
    ),
    "x-1d": (lambda: (features()[0], features()), ValueError, "{x} must be 2-D"),
    "y-3d": (lambda: (features(), features()[None]), ValueError, "{y} must be 2-D"),
    "x-empty": (lambda: (features(0), features()), ValueError, "{x} is an empty batch"),
    "zero-width": (lambda: (features(dim=0), features(dim=0)), ValueError, "{x} has zero feature"),
    "widths-differ": (
        lambda: (features(dim=8), features(dim=9)),
        ValueError,
        "{x} and {y} must have the same feature width",
    ),
    "devices-differ": (
        lambda: (features(), features(device="meta")),
        ValueError,
        "{y} is on the meta device",
    ),
    "dtypes-differ": (
        lambda: (features(), features(dtype=torch.float64)),
        TypeError,
        "{x} is torch.float32 but {y} is torch.float64",
    ),
    "integer-x": (lambda: (features().long(), features()), TypeError, "{x} must be a floating"),
    "integer-y": (lambda: (features(), features().int()), TypeError, "{y} must be a floating"),
}
OPS = {
    "similarity": (lambda x, y, backend: similarity(x, y, backend=backend), "a", "b"),
    "topk": (lambda x, y, backend: topk_similarity(x, y, 3, backend=backend), "queries", "keys"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
@pytest.mark.parametrize("case", BAD_PAIRS.values(), ids=BAD_PAIRS.keys())
def test_bad_features_raise_naming_the_argument(no_launch, case, op, backend):
    make_args, error, match = case
    call, x, y = op
    with pytest.raises(error, match=match.format(x=x, y=y)):
        call(*make_args(), backend)


# Each case: keyword arguments of similarity -> (error, match).
BAD_SIMILARITY_ARGS = {
    "scale-shape-2": (
        {"scale": torch.ones(2, device=DEVICE)},
        ValueError,
        "scale must be a scalar",
    ),
    "scale-string": ({"scale": "2"}, TypeError, "scale must be a tensor or a number"),
    "scale-bool": ({"scale": True}, TypeError, "scale must be a tensor or a number"),
    "scale-integer-tensor": (
        {"scale": torch.tensor(2, device=DEVICE)},
        TypeError,
        "scale must be a floating-point tensor",
    ),
    "scale-other-device": (
        {"scale": torch.tensor(1.0, device="meta")},
        ValueError,
        "scale is on meta",
    ),
    "bias-shape-2": ({"bias": torch.zeros(2, device=DEVICE)}, ValueError, "bias must be a scalar"),
    "scale-nan": ({"scale": float("nan")}, ValueError, "scale must be finite"),
    "scale-inf-tensor": (
        {"scale": torch.tensor(float("inf"), device=DEVICE)},
        ValueError,
        "scale must be finite",
    ),
    "bias-nan": ({"bias": torch.tensor(float("nan"), device=DEVICE)}, ValueError, "bias must be"),
    "out-dtype-int": ({"out_dtype": torch.int32}, TypeError, "out_dtype must be a floating"),
    "out-dtype-string": ({"out_dtype": "float32"}, TypeError, "out_dtype must be a floating"),
    "out-dtype-complex": ({"out_dtype": torch.complex64}, TypeError, "out_dtype must be a"),
    "unknown-backend": ({"backend": "cuda"}, ValueError, "backend must be one of"),
}
# Each case: keyword arguments of topk_similarity (k=3 unless given) -> (error, match).
BAD_TOPK_ARGS = {
    "k-zero": ({"k": 0}, ValueError, r"k must be between 1 and the number of keys \(6\)"),
    "k-negative": ({"k": -1}, ValueError, "k must be between 1"),
    "k-above-n-keys": ({"k": 7}, ValueError, r"k must be between 1 and the number of keys \(6\)"),
    "k-float": ({"k": 3.0}, TypeError, "k must be an int"),
    "k-bool": ({"k": True}, TypeError, "k must be an int"),
    "k-float-tensor": ({"k": torch.tensor(3.0)}, TypeError, "k must be an int"),
    "chunk-zero": ({"chunk": 0}, ValueError, "chunk must be a positive int"),
    "chunk-negative": ({"chunk": -4}, ValueError, "chunk must be a positive int"),
    "chunk-float": ({"chunk": 4.0}, ValueError, "chunk must be a positive int"),
    "scale-shape-2": (
        {"scale": torch.ones(2, device=DEVICE)},
        ValueError,
        "scale must be a scalar",
    ),
    "scale-string": ({"scale": "2"}, TypeError, "scale must be a tensor or a number"),
    "scale-nan": ({"scale": float("nan")}, ValueError, "scale must be finite"),
    "scale-inf": ({"scale": float("-inf")}, ValueError, "scale must be finite"),
    "unknown-backend": ({"backend": "cuda"}, ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [np.int64(3), torch.tensor(3), np.int32(3)], ids=str)
def test_topk_takes_any_integral_k(backend, k):
    """numpy integers and 0-d integer tensors are ks too (what indexing code hands over)."""
    q, keys = features(4), features(6)
    values, indices = topk_similarity(q, keys, k, backend=backend)
    assert values.shape == indices.shape == (4, 3)
    assert torch.equal(values, topk_similarity(q, keys, 3, backend=backend)[0])


@pytest.mark.parametrize("case", BAD_SIMILARITY_ARGS.values(), ids=BAD_SIMILARITY_ARGS.keys())
def test_bad_similarity_arguments(no_launch, case):
    kwargs, error, match = case
    kwargs = {"backend": "triton", **kwargs}
    with pytest.raises(error, match=match):
        similarity(features(), features(9), **kwargs)


@pytest.mark.parametrize("case", BAD_TOPK_ARGS.values(), ids=BAD_TOPK_ARGS.keys())
def test_bad_topk_arguments(no_launch, case):
    kwargs, error, match = case
    kwargs = {"k": 3, "backend": "triton", **kwargs}
    with pytest.raises(error, match=match):
        topk_similarity(features(4), features(6), **kwargs)


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_triton_backend_rejects_float64(no_launch, op):
    call, _, _ = op
    with pytest.raises(TypeError, match="backend='triton' supports float32"):
        call(features(dtype=torch.float64), features(dtype=torch.float64), "triton")


# ---------------------------------------------------------------------------------------------
# CUDA only: low precision, autotuned tiles, memory
# ---------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [None, torch.float32], ids=["same-out", "fp32-out"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_similarity_low_precision(backend, dtype, out_dtype):
    ours, ref = inputs(300, 500, 256, dtype=dtype, seed=17)
    check_similarity(ours, ref, backend, normalize=True, out_dtype=out_dtype, dtype=dtype)


@needs_cuda
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autotuned_similarity_matches_matmul(dtype, normalize, monkeypatch):
    """The autotuned kernel's error against float64 is no worse than twice torch.matmul's."""
    monkeypatch.setenv("FASTCLIP_AUTOTUNE", "1")
    gen = torch.Generator().manual_seed(18)
    a64, b64 = (torch.randn(n, 512, generator=gen, dtype=torch.float64) for n in (1000, 1500))
    a, b = a64.to(DEVICE, dtype), b64.to(DEVICE, dtype)
    got = similarity(a, b, 2.0, -1.0, normalize=normalize, backend="triton")
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    eager = 2.0 * torch.matmul(a, b.T) - 1.0
    expected = similarity_reference(a64.to(DEVICE), b64.to(DEVICE), 2.0, -1.0, normalize)
    err = (got.double() - expected).abs().max().item()
    eager_err = (eager.double() - expected).abs().max().item()
    bound = 2 * eager_err + TOLERANCES[torch.float32][1] * expected.abs().max().item()
    assert err <= bound, f"error {err:.3g} > 2 x matmul's {eager_err:.3g} (+slack)"


@needs_cuda
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("k", [1, 10, 100])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_topk_low_precision_within_rounding(dtype, k, normalize):
    """fp32 scores rounded once to the dtype: within one ulp of the exact scores of the rounded
    inputs; the keys chosen score those values to fp32 accuracy."""
    q, keys = (t.to(dtype) for t in random_pair(700, 5000, 128, seed=k))
    values, indices = topk_similarity(q, keys, k, scale=0.5, normalize=normalize, backend="triton")
    assert values.dtype == dtype
    exact = scores(q, keys, 0.5, normalize)
    expected = exact.topk(k, dim=1).values
    err = (values.double().cpu() - expected).abs()
    ulp = torch.finfo(dtype).eps * expected.abs() + torch.finfo(dtype).tiny
    assert (err <= ulp).all(), f"{int((err > ulp).sum())} values off by more than one ulp"
    check_topk(values, indices, exact, k, dtype)


@needs_cuda
def test_topk_memory_grows_linearly_not_quadratically():
    n, k = 16384, 10
    q, keys = (t.to(torch.bfloat16) for t in random_pair(n, n, 128, seed=19))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    topk_similarity(q, keys, k, normalize=True, backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    square = n * n * 2  # one bf16 n x n score matrix: 512 MiB
    assert extra < square / 16, f"top-k added {extra / 2**20:.0f} MiB; n x n is 512 MiB"
