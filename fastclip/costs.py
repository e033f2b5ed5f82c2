"""A cost model of the losses' implementations on a GPU: FLOPs, bytes, epilogues, launches.

``backend="auto"`` consults it where no measurement was committed (``fastclip/tuning.json``),
and the GPU benchmarks print it next to what they measure. Each implementation is a list of
stages. A stage's GPU time is the slowest of its compute, HBM bytes / HBM bandwidth and L2
bytes / L2 bandwidth; a Triton sweep's compute is its matmul time (2 N_x N_y D FLOPs a pass, at
the sweep's MMA rate) plus its epilogue's, in series, since no overlap of the two is proven in
SASS. An epilogue (``Epilogue``) takes its MUFU operations (exp2, log2, reciprocals) per
element at the MUFU rate, and per tile its reductions' shared-memory instructions and barriers
at a cycle cost each, spread over the SMs. The host launches a stage's kernels while the GPU
runs the ones before, so a stage takes the longer of its GPU time and its launches' host time:
small batches are launch-bound.

The H200's constants are calibrated on benchmarks/results/2026-11-27-h200-partial (bf16,
N = 65,536): cuBLAS bf16 GEMMs at 790 TFLOP/s; the fused backward at 151 TFLOP/s per pass, which the
L2 traffic of its fp32 workspace explains (28 FLOP per byte at 5.3 TB/s); the Triton forward
(D = 512; then two exp2 an element and the columns' statistics, 1 CTA per SM) at 268 TFLOP/s, its
epilogue included. Its epilogue is estimated per 128 x 128 tile: 2 exp2 an element (2,048 cycles at
16 a clock), about 165 shared-memory stores and 165 loads (1 cycle each) and 33 barriers (~30 cycles
each), 3,368 cycles, 3.4 of its 16.4 ms. The shared-memory cost is the largest the measurement
allows: the forward read 13.0 ms of operands from L2 (at 5.3 TB/s) and, with 1 CTA per SM, nothing
proves its epilogue overlapped those reads, so the epilogue took at most 3.4 ms; charging each
instruction once per warp (8 cycles) would make it 5.7. The sweeps' MMA-only rate, ``sweep_flops``,
is the one at which this model gives that forward 268 TFLOP/s (``mma_rate``): ~337 TFLOP/s, about
what L2 feeds 128 x 128 tiles (64 FLOP a byte at 5.3 TB/s, 339 TFLOP/s), so a sweep's epilogue adds
to its time wherever L2 keeps up. Every Triton sweep is assumed to run its matmuls at that rate,
with its own epilogue: today's forward 1 exp2 an element for 16-bit inputs (2 for fp32) and the same
column statistics; the bounded blocks' G kernel 2 exp2 (InfoNCE) or 1 exp2 and 2 MUFU reciprocals
(SigLIP's sigmoid and log1p divisions); the persistent design's G kernel 1 exp2 (InfoNCE's
one-exponential form; SigLIP's reciprocals by Newton steps on the FMA units). The persistent design
runs 2 CTAs per SM so that one CTA's epilogue may hide under the other's matmuls; that overlap is
not assumed: its epilogue counts serially, and its MMA rate (``persistent_flops``) is the blocks'
until its first GPU run refits it (``calibrate``). The HBM bandwidth is the nominal 4.8 TB/s.

The H100's (SXM, 80 GB HBM3) are the H200's with the HBM bandwidth scaled by the ratio of the
two nominal figures, 3.35 / 4.8 TB/s (a device-to-device copy on an H100 measured ~3.0 TB/s, so
HBM-bound stages may take ~10% longer than predicted). Both GPUs have the same SMs at the same
clocks (132; the H100 50 MB of L2, the H200 60 MB), so the sweep, L2, epilogue and launch
constants are assumed equal, not measured on an H100. Its cuBLAS rate is measured: dense bf16
GEMMs at 8192^3 ran at 769-798 TFLOP/s. ``device_constants`` picks the constants by GPU name.

fp16 and bf16 cost the same: an fp16 G holds G times ``FP16_G_SCALE`` (kernels/launch.py), a
factor folded into the loss weights or the kernels' epilogue (0 bytes, 0 passes), where the
alternatives would cost per block a second, column-scaled G (2 R C bytes written and read,
cuBLAS then reading each G once more) or an fp32 G (4 R C bytes instead of 2 and products off
the 16-bit tensor cores, at ``fp32_ratio`` of their rate).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from fastclip.kernels.blocks import BLOCK_BYTES, plan_blocks


@dataclass(frozen=True)
class Device:
    """Rates of one GPU, for 16-bit operands (fp32 runs at ``fp32_ratio`` of the matmul rates).
    The epilogue constants are estimates from the hardware's documented rates, not measured."""

    name: str = "NVIDIA H200"
    gemm_flops: float = 790e12  # cuBLAS dense bf16
    sweep_flops: float = 0.0  # Triton sweeps' matmuls, epilogue apart (0: unfitted; see H200)
    persistent_flops: float | None = None  # the persistent sweeps' (None: sweep_flops)
    hbm: float = 4.8e12  # bytes/s
    l2: float = 5.3e12  # bytes/s, L2 to SMs (what the fused backward's 151 TFLOP/s implies)
    sms: int = 132  # H100 and H200 SXM
    clock: float = 1.98e9  # Hz, the H100 and H200 SXM boost clock
    mufu_per_clock: int = 16  # MUFU operations (exp2, log2, reciprocal) per clock per SM, Hopper
    smem_cycles: float = 1.0  # a shared-memory instruction of a tile (estimate: module docstring)
    barrier_cycles: float = 30.0  # a CTA barrier: tens of cycles (estimate)
    torch_launch: float = 8e-6  # host seconds per PyTorch op
    triton_launch: float = 25e-6  # host seconds per Triton launch (argument binding, autotuner)
    fp32_ratio: float = 0.5  # TF32 products relative to bf16

    @property
    def mufu(self) -> float:
        """MUFU operations per second (4.2e12 on 132 SMs at 1.98 GHz)."""
        return self.mufu_per_clock * self.sms * self.clock


