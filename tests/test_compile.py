"""torch.compile: every public op, and the model's forward, trace as one graph
(``fullgraph=True``) and compute what eager does, gradients included; the custom operators they
run as (``fastclip.backends``) pass ``torch.library.opcheck``; a compiled training step matches
eager; and what the ops compute inside their custom operators reads no value back.

Most compiles use the "aot_eager" backend: Dynamo and AOTAutograd trace exactly what the
default backend traces (the fake implementations, the autograd), without the minutes of C++
that Inductor spends on a CPU; the training step compiles with Inductor.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from helpers import CUDA, DEVICE, LOSS_BACKENDS, assert_close
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

from fastclip import (
    ClipLoss,
    SigLipLoss,
    backends,
    clip_loss,
    infonce,
    normalized_linear,
    siglip_loss,
    similarity,
    topk_similarity,
)
from fastclip.model import CLIP

N, D = 12, 16
ops = torch.ops.fastclip

# Each public op as a function of tensors: (function, its arguments' shapes, learnable or not).
# "scale" and "bias" are one-element tensors (or numbers where ``numbers``); features (N, D).
LOSSES = {
    "clip_loss": lambda x, y, s, b, backend: clip_loss(x, y, s, b, backend=backend),
    "infonce": lambda x, y, s, b, backend: infonce(x, y, s, both_directions=False, backend=backend),
    "siglip_loss": lambda x, y, s, b, backend: siglip_loss(x, y, s, b, backend=backend),
    "ClipLoss": lambda x, y, s, b, backend: ClipLoss(backend=backend)(x, y, s, b),
    "SigLipLoss": lambda x, y, s, b, backend: SigLipLoss(backend=backend)(x, y, s, b),
}
OTHERS = {
    "similarity": lambda x, y, s, b, backend: similarity(
        x, y, s, b, normalize=True, backend=backend
    ),
    "topk_similarity": lambda x, y, s, b, backend: topk_similarity(
        x, y, 5, scale=s, normalize=True, backend=backend
    )[0],
    "normalized_linear": lambda x, y, s, b, backend: normalized_linear(
        x, y[:10], y[10, :10], backend=backend
    ),
}
CASES = [(name, backend) for name in LOSSES for backend in LOSS_BACKENDS]
CASES += [(name, backend) for name in OTHERS for backend in ("torch", "triton")]


def inputs(numbers: bool, seed: int = 0, dtype=torch.float32) -> list:
    """Features (N, D) x and y, scale and bias: leaves that require grad (numbers if asked)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, N, D, generator=gen, dtype=torch.float64)
    x, y = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    leaves = [x.to(DEVICE, dtype), y.to(DEVICE, dtype)]
    leaves += [8.0, -1.0] if numbers else [torch.tensor(v, device=DEVICE) for v in (8.0, -1.0)]
    return [t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in leaves]


def run(fn, args) -> tuple[torch.Tensor, list]:
    """fn's value and the gradients of its tensor arguments (None for those that get none)."""
    args = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args]
    value = fn(*args)
    if value.requires_grad:
        value.float().sum().backward()
    return value.detach(), [t.grad for t in args if isinstance(t, torch.Tensor)]


def same(compiled, eager, what: str) -> None:
    (value, grads), (expected, expected_grads) = compiled, eager
    assert_close(value, expected, torch.float32, what)
    for i, (g, e) in enumerate(zip(grads, expected_grads, strict=True)):
        assert (g is None) == (e is None), f"{what}: gradient {i}"
        if g is not None:
            assert_close(g, e, torch.float32, f"{what}: gradient {i}")


@pytest.mark.parametrize("numbers", [False, True], ids=["tensors", "numbers"])
@pytest.mark.parametrize("name, backend", CASES, ids=[f"{n}-{b}" for n, b in CASES])
def test_fullgraph_matches_eager(name, backend, numbers):
    """One graph, no break (fullgraph=True raises on any); values and gradients as eager."""
    torch._dynamo.reset()
    fn = functools.partial({**LOSSES, **OTHERS}[name], backend=backend)
    args = inputs(numbers)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    same(run(compiled, args), run(fn, args), name)


@pytest.mark.parametrize(
    "dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)]
)
@pytest.mark.parametrize("loss", ["clip_loss", "siglip_loss"])
def test_fullgraph_with_two_dtypes(loss, dtypes):
    """Features of two dtypes are promoted inside the graph."""
    torch._dynamo.reset()
    fn = functools.partial(LOSSES[loss], backend="torch")
    x, y, s, b = inputs(numbers=False)
    args = [x.detach().to(dtypes[0]), y.detach().to(dtypes[1]), s, b]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    same(run(compiled, args), run(fn, args), loss)


