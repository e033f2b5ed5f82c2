"""The fused normalized projection against the float64 eager reference: y and every gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import CUDA, DEVICE, assert_close, needs_cuda
from torch import nn

import fastclip.kernels.launch as kt
import fastclip.kernels.projection as kp
import fastclip.kernels.projection_backward as kpb
from fastclip.projection import NormalizedLinear, normalized_linear
from fastclip.reference import normalized_linear_reference

BACKENDS = ["torch", "triton"]
SMALL = kt.INTERPRETER_CONFIG  # 16 x 16 tiles: a few dozen rows run several tiles and masked edges
WIDE = kt.TileConfig(block_m=16, block_n=64, block_k=64, block_d=64, num_stages=1)
NAMES = ("x", "weight", "bias")


@pytest.fixture
def flags(monkeypatch):
    """Records (need_dx, need_dw, need_db) of every projection_backward call of the kernels."""
    seen = []
    backward = kpb.projection_backward

    def record(*args, **kwargs):
        seen.append(args[6:9])  # called positionally: grad, y, norm, x, weight, eps, flags...
        return backward(*args, **kwargs)

    monkeypatch.setattr(kpb, "projection_backward", record)
    return seen


def make(x_shape: tuple, n_out: int, bias: bool = True, seed: int = 0):
    """float64 (x, weight, bias) at nn.Linear's scale, and a dL/dy."""
    gen = torch.Generator().manual_seed(seed)
    n_in = x_shape[-1]
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64)
    weight = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) / math.sqrt(n_in)
    b = torch.randn(n_out, generator=gen, dtype=torch.float64) if bias else None
    grad = torch.randn(*x_shape[:-1], n_out, generator=gen, dtype=torch.float64)
    return [x, weight, b], grad


def same(t: torch.Tensor) -> torch.Tensor:
    return t


def check(leaves, grad, backend, dtype=torch.float32, eps=1e-12, live=(True, True, True),
          layouts=(same, same, same), grad_layout=same, config=None):  # fmt: skip
    """normalized_linear on copies of ``leaves`` (in ``dtype``, laid out by ``layouts``) against
    the float64 reference: y, and the gradient of each input that is ``live``; none for the
    others."""
    ours = [
        None if t is None else layout(t.to(DEVICE, dtype)).detach().requires_grad_(need)
        for t, need, layout in zip(leaves, live, layouts, strict=True)
    ]
    ref = [
        None if t is None else t.clone().requires_grad_(need)
        for t, need in zip(leaves, live, strict=True)
    ]
    y = normalized_linear(*ours, eps=eps, backend=backend, config=config)
    expected = normalized_linear_reference(*ref, eps=eps)
    assert y.dtype == dtype
    assert_close(y, expected, dtype, "y")
    if not any(t is not None and t.requires_grad for t in ours):
        return
    y.backward(grad_layout(grad.to(DEVICE, dtype)))
    expected.backward(grad)
    for name, a, b in zip(NAMES, ours, ref, strict=True):
        if a is not None and a.requires_grad:
            assert a.grad is not None and a.grad.dtype == dtype, name
            assert_close(a.grad, b.grad, dtype, f"d_{name}")
        elif a is not None:
            assert a.grad is None, f"d_{name} computed though not asked for"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "rows, n_in, n_out, bias",
    [
        (1, 17, 16, True),  # one row
        (37, 33, 40, False),  # masked edges everywhere
        (37, 100, 100, True),
        (20, 33, 300, True),  # one 512-wide register block
        (9, 17, 513, False),  # past 512: five 128-wide column blocks, the two-stage epilogue
    ],
)
def test_shapes(backend, rows, n_in, n_out, bias):
    config = SMALL
    leaves, grad = make((rows, n_in), n_out, bias, seed=rows + n_in + n_out)
    check(leaves, grad, backend, config=config)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_features_1024(backend):
    config = WIDE  # wider tiles keep the interpreter fast; four 256-wide column blocks
    leaves, grad = make((5, 24), 1024, seed=4)
    check(leaves, grad, backend, config=config)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_shape", [(2, 3, 5, 17), (17,)], ids=["batch-dims", "one-vector"])
def test_leading_dimensions(backend, x_shape):
    config = SMALL
    leaves, grad = make(x_shape, 24, seed=len(x_shape))
    check(leaves, grad, backend, config=config)


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values with a column stride of 2."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def column_major(t: torch.Tensor) -> torch.Tensor:
    return t.T.contiguous().T