# Tile shapes the model assumes for the Triton sweeps (the configs' most common winners).
SWEEP_TILE = (128, 128)
FUSED_TILE = (64, 128)


@dataclass(frozen=True)
class Epilogue:
    """A Triton sweep's work beside its matmuls: MUFU operations per element, and per
    SWEEP_TILE tile its cross-warp reductions' shared-memory instructions and CTA barriers (as
    SASS counts them for a thread)."""

    mufu: int
    smem: int = 0
    barriers: int = 0

    def seconds(self, device: Device, elements: float) -> float:
        """Its time over ``elements`` of S, spread over the SMs."""
        tiles = elements / math.prod(SWEEP_TILE)
        cycles = self.smem * device.smem_cycles + self.barriers * device.barrier_cycles
        return elements * self.mufu / device.mufu + tiles * cycles / (device.sms * device.clock)


# The InfoNCE forward's column statistics per 128 x 128 tile, as compiled for sm_90: about 165
# shared-memory stores, 165 loads and 33 barriers (SASS instructions of a thread).
COLUMN_STATS = {"smem": 165 + 165, "barriers": 33}
# The forward measured at 268 TFLOP/s (module docstring): two exp2 an element, the statistics.
OLD_FORWARD = Epilogue(2, **COLUMN_STATS)


def epilogue(op: str, implementation: str, stage: str, element: int = 2) -> Epilogue:
    """The epilogue of ``implementation``'s Triton sweep ``stage`` ("forward": InfoNCE's
    statistics or SigLIP's loss alone; "G") for ``element``-byte features."""
    if op == "contrastive" and stage == "forward":  # both directions
        return Epilogue(1 if element == 2 else 2, **COLUMN_STATS)
    lean = implementation == "persistent" and stage == "G"
    if op == "contrastive":  # the persistent G's one exp2: its tiles' rows within jit.RANGE
        return Epilogue(1 if lean else 2)
    return Epilogue(1 if lean else 3)  # SigLIP: exp2, then two divisions or none


def mma_rate(device: Device, measured: list[tuple[Epilogue, float]], D: int) -> float:
    """The MMA rate at which sweeps of 1 pass each at width D, with these epilogues, take as
    long together as at their measured rates (FLOP/s, epilogue included): per element of S,
    sum(2D / measured - epilogue) = count * 2D / rate."""
    mma = sum(2 * D / rate - ep.seconds(device, 1) for ep, rate in measured)
    if mma <= 0:
        raise ValueError(f"the epilogue estimates alone exceed the measured time: {measured}")
    return 2 * D * len(measured) / mma