def test_fullgraph_with_a_tile_config():
    """A TileConfig travels into the custom ops as its fields."""
    from fastclip.kernels.launch import TileConfig

    torch._dynamo.reset()
    config = TileConfig(block_m=16, block_n=16, block_k=16, block_d=16, num_stages=1)
    fn = functools.partial(clip_loss, backend="blocks", config=config)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    args = inputs(numbers=False)
    same(run(compiled, args), run(fn, args), "clip_loss")


def test_a_nonfinite_scale_is_refused_in_the_graph():
    """The finiteness check of a CPU scale is an assertion in the graph, not a branch."""
    torch._dynamo.reset()
    x, y, _, _ = inputs(numbers=False)
    compiled = torch.compile(clip_loss, fullgraph=True, backend="aot_eager")
    scale = torch.tensor(8.0)
    compiled(x.detach().cpu(), y.detach().cpu(), scale)
    with pytest.raises(RuntimeError, match="logit_scale must be finite"):
        compiled(x.detach().cpu(), y.detach().cpu(), scale * float("nan"))


# ----------------------------------------------------------------------------------------------
# The model and a training step


def tiny_model(siglip: bool) -> CLIP:
    torch.manual_seed(0)
    sizes = {"embed_dim": 32, "vision_width": 32, "text_width": 32, "context_length": 16}
    bias = {"logit_bias_init": -5.0} if siglip else {}
    return CLIP("tiny", vision_layers=1, text_layers=1, **sizes, **bias).to(DEVICE)


def test_model_forward_is_one_graph():
    torch._dynamo.reset()
    model = tiny_model(siglip=False)
    images, tokens = torch.randn(4, 3, 32, 32, device=DEVICE), torch.randint(0, 1000, (4, 16))
    tokens = tokens.to(DEVICE)
    explained = torch._dynamo.explain(model)(images, tokens)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(images, tokens), model(images, tokens), strict=True):
        assert_close(got, expected, torch.float32, "model output")


