"""The cost model reproduces the measured H200 points and counts what each design executes; the
backend table picks from measurements first, the model second."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastclip.backends as fb
from fastclip import clip_loss, costs, registry, siglip_loss
from fastclip.kernels.blocks import BLOCK_BYTES

N, PASS = 65536, lambda n, d: 2.0 * n * n * d  # noqa: E731


@pytest.mark.parametrize(
    "op, impl, D, backward, measured, tolerance",
    [
        ("contrastive", "fused", 512, False, 16.4e-3, 0.1),  # forward, then 2 exp2 (today 1)
        ("contrastive", "fused", 512, True, 132e-3, 0.15),  # forward + fused backward
        ("siglip", "fused", 768, True, 204e-3, 0.25),  # both fused sweeps
    ],
)
def test_calibrated_on_the_h200_measurements(op, impl, D, backward, measured, tolerance):
    """benchmarks/results/2026-11-27-h200-partial, bf16, N = 65,536."""
    seconds = costs.loss_cost(op, impl, N, D, 2, backward).seconds
    assert seconds == pytest.approx(measured, rel=tolerance)


def test_the_sweeps_mma_rate_gives_the_measured_forward_its_rate():
    """The forward that ran at 268 TFLOP/s (two exp2 an element, the column statistics), as a
    stage of the model: its matmuls at the fitted MMA rate, then its epilogue, in series."""
    cost, dev = costs.Cost(), costs.H200
    cost.add("forward", dev, PASS(N, 512), dev.sweep_flops,
             epilogue=costs.OLD_FORWARD.seconds(dev, N * N), triton=2, torch=6)  # fmt: skip
    assert PASS(N, 512) / cost.seconds == pytest.approx(268e12, rel=0.01)
    assert dev.sweep_flops > 268e12  # the epilogue took part of the measured time


DESIGNS = [(op, d.name) for op, listed in registry.LOSSES.items() for d in listed]


@pytest.mark.parametrize("op, impl", DESIGNS)
def test_the_model_counts_the_registry_passes(op, impl):
    passes = registry.designs(op)[impl].passes
    assert costs.loss_cost(op, impl, 8192, 512).flops == pytest.approx(
        passes.step * PASS(8192, 512)
    )
    if op == "contrastive":  # SigLIP's forward with gradients is its whole step
        forward = costs.loss_cost(op, impl, 8192, 512, backward=False).flops
        assert forward == pytest.approx(passes.forward * PASS(8192, 512))


class Counted(TorchDispatchMode):
    """Multiply-adds of the GEMMs (mm, addmm) that run under it, inside fastclip's custom
    operators too: a dispatch mode sees a custom op as one operator, so this one runs the op's
    implementation under itself."""

    GEMMS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, name = func.name().partition("::")
        if namespace == "fastclip":
            with self:
                return fb.IMPLEMENTATIONS[name.partition(".")[0]](*args, **(kwargs or {}))
        if func.overloadpacket in self.GEMMS:
            a, b = args[-2:]
            self.macs += a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


@pytest.fixture
def dots(monkeypatch):
    """Multiply-adds of the Triton interpreter's tl.dot calls (the kernels' products)."""
    from triton.runtime import interpreter

    count = {"macs": 0}
    create_dot = interpreter.InterpreterBuilder.create_dot

    def counted(self, a, b, *args):
        count["macs"] += math.prod(a.data.shape) * b.data.shape[-1]  # (.., M, K) @ (.., K, N)
        return create_dot(self, a, b, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counted)
    return count


@pytest.mark.parametrize("op, impl", DESIGNS)
def test_the_registry_counts_what_runs(dots, op, impl):
    """The passes each design executes, counted as it runs: the kernels' tl.dot products
    (through the interpreter) and cuBLAS's GEMMs, over several blocks (N = 64, D = 32, tiles of
    16: no padding)."""
    n, dim = 64, 32
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(n, dim, generator=gen).requires_grad_() for _ in range(2))
    fn = clip_loss if op == "contrastive" else functools.partial(siglip_loss, logit_bias=-1.0)
    passes = registry.designs(op)[impl].passes
    with Counted() as gemms:
        loss = fn(x, y, 10.0, backend=impl, block_bytes=4096)
        assert dots["macs"] + gemms.macs == passes.forward * n * n * dim
        loss.backward()
        assert dots["macs"] + gemms.macs == passes.step * n * n * dim


@pytest.mark.parametrize("impl", ["blocks", "blocks-mm", "persistent"])
@pytest.mark.parametrize("n", [4096, 65536, 1 << 20])
def test_the_block_buffer_stays_bounded(impl, n):
    cost = costs.loss_cost("contrastive", impl, n, 512)
    assert 0 < cost.buffer_bytes <= BLOCK_BYTES
    assert cost.launches >= 1
    if impl == "persistent":  # the same G buffer as the blocks'
        assert cost.buffer_bytes == costs.loss_cost("contrastive", "blocks", n, 512).buffer_bytes


@pytest.mark.parametrize("op, D, mufu", [("contrastive", 512, 1), ("siglip", 768, 2)])
def test_the_persistent_g_saves_its_mufu_operations(op, D, mufu):
    """Same passes as the blocks, a G kernel with fewer MUFU operations an element (InfoNCE
    1 exp2 for 2; SigLIP 1 exp2 for 1 and 2 reciprocals), its 2-CTA overlap not assumed: the
    G stage is shorter by exactly those operations, every other stage the same."""
    blocks, persistent = (costs.loss_cost(op, impl, N, D) for impl in ("blocks", "persistent"))
    assert persistent.seconds < blocks.seconds
    saved = blocks.stages.pop("G") - persistent.stages.pop("G")
    assert saved == pytest.approx(mufu * N * N / costs.H200.mufu)
    assert persistent.stages == blocks.stages


def test_small_batches_are_launch_bound():
    """At N = 256 every stage waits for the host: as long at any width, the forward its 4
    Triton launches and 6 PyTorch ops; at N = 65,536 the GPU's work sets the time."""
    dev = costs.H200
    for op in registry.LOSSES:
        for impl in registry.names(op):
            narrow, wide = (costs.loss_cost(op, impl, 256, D).stages for D in (512, 1024))
            assert narrow == wide, (op, impl)
    forward = costs.loss_cost("contrastive", "persistent", 256, 512).stages["forward"]
    assert forward == pytest.approx(4 * dev.triton_launch + 6 * dev.torch_launch)
    narrow, wide = (costs.loss_cost("contrastive", "persistent", N, D).seconds for D in (512, 1024))
    assert wide > 1.9 * narrow