def calibrate(
    device: Device,
    measured: dict[str, float],
    op: str = "contrastive",
    implementation: str = "blocks",
    D: int = 512,
) -> Device:
    """``device`` refit to a GPU run of ``implementation`` at width D, 16-bit: ``measured``
    maps "gemm_tflops" (the products' GEMMs), "forward_tflops" (InfoNCE's) and "G_tflops" (the
    Triton sweeps, epilogue included) to TFLOP/s, any of them. The GEMM rate is taken as
    measured; the sweeps' MMA rate (``persistent_flops`` for "persistent", else
    ``sweep_flops``) is the one that reproduces the measured sweeps' summed time
    (``mma_rate``)."""
    fit = {}
    if "gemm_tflops" in measured:
        fit["gemm_flops"] = measured["gemm_tflops"] * 1e12
    sweeps = [
        (epilogue(op, implementation, stage), measured[f"{stage}_tflops"] * 1e12)
        for stage in ("forward", "G")
        if f"{stage}_tflops" in measured
    ]
    if sweeps:
        rate = "persistent_flops" if implementation == "persistent" else "sweep_flops"
        fit[rate] = mma_rate(device, sweeps, D)
    return dataclasses.replace(device, **fit)


ESTIMATES = Device()  # the H200's constants but the sweeps' MMA rate, fitted here
H200 = dataclasses.replace(
    ESTIMATES, sweep_flops=mma_rate(ESTIMATES, [(OLD_FORWARD, 268e12)], D=512)
)
H100 = dataclasses.replace(
    H200,
    name="NVIDIA H100 80GB HBM3",
    gemm_flops=780e12,  # measured: 769-798 TFLOP/s at 8192^3
    hbm=H200.hbm * 3.35 / 4.8,  # nominal 3.35 TB/s; copies measured ~3.0
)
DEVICES = {"H100": H100, "H200": H200}  # by the model in a GPU's name


def device_constants(gpu: str | None) -> Device:
    """The constants of the GPU named ``gpu`` (as ``torch.cuda.get_device_name`` gives it): the
    H100's for any H100, the H200's for an H200 and, renamed to say so, for any other device."""
    for model, device in DEVICES.items():
        if model in (gpu or ""):
            return device
    return dataclasses.replace(H200, name=f"{H200.name} (the default: {gpu or 'no GPU'})")


@dataclass
class Cost:
    """What an implementation does for one forward+backward (or forward) of a loss."""

    flops: float = 0.0
    hbm_bytes: float = 0.0
    l2_bytes: float = 0.0
    epilogue_seconds: float = 0.0
    launches: int = 0
    buffer_bytes: int = 0
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, device: Device, flops: float = 0.0, rate: float = 0.0,
            hbm: float = 0.0, l2: float = 0.0, epilogue: float = 0.0, triton: int = 0,
            torch: int = 0) -> None:  # fmt: skip
        """One stage: max(matmuls + ``epilogue`` seconds, HBM time, L2 time) on the GPU, or
        its launches' host time where longer (the GPU waits for launches it has not got)."""
        gpu = max((flops / rate if flops else 0.0) + epilogue, hbm / device.hbm, l2 / device.l2)
        host = triton * device.triton_launch + torch * device.torch_launch
        self.flops += flops
        self.hbm_bytes += hbm
        self.l2_bytes += l2
        self.epilogue_seconds += epilogue
        self.launches += triton + torch
        self.stages[name] = self.stages.get(name, 0.0) + max(gpu, host)
        self.seconds += max(gpu, host)


def _sweep_l2(n_a: int, n_b: int, D: int, element: int, tile=SWEEP_TILE) -> float:
    """Operand bytes a tiled sweep reads from L2: each BM x BN tile reads (BM + BN) D."""
    bm, bn = tile
    return n_a * n_b * D * element * (1 / bm + 1 / bn)


