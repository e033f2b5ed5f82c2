"""The losses' cases, InfoNCE's (``bench_contrastive.py``) and SigLIP's (``bench_siglip.py``):
one measurement of a loss by a provider in a mode, its gradient check, its stages, the confident
batch and the one large batch.

Passes: the matmul passes of 2 N^2 D a mode executes and the floor's, from ``fastclip.registry``
(eager and torch.compile store S). Checked: a full step's gradients in the batch's dtype against
the fp32 PyTorch path on the same (rounded) features, relative norm error of each; "floor" is the
fp32 gradient rounded to the dtype, which no implementation returning that dtype can beat; "ok":
within tolerance (``tuning.within_tolerance``), against eager's error on the same case.

Stages, named as ``fastclip.costs`` names them: InfoNCE blocks = forward, G (the backward with
neither gradient wanted: the G kernel over every block), products (backward - G); blocks-mm
adds S (cuBLAS computing the blocks' dots, which G then excludes); fused = forward, backward.
SigLIP computes its gradients with its loss: blocks = G (S, loss and G), products; fused =
forward (both sweeps).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from harness import MIB, Bench, Case, capture, features, mode_step, settle
from results import BASELINES, find
from tuning import within_tolerance

from fastclip import backends, costs, registry
from fastclip.kernels.blocks import matmul_f32, plan_blocks
from fastclip.measure import Clock

if TYPE_CHECKING:  # Triton's: the pytest cases' PyTorch paths run where it is missing
    from fastclip.kernels.launch import TileConfig

CONFIDENT_SCALE = 100.0  # a trained CLIP's logit scale; SigLIP's bias scales with it, as in tests
CONFIDENT_BIAS = -50.0
GRADIENT_NAMES = ("dx", "dy", "dscale", "dbias")


@dataclass(frozen=True)
class Loss:
    """One loss: its public function, references, width and parameters."""

    op: str  # fastclip.registry's name
    public: Callable  # the fastclip function; backend= picks the implementation
    reference: Callable  # eager PyTorch: the "eager" provider, compiled for "compile"
    exact: Callable  # float64 reference of the confident batch
    D: int  # the runner's feature width
    scale: float  # the logit scale of the random batches, exponentiated
    bias: float | None  # SigLIP's logit bias; None: InfoNCE has none


def implementations(op: str) -> tuple[str, ...]:
    """fastclip's Triton implementations of ``op`` (fastclip.registry)."""
    return registry.names(op, triton=True)


def at_floor(op: str) -> tuple[str, ...]:
    """The Triton implementations whose forward+backward executes the floor's passes."""
    designs = registry.designs(op, triton=True).values()
    return tuple(d.name for d in designs if d.passes.step == registry.FLOOR[op])


def passes(op: str, provider: str, mode: str) -> tuple[int, int]:
    """(executed, floor): the matmul passes of 2 N^2 D a mode executes by ``provider`` and by
    a design that never stores S."""
    design = registry.EAGER if provider in BASELINES else registry.designs(op)[provider].passes
    floor = registry.FLOOR[op]
    return {
        "eval": (1, 1),
        "forward": (design.forward, 1),
        "backward": (design.step - design.forward, floor - 1),
        "full": (design.step, floor),
    }[mode]


@functools.cache
def compiled(reference: Callable) -> Callable:
    """torch.compile of a reference, compiled on its first call (then once more, dynamic)."""
    return torch.compile(reference)


def loss_function(loss: Loss, provider: str, block_bytes: int | None = None) -> Callable:
    if provider == "eager":
        return loss.reference
    if provider == "compile":
        return compiled(loss.reference)
    return functools.partial(loss.public, backend=provider, block_bytes=block_bytes)


def leaves(loss: Loss, x, y, scale: float, bias: float | None, dtype) -> list[torch.Tensor]:
    """The loss's arguments, every one a leaf requiring grad: features in ``dtype``, the logit
    scale (and SigLIP's bias) in fp32, or float64 with float64 features."""
    param = torch.float64 if dtype == torch.float64 else torch.float32
    args = [x.to(dtype), y.to(dtype), torch.tensor(scale, dtype=param, device=x.device)]
    if loss.bias is not None:
        args.append(torch.tensor(bias, dtype=param, device=x.device))
    return [t.detach().requires_grad_() for t in args]


def inputs(loss: Loss, n: int, D: int, dtype, device) -> list[torch.Tensor]:
    """A random batch of n pairs: unit features, the loss's scale and bias."""
    x, y = (features(n, D, device, seed) for seed in (n, n + 1))
    return leaves(loss, x, y, loss.scale, loss.bias, dtype)