def test_calibrate_refits_the_rates_of_a_run():
    """A run's measured rates move the design's prediction toward them; the model's own
    prediction refits to the same constants; the persistent run leaves the blocks' alone."""
    dev = costs.H200
    modeled = costs.loss_cost("contrastive", "persistent", N, 512)
    g_tflops = PASS(N, 512) / modeled.stages["G"] / 1e12
    same = costs.calibrate(dev, {"G_tflops": g_tflops}, implementation="persistent")
    assert same.persistent_flops == pytest.approx(dev.sweep_flops)
    faster = costs.calibrate(dev, {"G_tflops": 1.05 * g_tflops}, implementation="persistent")
    refit = costs.loss_cost("contrastive", "persistent", N, 512, device=faster)
    assert refit.stages["G"] == pytest.approx(modeled.stages["G"] / 1.05)  # as measured
    assert costs.loss_cost("contrastive", "blocks", N, 512, device=faster).seconds == (
        costs.loss_cost("contrastive", "blocks", N, 512).seconds
    )
    slow = costs.calibrate(dev, {"gemm_tflops": 600}, implementation="persistent")
    products = [
        costs.loss_cost("contrastive", "blocks", N, 512, device=d).stages["products"]
        for d in (slow, dev)
    ]
    assert products[0] > products[1]
    with pytest.raises(ValueError, match="epilogue"):  # faster than its epilogue alone allows
        costs.calibrate(dev, {"forward_tflops": 1000}, D=64)


def test_time_grows_with_the_batch_and_the_width():
    for impl in registry.names("contrastive"):
        times = [costs.loss_cost("contrastive", impl, n, 512).seconds for n in (4096, 16384, 65536)]
        assert times == sorted(times), impl
        assert costs.loss_cost("contrastive", impl, 16384, 768).seconds > times[1], impl


def test_the_model_prefers_gemm_backwards_at_scale():
    """Where the fused backward is L2-bound (the measured case), the cuBLAS designs win."""
    for op, dim in (("contrastive", 512), ("siglip", 768)):
        assert costs.fastest(op, registry.names(op, triton=True), N, dim, 2) != "fused", op


def test_the_table_picks_measurements_first(monkeypatch):
    modeled = fb.fastest("contrastive", torch.bfloat16, 512, N)
    assert modeled in ("blocks", "blocks-mm", "fused")  # never an unmeasured design
    other = next(name for name in ("fused", "blocks") if name != modeled)
    table = {"contrastive": {"bfloat16": {"512": {"65536": other, "4096": modeled}}}}
    monkeypatch.setattr(fb, "_measured", lambda: table)
    assert fb.fastest("contrastive", torch.bfloat16, 500, 60000) == other  # nearest D, N
    assert fb.fastest("contrastive", torch.bfloat16, 512, 5000) == modeled
    assert fb.fastest("siglip", torch.bfloat16, 512, N) in ("blocks", "blocks-mm", "fused")
    table = {"contrastive": {"bfloat16": {"512": {"65536": "persistent"}}}}
    monkeypatch.setattr(fb, "_measured", lambda: table)
    assert fb.fastest("contrastive", torch.bfloat16, 512, N) == "persistent"  # once measured


def test_constants_by_gpu_name():
    """The H100's differ from the H200's in HBM bandwidth (and the measured GEMM rate) alone;
    any other GPU gets the H200's, named as the default."""
    assert costs.device_constants("NVIDIA H100 80GB HBM3") is costs.H100
    assert costs.device_constants("NVIDIA H200") is costs.H200
    assert costs.H100.hbm == pytest.approx(3.35e12) and costs.H100.l2 == costs.H200.l2
    other = costs.device_constants("NVIDIA A100-SXM4-80GB")
    assert other.hbm == costs.H200.hbm and "default" in other.name and "A100" in other.name
    assert "default" in costs.device_constants(None).name
    # Less HBM bandwidth and a slower GEMM: the same forward+backward takes longer.
    h100 = costs.loss_cost("contrastive", "blocks", N, 512, device=costs.H100).seconds
    assert h100 > costs.loss_cost("contrastive", "blocks", N, 512).seconds
