"""Speed and memory of the losses' implementations against eager PyTorch and torch.compile.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/render.py bench.json

Losses: "clip" (InfoNCE, ``clip_loss``) and "siglip" (``siglip_loss``). Providers:
"fastclip-blocks", "fastclip-blocks-mm" and "fastclip-fused" (the loss with that ``backend=``,
``fastclip.backends`` says what each is), "eager" (its reference in ``fastclip.reference``, in
the input dtype) and "compile" (``torch.compile`` of that reference with torch's default
automatic dynamic shapes: compiled for the first shape, then once more for all others). Modes:
"forward" (the forward half of a training step: the inputs require grad, so the autograd graph is
recorded; fastclip's SigLIP computes its gradients there) and "forward+backward" (the gradients
of the features and of the logit scale). Each case records its median time, the peak memory it
adds on top of its inputs, the matmul passes it executes and TFLOP/s counting those passes
(``tflops``) and the floor's (``tflops_floor``) in ``extra_info``; a provider that runs out of
memory is recorded as such (see conftest.py).

Without a CUDA device the GPU cases skip and one small CPU case compares the chunked PyTorch path
("fastclip-torch") with eager.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from common import DEVICE, cpu_only, measure, needs_cuda

from fastclip import clip_loss, registry, siglip_loss
from fastclip.measure import synchronize
from fastclip.reference import clip_loss_reference, siglip_loss_reference

MODES = ("forward", "forward+backward")
WIDTHS = (512, 768)
PROVIDERS = ("fastclip-blocks", "fastclip-blocks-mm", "fastclip-fused", "eager", "compile")


@dataclass(frozen=True)
class Loss:
    op: str  # fastclip.registry's name: the matmul passes each implementation executes
    fused: Callable  # the public fastclip function (takes backend=...)
    reference: Callable  # its eager reference: the "eager" provider, compiled for "compile"
    batches: tuple[int, ...]  # N of the GPU grid
    scale: float  # the logit scale (exponentiated) and bias the models start from
    bias: float | None


LOSSES = {
    "clip": Loss("contrastive", clip_loss, clip_loss_reference, (4096, 16384, 32768, 65536),
                 1 / 0.07, None),
    "siglip": Loss("siglip", siglip_loss, siglip_loss_reference, (16384, 32768, 65536, 131072),
                   10.0, -10.0),
}  # fmt: skip
# Timed runs per GPU case, after one warm-up run and one memory run. Budget (see gpu_check.sh):
# the grid cases run for about a minute in all; compilation and autotuning dominate.
ROUNDS = 3

# The compiled references, compiled on their first call (then once more, with dynamic shapes).
_COMPILED: dict[str, Callable] = {}


def _implementation(provider: str) -> str:
    """The backend= of a fastclip provider ("fastclip-blocks" -> "blocks"); "eager" otherwise."""
    return provider.removeprefix("fastclip-") if provider.startswith("fastclip-") else "eager"


def _loss_fn(loss: str, provider: str) -> Callable:
    spec = LOSSES[loss]
    if provider.startswith("fastclip-"):
        return functools.partial(spec.fused, backend=_implementation(provider))
    if provider == "eager":
        return spec.reference
    if loss not in _COMPILED:
        _COMPILED[loss] = torch.compile(spec.reference)
    return _COMPILED[loss]


def _inputs(loss: str, n: int, dim: int, dtype: torch.dtype, device: torch.device) -> list:
    """Unit-norm image and text features (n, dim), the logit scale and bias (None for CLIP);
    every tensor requires grad."""
    spec = LOSSES[loss]
    gen = torch.Generator(device=device).manual_seed(0)
    features = [
        F.normalize(torch.randn(n, dim, generator=gen, device=device), dim=-1).to(dtype)
        for _ in range(2)
    ]
    params = [torch.tensor(spec.scale, device=device)]
    if spec.bias is not None:
        params.append(torch.tensor(spec.bias, device=device))
    return [t.requires_grad_() for t in (*features, *params)]


def _runner(loss: str, provider: str, mode: str, n: int, dim: int, dtype: torch.dtype):
    """(run, inputs): one step of ``loss`` by ``provider``, synchronized, and its inputs."""
    loss_fn = _loss_fn(loss, provider)
    inputs = _inputs(loss, n, dim, dtype, DEVICE)

    def run() -> None:
        value = loss_fn(*inputs)
        if mode == "forward+backward":
            torch.autograd.grad(value, inputs)
        synchronize(DEVICE)

    return run, inputs


def _measure(
    benchmark,
    oom_log: list[dict],
    loss: str,
    provider: str,
    mode: str,
    n: int,
    dim: int,
    dtype: torch.dtype,
    rounds: int,
    warmup: bool = True,
    rivals: tuple[str, ...] = (),
) -> None:
    """One case: ``loss`` by ``provider`` on (n, dim) features, forward or forward+backward,
    alternating with the ``rivals`` providers (see ``common.measure``)."""
    run, inputs = _runner(loss, provider, mode, n, dim, dtype)
    others = [_runner(loss, p, mode, n, dim, dtype)[0] for p in rivals]
    spec, pass_flops = LOSSES[loss], 2 * n * n * dim
    impl = _implementation(provider)
    executed = registry.EAGER if impl == "eager" else registry.designs(spec.op)[impl].passes
    passes = executed.forward if mode == "forward" else executed.step
    floor = 1 if mode == "forward" else registry.FLOOR[spec.op]
    info = {"op": loss, "provider": provider, "mode": mode, "N": n, "D": dim, "passes": passes}
    info.update(dtype=str(dtype).removeprefix("torch."), floor_passes=floor)
    measure(benchmark, oom_log, info, run, inputs, passes * pass_flops, rounds, warmup, others)
    benchmark.extra_info["tflops_floor"] = floor * pass_flops / benchmark.stats.stats.median / 1e12


GRID = [
    (loss, dim, n, mode, provider)
    for loss, spec in LOSSES.items()
    for dim in WIDTHS
    for n in spec.batches
    for mode in MODES
    for provider in PROVIDERS
]  # the providers and modes of one shape run one after another, shapes in increasing size


@needs_cuda
@pytest.mark.parametrize(
    "loss, dim, n, mode, provider",
    GRID,
    ids=[f"{c[0]}-D{c[1]}-N{c[2]}-{c[3]}-{c[4]}" for c in GRID],
)
def test_gpu(benchmark, oom_log, loss, dim, n, mode, provider):
    _measure(benchmark, oom_log, loss, provider, mode, n, dim, torch.bfloat16, ROUNDS)


@needs_cuda
@pytest.mark.parametrize("provider", ["fastclip-blocks", "fastclip-blocks-mm"])
def test_gpu_large_batch(benchmark, oom_log, provider):
    """InfoNCE at N = 2^20, D = 512, bf16, forward+backward, the bounded-block implementations
    (target: <= 8 s, <= 5 GB).

    The autotuner keys batch sizes past 64K to one bucket: a forward+backward at N = 65536 tunes
    it in seconds, and the large case then runs the tuned kernels without a search of its own.
    """
    warm = _inputs("clip", 65536, 512, torch.bfloat16, torch.device("cuda"))
    torch.autograd.grad(_loss_fn("clip", provider)(*warm), warm)
    del warm
    # Compiled and tuned by the warm-up above: no warm-up run of its own (each run takes seconds).
    _measure(benchmark, oom_log, "clip", provider, "forward+backward", 2**20, 512,
             torch.bfloat16, 1, warmup=False)  # fmt: skip


CPU_PROVIDERS = ("fastclip-torch", "eager")


@cpu_only
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_cpu(benchmark, oom_log, loss, provider):
    rivals = tuple(p for p in CPU_PROVIDERS if p != provider)
    _measure(benchmark, oom_log, loss, provider, "forward+backward", 4096, 512, torch.float32, 2,
             rivals=rivals)  # fmt: skip