@pytest.mark.parametrize("loss, compiler", [("clip", "inductor"), ("siglip", "aot_eager")])
def test_compiled_training_step_matches_eager(loss, compiler, tmp_path, monkeypatch):
    """Model, loss, backward and an optimizer step, compiled (the forward and loss as one graph,
    the backward by AOTAutograd, the step by torch.compile) against the same steps eager. SGD:
    Adam's normalized steps would turn the rounding differences of near-zero gradients into
    whole learning-rate steps. Inductor compiles into a cache of the test's own."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    eager_model = tiny_model(siglip=loss == "siglip")
    model = copy.deepcopy(eager_model)
    loss_fn = ClipLoss() if loss == "clip" else SigLipLoss()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=gen).to(DEVICE)
    tokens = torch.randint(0, 1000, (4, 16), generator=gen).to(DEVICE)
    eager_opt = torch.optim.SGD(eager_model.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    forward = torch.compile(lambda i, t: loss_fn(*model(i, t)), fullgraph=True, backend=compiler)
    step = torch.compile(opt.step, backend=compiler)
    for i in range(2):
        eager_opt.zero_grad()
        expected = loss_fn(*eager_model(images, tokens))
        expected.backward()
        eager_opt.step()
        opt.zero_grad()
        got = forward(images, tokens)
        got.backward()
        step()
        assert_close(got, expected, torch.float32, f"step {i}: loss")
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters(), strict=True):
        assert_close(p, q, torch.float32, name, floor=1e-3)


# ----------------------------------------------------------------------------------------------
# The custom operators

# The stages without an autograd formula of their own (the losses' autograd.Functions
# differentiate them; top-k has no gradient) are checked on inputs that need none:
# opcheck's test of the autograd registration needs inputs that require grad.
NO_GRAD = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
WITH_GRAD = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)


def stage_samples(method: str, dtype: torch.dtype) -> list[tuple]:
    """(op, args) samples of the loss stages: pairs with an offset, one direction, negatives
    only, gradients partly requested."""
    x, y = (t.detach() for t in inputs(numbers=False, dtype=dtype)[:2])
    y = torch.cat([y, y[:3]])  # n_y > n_x: offsets fit
    scale, bias = torch.tensor(8.0, device=DEVICE), torch.tensor(-1.0, device=DEVICE)
    route = (method, None, None)
    samples = []
    for offset, both in ((2, True), (0, False)):
        pdot, row, col = ops.contrastive_forward(x, y, scale, offset, both, *route)
        samples.append((ops.contrastive_forward, (x, y, scale, offset, both, *route)))
        w_x = torch.ones(N, device=DEVICE)
        w_y = None
        if both:
            w_y = torch.zeros(y.shape[0], device=DEVICE)
            w_y[offset : offset + N] = 1.0
        col = col if both else None
        weight = torch.tensor(0.05, device=DEVICE)
        for need in ((True, True), (False, True)):
            args = (x, y, scale, pdot, row, col, w_x, w_y, weight, offset, *need, *route)
            samples.append((ops.contrastive_backward, args))
    for b, offset, needs in ((bias, 3, (1, 1, 1)), (None, None, (1, 0, 0)), (bias, 0, (0, 0, 0))):
        args = (x, y, scale, b, offset, *map(bool, needs), *route)
        samples.append((ops.siglip_forward, args))
    return samples


def other_samples(method: str, dtype: torch.dtype) -> list[tuple]:
    """(op, args, differentiable) samples of similarity, top-k and the projection."""
    x, y, scale, bias = inputs(numbers=False, dtype=dtype)
    weight, proj_bias = y[:10].detach().requires_grad_(), y[10, :10].detach().requires_grad_()
    samples = [
        (ops.similarity, (x, y, scale, bias, normalize, dtype, 1e-12, method, None), True)
        for normalize in (False, True)
    ]
    samples.append((ops.topk, (x.detach(), y.detach(), 5, scale.detach(), True, 1e-12, None,
                               method, None), False))  # fmt: skip
    samples.append((ops.normalized_linear, (x, weight, proj_bias, 1e-12, method, None), True))
    samples.append((ops.normalized_linear, (x, weight, None, 1e-12, method, None), True))
    out, norm = ops.normalized_linear(x.detach(), weight.detach(), None, 1e-12, method, None)
    grad = torch.randn_like(out)
    for needs in ((True, True, True), (False, True, False)):
        args = (grad, out, norm, x.detach(), weight.detach(), 1e-12, *needs, method, None)
        samples.append((ops.normalized_linear_backward, args, False))
    return samples


# float64 runs on the PyTorch path only; Triton's interpreter miscomputes bf16 kernels.
DTYPES = {"torch": (torch.float32, torch.float64, torch.bfloat16)}
TRITON_DTYPES = (torch.float32, torch.float16) if not CUDA else (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("method", LOSS_BACKENDS)
def test_opcheck_loss_stages(method):
    for dtype in DTYPES.get(method, TRITON_DTYPES):
        for op, args in stage_samples(method, dtype):
            opcheck(op, args, test_utils=NO_GRAD)


@pytest.mark.parametrize("method", ["torch", "triton"])
def test_opcheck_similarity_topk_projection(method):
    for dtype in DTYPES.get(method, TRITON_DTYPES):
        for op, args, differentiable in other_samples(method, dtype):
            opcheck(op, args, test_utils=WITH_GRAD if differentiable else NO_GRAD)


# ----------------------------------------------------------------------------------------------
# No value read back inside the custom operators

# The operators that hand a tensor's value (or a shape that depends on it) to the host. Below
# autograd, where a custom op's implementation runs, the mode sees ``item`` itself, not yet
# decomposed into ``_local_scalar_dense``.
READS = (
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.item.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.is_nonzero.default,
)


class ReadsInsideOps(TorchDispatchMode):
    """Records value reads, inside fastclip's custom operators too: a dispatch mode sees a
    custom op as one operator, so this one runs the op's implementation under itself."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.expanded = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, name = func.name().partition("::")
        if namespace == "fastclip":
            self.expanded += 1
            with self:
                return backends.IMPLEMENTATIONS[name.partition(".")[0]](*args, **(kwargs or {}))
        if func in READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


# The projection's PyTorch path is eager PyTorch, outside any op (tests/test_host_sync.py).
IN_OPS = [case for case in CASES if case != ("normalized_linear", "torch")]


@pytest.mark.parametrize("name, backend", IN_OPS, ids=[f"{n}-{b}" for n, b in IN_OPS])
def test_no_value_is_read_inside_the_ops(name, backend):
    """Forward and backward with the scale and bias as numbers (the argument checks read CPU
    tensors by design: ``tests/test_host_sync.py`` covers what runs outside the ops)."""
    fn = {**LOSSES, **OTHERS}[name]
    args = inputs(numbers=True)
    with ReadsInsideOps() as seen:
        value = fn(*args, backend=backend)
        if value.requires_grad:
            torch.autograd.grad(value.float().sum(), [t for t in args if torch.is_tensor(t)])
    assert seen.expanded > 0, "no custom op ran"
    assert not seen.reads, f"values read back: {seen.reads}"


def test_a_read_inside_an_op_is_seen(monkeypatch):
    """The control of the test above: a read planted inside an op's implementation is found."""
    implementation = backends.IMPLEMENTATIONS["similarity"]

    def reading(a, *args):
        a.sum().item()
        return implementation(a, *args)

    monkeypatch.setitem(backends.IMPLEMENTATIONS, "similarity", reading)
    with ReadsInsideOps() as seen:
        similarity(*inputs(numbers=True)[:2], backend="torch")
    assert seen.reads == ["aten.item.default"]