def gradients(fn: Callable, args: list[torch.Tensor]) -> tuple[torch.Tensor, tuple]:
    value = fn(*args)
    return value.detach(), torch.autograd.grad(value, args)


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error: how much of the quantity is wrong."""
    diff = (got.double() - expected.double()).norm()
    return (diff / expected.double().norm()).item()


def errors(grads, expected) -> dict[str, float]:
    """Relative error of each gradient (features, scale, bias) against ``expected``."""
    return {n: relative(g, r) for n, g, r in zip(GRADIENT_NAMES, grads, expected, strict=False)}


def rounding_floor(expected, dtype: torch.dtype) -> dict[str, float]:
    """The feature gradients' error after rounding the expected ones to ``dtype``."""
    return {n: relative(r.to(dtype), r) for n, r in zip(("dx", "dy"), expected[:2], strict=True)}


@functools.lru_cache(maxsize=1)  # a grid runs the providers of one shape one after another
def reference(loss: Loss, n: int, D: int, dtype, device) -> tuple[dict, tuple]:
    """(rounding floor, gradients) of the fp32 PyTorch path on ``inputs``' rounded features."""
    args = inputs(loss, n, D, dtype, device)
    exact = leaves(loss, args[0].float(), args[1].float(), loss.scale, loss.bias, torch.float32)
    expected = gradients(functools.partial(loss.public, backend="torch"), exact)[1]
    return rounding_floor(expected, dtype), expected


def block_plan(bench: Bench, provider: str, n: int) -> tuple[int, int] | None:
    """The (R, C) blocks a bounded-block implementation walks at N = n (None: fused's sweeps)."""
    if provider == "fused":
        return None
    element = 6 if provider == "blocks-mm" else 2  # G, and the fp32 dots of blocks-mm
    return plan_blocks(n, n, element, bench.buffer_bytes)


def predictions(bench: Bench, loss: Loss, provider: str, mode: str, n: int, D: int) -> dict:
    """What fastclip.costs predicts for a Triton provider's eval or full step, its block plan
    and its memory bound (N D 8 bytes + the buffer)."""
    if provider not in implementations(loss.op) or mode not in ("eval", "full"):
        return {}
    cost = costs.loss_cost(
        loss.op, provider, n, D, 2, mode == "full", bench.model, block_bytes=bench.block_bytes
    )
    found = {"predicted_ms": cost.seconds * 1e3}
    if mode == "full":
        found.update(
            plan=block_plan(bench, provider, n),
            bound_mib=(n * D * 8 + bench.buffer_bytes) / MIB,
            predicted_stages_ms={k: v * 1e3 for k, v in cost.stages.items()},
        )
    return found


def measure(
    bench: Bench,
    loss: Loss,
    provider: str,
    mode: str,
    args: list[torch.Tensor],
    check: tuple | None = None,
    stages: bool = False,
    runs: int | None = None,
    rivals: tuple[Callable, ...] = (),
) -> dict:
    """One case of ``loss`` on ``args``, a row of "losses": time, memory, TFLOP/s; with
    ``check`` (floor, expected gradients) the gradients' errors; with ``stages`` each stage's."""
    n, D = args[0].shape
    executed, floor = passes(loss.op, provider, mode)
    row = {
        "op": loss.op,
        "dtype": str(args[0].dtype).removeprefix("torch."),
        "D": D,
        "N": n,
        "provider": provider,
        "mode": mode,
        "passes": executed,
        "floor_passes": floor,
    }
    if provider in implementations(loss.op):
        row["autotune"] = bench.autotune
    row = bench.add("losses", {**row, **predictions(bench, loss, provider, mode, n, D)})
    fn = loss_function(loss, provider, bench.block_bytes)
    if check is not None:
        with bench.case(row):
            row["floor"], expected = check
            row["err"] = errors(gradients(fn, args)[1], expected)  # the first run compiles
            same = {k: row[k] for k in ("op", "dtype", "D", "N")}
            eager = find(bench.results.data["losses"], **same, mode="full", provider="eager")
            row["ok"] = within_tolerance(row["err"], row["floor"], (eager or {}).get("err"))
        if "oom" in row or "error" in row:
            return row
    pass_flops = 2 * n * n * D
    step = mode_step(functools.partial(fn, *args), args, mode)
    bench.measure(row, step, executed * pass_flops, check is None, runs, rivals)
    if "ms" in row:
        row["tflops_floor"] = floor * pass_flops / row["ms"] / 1e9
        if stages:
            with bench.case(row):
                row["stages_ms"] = measure_stages(bench, loss.op, provider, args)
    bench.results.save()
    return row