def loss_cost(
    op: str,
    implementation: str,
    n: int,
    D: int,
    element: int = 2,
    backward: bool = True,
    device: Device = H200,
    block_bytes: int | None = None,
) -> Cost:
    """Cost of ``op`` ("contrastive" or "siglip") on a square batch of n pairs by
    ``implementation``; ``element`` is the features' bytes (2 or 4), ``backward`` includes it."""
    ratio = 1.0 if element == 2 else device.fp32_ratio
    gemm, sweep = device.gemm_flops * ratio, device.sweep_flops * ratio
    mm_pass = 2.0 * n * n * D
    cost = Cost()
    siglip = op == "siglip"
    if implementation == "torch":
        # cuBLAS S in fp32 per block, then about eight fp32 elementwise passes over it; the
        # gradient products run on widened fp32 operands. SigLIP's G comes with its S.
        cost.add("forward", device, mm_pass, gemm, hbm=10 * 4 * n * n, torch=12)
        if backward:
            cost.add("G", device, 0 if siglip else mm_pass, gemm, hbm=12 * 4 * n * n, torch=16)
            cost.add("products", device, 2 * mm_pass, gemm * device.fp32_ratio, torch=4)
        return cost
    persistent = implementation == "persistent"
    own = (device.persistent_flops or device.sweep_flops) * ratio if persistent else sweep
    if not siglip or not backward:  # SigLIP's loss alone is the blocks' sweep in every design
        ep = epilogue(op, implementation, "forward", element).seconds(device, n * n)
        # The positive dots, the sweep and a combine per direction; the loss's own six ops.
        cost.add("forward", device, mm_pass, sweep if siglip else own,
                 l2=_sweep_l2(n, n, D, element), epilogue=ep, triton=4, torch=6)  # fmt: skip
    if not backward:
        return cost
    if implementation == "fused":
        bm, bn = FUSED_TILE
        tiles = (n / bm) * (n / bn)
        sweeps = 2
        per_tile = (bm + 2 * bn) * D * element + 2 * bm * D * 4
        # MUFU operations per element over both sweeps: InfoNCE's G twice (2 exp2 each);
        # SigLIP's loss and G (an exp2 and two divisions), then G alone (one division).
        mufu = Epilogue(5 if siglip else 4)
        cost.add("backward", device, sweeps * 2 * mm_pass, sweep, l2=sweeps * tiles * per_tile,
                 epilogue=mufu.seconds(device, n * n), triton=2 * sweeps, torch=8)  # fmt: skip
        if siglip:  # its gradients come with its loss
            cost.stages["forward"] = cost.stages.pop("backward")
        return cost
    dots = 4 if implementation == "blocks-mm" else 0
    R, C = plan_blocks(n, n, element + dots, block_bytes or BLOCK_BYTES)
    blocks = math.ceil(n / R) * math.ceil(n / C)
    cost.buffer_bytes = R * C * element
    g_bytes = n * n * element
    g_epilogue = epilogue(op, implementation, "G", element).seconds(device, n * n)
    if implementation == "blocks-mm":
        cost.add("S", device, mm_pass, gemm, hbm=4 * n * n, torch=blocks)
        cost.add("G", device, hbm=4 * n * n + g_bytes, epilogue=g_epilogue, triton=blocks,
                 torch=3 * blocks)  # fmt: skip
    else:  # per block a G kernel; its sums zeroed (but the persistent kernel's), summed, added;
        # once, InfoNCE's two softmaxes' statistics (a launch each) and its weights
        ops = 2 if persistent else 3
        cost.add("G", device, mm_pass, own, hbm=g_bytes, l2=_sweep_l2(n, n, D, element),
                 epilogue=g_epilogue, triton=blocks + (0 if siglip else 2),
                 torch=ops * blocks + (0 if siglip else 4))  # fmt: skip
    # Each block's products read and write the fp32 accumulator rows they add to.
    accumulators = blocks * (R + C) * D * 4 * 2
    cost.add("products", device, 2 * mm_pass, gemm, hbm=2 * g_bytes + accumulators,
             torch=2 * blocks + 4)  # fmt: skip
    return cost


def fastest(
    op: str, candidates: tuple[str, ...], n: int, D: int, element: int, device: Device = H200
) -> str:
    """The candidate the model expects to be fastest for a forward+backward."""
    return min(
        candidates, key=lambda impl: loss_cost(op, impl, n, D, element, True, device).seconds
    )