def expanded_ones(t: torch.Tensor) -> torch.Tensor:
    """dL/dy of y.sum(): every stride 0."""
    return torch.ones((), dtype=t.dtype, device=t.device).expand(t.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    config = SMALL
    leaves, grad = make((29, 20), 24, seed=5)
    check(
        leaves,
        grad,
        backend,
        layouts=(strided, column_major, same),
        grad_layout=strided,
        config=config,
    )
    check(leaves, torch.ones_like(grad), backend, layouts=(column_major, strided, strided),
          grad_layout=expanded_ones)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "live",
    [(0, 1, 1), (1, 0, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)],
    ids=["x-no-grad", "frozen-weight", "x-only", "weight-only", "bias-only", "frozen-bias"],
)
def test_only_some_inputs_require_grad(backend, flags, live):
    """A frozen tower's features, a frozen projection: no gradient for them, and none
    computed; the others stay exact."""
    config = SMALL
    leaves, grad = make((21, 18), 20, seed=sum(live))
    check(leaves, grad, backend, live=tuple(map(bool, live)), config=config)
    assert flags == ([tuple(map(bool, live))] if backend == "triton" else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_runs_the_forward_alone(backend, flags):
    config = SMALL
    leaves, _ = make((19, 18), 20, seed=6)
    expected = normalized_linear_reference(*leaves)
    ours = [t.to(DEVICE, torch.float32).requires_grad_() for t in leaves]
    with torch.no_grad():
        y = normalized_linear(*ours, backend=backend, config=config)
    assert not y.requires_grad
    assert_close(y, expected, torch.float32, "y under no_grad")
    y = normalized_linear(*(t.detach() for t in ours), backend=backend)
    assert not y.requires_grad
    assert_close(y, expected, torch.float32, "y of detached inputs")
    assert flags == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_norms_below_eps(backend):
    """Rows whose norm is below eps are divided by eps (no projection in their gradient)."""
    config = SMALL
    leaves, grad = make((40, 16), 24, bias=False, seed=7)
    row_norms = torch.logspace(-2, 1, 40, dtype=torch.float64)[:, None]  # 0.01 to 10
    leaves[0] = F.normalize(leaves[0] @ leaves[1].T @ leaves[1], dim=1) * row_norms
    check(leaves, grad, backend, eps=0.5, config=config)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows(backend):
    """A zero row's norm is clamped to eps = 1e-12: y = 0 and dz = g / eps, finite and huge."""
    config = SMALL
    (x, weight, _), grad = make((20, 16), 24, bias=False, seed=8)
    zero = torch.tensor([0, 7, 19])
    x[zero] = 0.0
    ours = [t.to(DEVICE, torch.float32).requires_grad_() for t in (x, weight)]
    ref = [t.clone().requires_grad_() for t in (x, weight)]
    y = normalized_linear(*ours, backend=backend, config=config)
    expected = normalized_linear_reference(*ref)
    y.backward(grad.float().to(DEVICE))
    expected.backward(grad)
    assert torch.isfinite(ours[0].grad).all() and torch.isfinite(ours[1].grad).all()
    others = torch.ones(20, dtype=torch.bool)
    others[zero] = False
    assert_close(y, expected, torch.float32, "y")
    assert_close(ours[0].grad[zero], ref[0].grad[zero], torch.float32, "d_x, zero rows")
    assert_close(ours[0].grad[others], ref[0].grad[others], torch.float32, "d_x, other rows")
    assert_close(ours[1].grad, ref[1].grad, torch.float32, "d_weight")


def test_many_column_blocks(monkeypatch):
    """The two-stage epilogue with seven 16-wide column blocks, the last one masked."""
    config = SMALL
    monkeypatch.setattr(kp, "MAX_BLOCK_O", 32)
    monkeypatch.setattr(kp, "WIDE_BLOCK_O", 32)
    assert kp.output_block(100) == 16
    leaves, grad = make((23, 20), 100, seed=9)
    check(leaves, grad, "triton", config=config)


@pytest.mark.parametrize("row_split", [2, 3, 7], ids=lambda s: f"split-{s}")
def test_dw_row_splits(row_split):
    """dW and db summed over row chunks: uneven ones, and more chunks than row blocks (3)."""
    config = kt.TileConfig(16, 16, 16, 16, num_stages=1, row_split=row_split)
    leaves, grad = make((37, 20), 24, seed=10)
    check(leaves, grad, "triton", config=config)


def test_float64_on_the_torch_path():
    leaves, grad = make((13, 10), 12, seed=11)
    check(leaves, grad, "auto", dtype=torch.float64)  # "auto" on float64: the PyTorch path


# ---------------------------------------------------------------------------------------------
# NormalizedLinear: a drop-in nn.Linear
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_module_swaps_with_linear(bias):
    torch.manual_seed(0)
    linear = nn.Linear(33, 40, bias=bias)
    torch.manual_seed(0)
    fused = NormalizedLinear(33, 40, bias=bias)
    assert fused.state_dict().keys() == linear.state_dict().keys()
    for key, value in linear.state_dict().items():  # nn.Linear's initialization, draw for draw
        assert torch.equal(fused.state_dict()[key], value), key
    other = NormalizedLinear(33, 40, bias=bias)
    other.load_state_dict(linear.state_dict())  # a checkpoint of the plain model
    linear.load_state_dict(NormalizedLinear(33, 40, bias=bias).state_dict())  # and back
    assert torch.equal(other.weight, fused.weight)
    x = torch.randn(4, 6, 33)
    assert_close(fused(x), F.normalize(nn.functional.linear(x, fused.weight, fused.bias), dim=-1),
                 torch.float32, "NormalizedLinear")  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_reference(backend):
    config = SMALL
    module = NormalizedLinear(20, 24, device=DEVICE, backend=backend, config=config)
    x = torch.randn(3, 7, 20, device=DEVICE, requires_grad=True)
    y = module(x)
    ref_x = x.detach().double().requires_grad_()
    ref_w, ref_b = (p.detach().double().requires_grad_() for p in (module.weight, module.bias))
    expected = normalized_linear_reference(ref_x, ref_w, ref_b)
    assert_close(y, expected, torch.float32, "y")
    y.sum().backward()
    expected.sum().backward()
    for name, a, b in [("x", x, ref_x), ("weight", module.weight, ref_w), ("bias", module.bias,
                                                                           ref_b)]:  # fmt: skip
        assert_close(a.grad, b.grad, torch.float32, f"d_{name}")


def test_module_follows_autocast_like_linear():
    """Under autocast the fused head computes in the autocast dtype, as nn.Linear does, and the
    fp32 parameters still get their gradients."""
    torch.manual_seed(0)
    module = NormalizedLinear(64, 32, device=DEVICE)
    x = torch.randn(48, 64, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = module(x)
        plain = nn.functional.linear(x, module.weight, module.bias)
    assert y.dtype == plain.dtype == torch.bfloat16
    assert_close(y.float(), F.normalize(plain.float(), dim=-1), torch.bfloat16, "y")
    y.float().sum().backward()
    assert module.weight.grad.dtype == torch.float32 and module.weight.grad.abs().sum() > 0


def test_module_arguments():
    module = NormalizedLinear(8, 4, False, "cpu", torch.float64, eps=1e-6, backend="torch")
    assert module.weight.dtype == torch.float64 and module.bias is None
    assert "eps=1e-06" in repr(module) and "backend='torch'" in repr(module)
    with pytest.raises(ValueError, match="backend must be one of"):
        NormalizedLinear(8, 4, backend="cuda")
    with pytest.raises(ValueError, match="eps must be positive"):
        NormalizedLinear(8, 4, eps=0.0)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any launch
# ---------------------------------------------------------------------------------------------


def tensor(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(shape, dtype=dtype, device=device)


X, W = (3, 8), (4, 8)  # shapes of a valid x and weight
BAD_INPUTS = {
    "x-not-tensor": (lambda: ([[1.0] * 8], tensor(*W), None, {}), TypeError, "x must be a"),
    "weight-not-tensor": (lambda: (tensor(*X), [[1.0] * 8], None, {}), TypeError, "weight must"),
    "bias-not-tensor": (lambda: (tensor(*X), tensor(*W), [0.0] * 4, {}), TypeError, "bias must"),
    "x-integer": (lambda: (torch.ones(X, dtype=torch.int64), tensor(*W), None, {}), TypeError,
                  "x must be a floating-point"),
    "weight-1d": (lambda: (tensor(*X), tensor(8), None, {}), ValueError, "weight must be 2-D"),
    "weight-3d": (lambda: (tensor(*X), tensor(1, *W), None, {}), ValueError, "weight must be 2-D"),
    "weight-empty": (lambda: (tensor(*X), tensor(0, 8), None, {}), ValueError, "weight has no"),
    "x-scalar": (lambda: (tensor(), tensor(4, 1), None, {}), ValueError, "x must have at least"),
    "in-features": (lambda: (tensor(3, 7), tensor(*W), None, {}), ValueError,
                    "x has 7 in-features .* weight has 8"),
    "x-empty": (lambda: (tensor(0, 8), tensor(*W), None, {}), ValueError, "x is empty"),
    "x-empty-batch": (lambda: (tensor(2, 0, 8), tensor(*W), None, {}), ValueError, "x is empty"),
    "bias-shape": (lambda: (tensor(*X), tensor(*W), tensor(5), {}), ValueError,
                   r"bias must have shape \(out_features,\) = \(4,\)"),
    "bias-2d": (lambda: (tensor(*X), tensor(*W), tensor(1, 4), {}), ValueError, "bias must"),
    "weight-dtype": (lambda: (tensor(*X), tensor(*W, dtype=torch.float64), None, {}),
                     TypeError, "weight is torch.float64 but x is torch.float32"),
    "bias-dtype": (lambda: (tensor(*X), tensor(*W), tensor(4, dtype=torch.float16), {}),
                   TypeError, "bias is torch.float16"),
    "weight-device": (lambda: (tensor(*X), tensor(*W, device="meta"), None, {}), ValueError,
                      "weight is on the meta device"),
    "eps-zero": (lambda: (tensor(*X), tensor(*W), None, {"eps": 0.0}), ValueError, "eps must"),
    "eps-nan": (lambda: (tensor(*X), tensor(*W), None, {"eps": math.nan}), ValueError, "eps"),
    "eps-string": (lambda: (tensor(*X), tensor(*W), None, {"eps": "1e-12"}), TypeError, "eps"),
    "backend": (lambda: (tensor(*X), tensor(*W), None, {"backend": "cuda"}), ValueError,
                "backend must be one of"),
    "triton-float64": (lambda: (tensor(*X, dtype=torch.float64), tensor(*W, dtype=torch.float64),
                                None, {"backend": "triton"}),
                       TypeError, "float32, float16 and bfloat16"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs(case, monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a kernel ran before the bad argument was rejected")

    monkeypatch.setattr(kp, "projection_forward", launched)
    make_args, error, match = case
    x, weight, bias, kwargs = make_args()
    with pytest.raises(error, match=match):
        normalized_linear(x, weight, bias, **kwargs)


# ---------------------------------------------------------------------------------------------
# CUDA only: low precision, autotuned configs, realistic shapes
# ---------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "rows, n_in, n_out", [(4096, 768, 512), (3001, 1024, 768), (1000, 200, 1500), (777, 512, 100)]
)
def test_low_precision_no_worse_than_eager(dtype, rows, n_in, n_out):
    leaves, grad = make((rows, n_in), n_out, seed=rows)
    ours = [t.to(DEVICE, dtype).requires_grad_() for t in leaves]
    eager_in = [t.detach().clone().requires_grad_() for t in ours]
    ref = [t.clone().requires_grad_() for t in leaves]
    g = grad.to(DEVICE, dtype)
    outputs = [
        normalized_linear(*ours, backend="triton"),
        normalized_linear_reference(*eager_in),
        normalized_linear_reference(*ref),
    ]
    for out, g_out in zip(outputs, (g, g, grad), strict=True):
        out.backward(g_out)
    triples = [("y", *outputs)]
    triples += [
        (f"d_{n}", a.grad, e.grad, r.grad)
        for n, a, e, r in zip(NAMES, ours, eager_in, ref, strict=True)
    ]
    for name, a, e, r in triples:
        r = r.double().cpu()
        err = (a.double().cpu() - r).abs().max().item()
        eager_err = (e.double().cpu() - r).abs().max().item()
        bound = 2 * eager_err + 1e-3 * r.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > 2 x eager's {eager_err:.3g} (+slack)"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_out", [512, 768])
def test_autotuned_matches_reference(dtype, n_out, monkeypatch):
    monkeypatch.setenv("FASTCLIP_AUTOTUNE", "1")
    leaves, grad = make((3000, 768), n_out, seed=n_out)
    for live in [(True, True, True), (False, True, True), (True, False, False)]:
        check(leaves, grad, "triton", dtype, live=live)  # the first call of each tunes


@needs_cuda
def test_fixed_default_tiles_without_autotuning(monkeypatch):
    monkeypatch.setenv("FASTCLIP_AUTOTUNE", "0")
    leaves, grad = make((2000, 768), 512, seed=12)
    check(leaves, grad, "triton", torch.bfloat16)


@pytest.mark.skipif(CUDA, reason="the CPU default; a CUDA machine runs the kernels by default")
def test_auto_backend_on_cpu_is_the_torch_path(monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("backend='auto' ran a kernel on the CPU")

    monkeypatch.setattr(kp, "projection_forward", launched)
    monkeypatch.setattr(kpb, "projection_backward", launched)
    leaves, grad = make((5, 8), 6, seed=13)
    check(leaves, grad, "auto")


def test_torch_path_is_eager_pytorch_bit_for_bit():
    """backend="torch" is F.normalize(F.linear(...)) differentiated by autograd, so that a run
    keeps its numbers, rounding included, whatever the kernels' path does."""
    leaves, grad = make((21, 18), 20, seed=5)
    ours = [t.float().requires_grad_() for t in leaves]
    eager = [t.float().requires_grad_() for t in leaves]
    normalized_linear(*ours, backend="torch").backward(grad.float())
    F.normalize(F.linear(*eager), dim=-1).backward(grad.float())
    for a, b in zip(ours, eager, strict=True):
        assert torch.equal(a.grad, b.grad)