def grid_case(bench: Bench, loss: Loss, case: Case, runs: int, rivals=()) -> dict:
    """A case of a pytest grid; a full step's gradients checked, ``rivals`` (providers) run
    between its timed runs."""
    args = inputs(loss, case.N, case.D, bench.dtype, bench.device)
    check = None
    if case.mode == "full":
        check = reference(loss, case.N, case.D, bench.dtype, bench.device)
    others = []
    for provider in rivals:
        rival = inputs(loss, case.N, case.D, bench.dtype, bench.device)
        forward = functools.partial(loss_function(loss, provider), *rival)
        others.append(mode_step(forward, rival, case.mode))
    return measure(bench, loss, case.provider, case.mode, args, check, runs=runs, rivals=others)


def batch(bench: Bench, loss: Loss, n: int) -> None:
    """The runner's case of one batch size: the evaluation forward by fastclip and eager, then
    a full step by eager and each implementation, checked and stage by stage."""
    args = inputs(loss, n, bench.D(loss.D), bench.dtype, bench.device)
    check = reference(loss, n, bench.D(loss.D), bench.dtype, bench.device)
    for provider in (implementations(loss.op)[0], "eager"):
        measure(bench, loss, provider, "eval", args)
    for provider in ("eager", *implementations(loss.op)):  # eager first: the yardstick
        measure(bench, loss, provider, "full", args, check, stages=provider != "eager")
    reference.cache_clear()
    settle(bench.device)


def graphed(bench: Bench, loss: Loss, n: int) -> None:
    """A small batch, where the host's launches outlast the GPU's work: a full step captured in
    a CUDA graph and replayed (``harness.capture``), by eager and each implementation, a row of
    "graphs" each. CUDA only: a CPU records nothing."""
    if bench.device.type != "cuda":
        return
    args = inputs(loss, n, bench.D(loss.D), bench.dtype, bench.device)
    D = args[0].shape[1]
    for provider in ("eager", *implementations(loss.op)):
        row = {"op": loss.op, "dtype": str(bench.dtype).removeprefix("torch."), "D": D, "N": n,
               "provider": provider, "mode": "full (CUDA graph)"}  # fmt: skip
        row["passes"], row["floor_passes"] = passes(loss.op, provider, "full")
        row = bench.add("graphs", row)
        fn = loss_function(loss, provider, bench.block_bytes)
        with bench.case(row):
            replay = capture(lambda fn=fn: torch.autograd.grad(fn(*args), args))
            bench.measure(row, replay, row["passes"] * 2 * n * n * D)
        bench.results.save()
    settle(bench.device)


def stage_functions(
    bench: Bench, op: str, impl: str, x, y, scale, bias=None, config: TileConfig | None = None
) -> dict[str, Callable]:
    """One implementation's stages as separate calls, without autograd: "gradients" (InfoNCE's
    backward; SigLIP's whole step, whose gradients come with its loss), "forward" (InfoNCE),
    "G-only" (the blocked implementations' G kernels with neither product) and "S" (blocks-mm's
    dots by cuBLAS, as ``sweep_blocks`` asks for them). ``config``: the tiles of the kernels
    that compute the gradients (None: the first of their autotune lists)."""
    n = x.shape[0]
    route = {"method": impl, "block_bytes": bench.block_bytes, "config": config}
    if op == "contrastive":
        forward = functools.partial(
            backends.contrastive_forward, x, y, scale, 0, True, **{**route, "config": None}
        )
        w = torch.ones(n, device=x.device)
        weight = torch.tensor(0.5 / n, device=x.device)
        backward = functools.partial(backends.contrastive_backward, **route)
        step = functools.partial(backward, x, y, scale, forward(), w, w, weight, 0)
        fns = {"forward": forward}
    else:

        def step(need_dx: bool, need_dy: bool):
            return backends.siglip_forward(x, y, scale, bias, 0, need_dx, need_dy, True, **route)

        fns = {}
    fns["gradients"] = functools.partial(step, True, True)
    if impl != "fused":
        fns["G-only"] = functools.partial(step, False, False)
    if impl == "blocks-mm":
        R, C = plan_blocks(n, n, x.element_size() + 4, bench.buffer_bytes)
        dots = torch.empty(R * C, device=x.device)

        def dots_by_gemm():
            for r0 in range(0, n, R):
                for c0 in range(0, n, C):
                    a, b = x[r0 : r0 + R], y[c0 : c0 + C]
                    matmul_f32(a, b.T, out=dots[: a.shape[0] * b.shape[0]].view(a.shape[0], -1))

        fns["S"] = dots_by_gemm
    return fns


def measure_stages(bench: Bench, op: str, impl: str, args: list) -> dict[str, float]:
    """Milliseconds per stage, named as ``fastclip.costs`` names them (module docstring)."""
    fns = stage_functions(bench, op, impl, *[t.detach() for t in args])
    ms = {name: bench.timed(fn)["ms"] for name, fn in fns.items()}
    stages = {"forward": ms["forward"]} if "forward" in ms else {}
    if impl == "fused":
        stages["backward" if stages else "forward"] = ms["gradients"]
        return stages
    if "S" in ms:
        stages["S"] = ms["S"]
    stages["G"] = ms["G-only"] - ms.get("S", 0.0)
    stages["products"] = ms["gradients"] - ms["G-only"]
    return stages


def confident_batch(n: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image features and their texts, the image plus 5% noise: at a trained logit scale
    every row is confident (p_ii close to 1), and the gradient lives in 1 - p_ii."""
    x = features(n, dim, device, 7)
    gen = torch.Generator(device=device).manual_seed(8)
    noise = torch.randn(n, dim, generator=gen, device=device)
    return x, F.normalize(x + 0.05 * noise, dim=-1)


def confident(bench: Bench, loss: Loss, n: int) -> None:
    """Gradients on a confident batch against float64 on the same rounded features, rows of
    "confident": eager first, then each implementation."""
    D = bench.D(loss.D)
    x, y = (t.to(bench.dtype) for t in confident_batch(n, D, bench.device))
    params = (CONFIDENT_SCALE, CONFIDENT_BIAS)
    exact = leaves(loss, x.double(), y.double(), *params, torch.float64)
    ref_loss, expected = gradients(loss.exact, exact)
    common = {
        "op": loss.op,
        "dtype": bench.dtype_name,
        "D": D,
        "N": n,
        "scale": CONFIDENT_SCALE,
        "bias": CONFIDENT_BIAS if loss.bias is not None else None,
        "floor": rounding_floor(expected, bench.dtype),
    }
    if loss.bias is None:  # how confident: the median row's 1 - p_ii = sigmoid(m_i)
        logits = CONFIDENT_SCALE * x.double() @ y.double().T
        others = logits - logits.diagonal()[:, None]
        others.diagonal().fill_(float("-inf"))
        common["median_gap"] = torch.sigmoid(others.logsumexp(dim=1)).median().item()
    eager_errors = None
    for provider in ("eager", *implementations(loss.op)):
        row = bench.add("confident", {**common, "provider": provider, "mode": "full"})
        with bench.case(row):
            fn = loss_function(loss, provider)
            value, grads = gradients(fn, leaves(loss, x, y, *params, bench.dtype))
            row["loss_err"] = relative(value, ref_loss)
            row["err"] = errors(grads, expected)
            eager_errors = row["err"] if provider == "eager" else eager_errors
            row["ok"] = within_tolerance(row["err"], row["floor"], eager_errors)
    settle(bench.device)


def large(bench: Bench, loss: Loss, n: int, provider: str, auto: bool = False) -> dict:
    """One forward+backward at a large N, a row of "large": peak memory and time from the same
    run, the forward timed first on its own, so that a run stopped in its backward keeps it."""
    device, D = bench.device, bench.D(loss.D)
    executed, floor = passes(loss.op, provider, "full")
    row = {
        "op": loss.op,
        "dtype": bench.dtype_name,
        "D": D,
        "N": n,
        "provider": provider,
        "mode": "full",
        "auto": auto,
        "passes": executed,
        "floor_passes": floor,
    }
    row = bench.add("large", {**row, **predictions(bench, loss, provider, "full", n, D)})
    with bench.case(row):
        args = inputs(loss, n, D, bench.dtype, device)
        settle(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        clock = Clock(device)
        clock.mark()
        value = loss_function(loss, provider, bench.block_bytes)(*args)
        clock.mark()
        row["forward_ms"] = clock.intervals()[0]
        bench.results.save()
        torch.autograd.grad(value, args)
        clock.mark()
        row["backward_ms"] = clock.intervals()[1]
        row["ms"] = row["forward_ms"] + row["backward_ms"]
        if device.type == "cuda":
            row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / MIB
        pass_flops = 2 * n * n * D
        row["tflops"] = executed * pass_flops / row["ms"] / 1e9
        row["tflops_floor"] = floor * pass_flops / row["ms"] / 1e9
    settle(device)
    return row
