"""A cost model of the losses' implementations on a GPU: FLOPs, bytes, exponentials, launches.

``backend="auto"`` consults it where no measurement was committed (``fastclip/tuning.json``),
and the GPU benchmarks print it next to what they measure. Each implementation is a list of
stages; a stage takes max(FLOPs / its compute rate, HBM bytes / HBM bandwidth, L2 bytes / L2
bandwidth, exponentials / MUFU rate) plus its launches' host overhead. Matmul passes are
2 N_x N_y D FLOPs each.

The H200's constants are calibrated on benchmarks/results/2026-11-27-h200-partial: the Triton
forward sweep ran at 268 TFLOP/s (N = 65,536, D = 512, bf16); the fused backward at 151 TFLOP/s
per pass, which the L2 traffic of its fp32 workspace explains (28 FLOP per byte at 5.3 TB/s);
cuBLAS bf16 GEMMs at 790 TFLOP/s. Its HBM bandwidth is the nominal 4.8 TB/s. A kernel that never
ran on a GPU (the bounded-block G kernel) is assumed to sweep at the forward's measured rate.

The H100's (SXM, 80 GB HBM3) are the H200's with the HBM bandwidth scaled by the ratio of the
two nominal figures, 3.35 / 4.8 TB/s (a device-to-device copy on an H100 measured ~3.0 TB/s, so
HBM-bound stages may take ~10% longer than predicted). Both GPUs have the same SMs at the same
clocks (132; the H100 50 MB of L2, the H200 60 MB), so the sweep, L2, MUFU and launch constants
are assumed equal, not measured on an H100. Its cuBLAS rate is measured: dense bf16 GEMMs at
8192^3 ran at 769-798 TFLOP/s. ``device_constants`` picks the constants by GPU name.

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
    """Rates of one GPU, for 16-bit operands (fp32 runs at ``fp32_ratio`` of the matmul rates)."""

    name: str = "NVIDIA H200"
    gemm_flops: float = 790e12  # cuBLAS dense bf16
    sweep_flops: float = 268e12  # a Triton similarity sweep with its exponential epilogue
    hbm: float = 4.8e12  # bytes/s
    l2: float = 5.3e12  # bytes/s, L2 to SMs (what the fused backward's 151 TFLOP/s implies)
    mufu: float = 4.2e12  # exp2/log2 per second (16 per clock per SM)
    torch_launch: float = 8e-6  # host seconds per PyTorch op
    triton_launch: float = 25e-6  # host seconds per Triton launch (argument binding, autotuner)
    fp32_ratio: float = 0.5  # TF32 products relative to bf16
    sms: int = 132


H200 = Device()
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
    exponentials: float = 0.0
    launches: int = 0
    buffer_bytes: int = 0
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, device: Device, flops: float = 0.0, rate: float = 0.0,
            hbm: float = 0.0, l2: float = 0.0, exp2: float = 0.0, triton: int = 0,
            torch: int = 0) -> None:  # fmt: skip
        """One stage: the slowest of its resources, plus its launches' host overhead."""
        busy = max(
            flops / rate if flops else 0.0,
            hbm / device.hbm,
            l2 / device.l2,
            exp2 / device.mufu,
        )
        host = triton * device.triton_launch + torch * device.torch_launch
        self.flops += flops
        self.hbm_bytes += hbm
        self.l2_bytes += l2
        self.exponentials += exp2
        self.launches += triton + torch
        self.stages[name] = self.stages.get(name, 0.0) + busy + host
        self.seconds += busy + host


# Tile shapes the model assumes for the Triton sweeps (the configs' most common winners).
SWEEP_TILE = (128, 128)
FUSED_TILE = (64, 128)


def _sweep_l2(n_a: int, n_b: int, D: int, element: int, tile=SWEEP_TILE) -> float:
    """Operand bytes a tiled sweep reads from L2: each BM x BN tile reads (BM + BN) D."""
    bm, bn = tile
    return n_a * n_b * D * element * (1 / bm + 1 / bn)


def _rates(device: Device, element: int) -> tuple[float, float]:
    ratio = 1.0 if element == 2 else device.fp32_ratio
    return device.gemm_flops * ratio, device.sweep_flops * ratio


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
    gemm, sweep = _rates(device, element)
    mm_pass = 2.0 * n * n * D
    cost = Cost()
    siglip = op == "siglip"
    # Exponentials per element: InfoNCE's forward 2 (rows and columns), its G 2; SigLIP's terms
    # one exp2 and the log1p series (no MUFU).
    exp2 = 1 if siglip else 2
    if implementation == "torch":
        # cuBLAS S in fp32 per block, then about eight fp32 elementwise passes over it; the
        # gradient products run on widened fp32 operands. SigLIP's G comes with its S.
        cost.add("forward", device, mm_pass, gemm, hbm=10 * 4 * n * n, torch=12)
        if backward:
            cost.add("G", device, 0 if siglip else mm_pass, gemm, hbm=12 * 4 * n * n, torch=16)
            cost.add("products", device, 2 * mm_pass, gemm * device.fp32_ratio, torch=4)
        return cost
    fused_siglip_forward = siglip and backward and implementation == "fused"
    if not siglip or not backward:
        cost.add("forward", device, mm_pass, sweep, l2=_sweep_l2(n, n, D, element),
                 exp2=exp2 * n * n, triton=2, torch=6)  # fmt: skip
    if not backward:
        return cost
    if implementation == "fused":
        bm, bn = FUSED_TILE
        tiles = (n / bm) * (n / bn)
        sweeps = 2
        per_tile = (bm + 2 * bn) * D * element + 2 * bm * D * 4
        cost.add("backward", device, sweeps * 2 * mm_pass, sweep, l2=sweeps * tiles * per_tile,
                 exp2=sweeps * exp2 * n * n, triton=2 * sweeps, torch=8)  # fmt: skip
        if fused_siglip_forward:
            cost.stages["forward"] = cost.stages.pop("backward")
        return cost
    dots = 4 if implementation == "blocks-mm" else 0
    R, C = plan_blocks(n, n, element + dots, block_bytes or BLOCK_BYTES)
    blocks = math.ceil(n / R) * math.ceil(n / C)
    cost.buffer_bytes = R * C * element
    g_bytes = n * n * element
    if implementation == "blocks":
        cost.add("G", device, mm_pass, sweep, hbm=g_bytes, l2=_sweep_l2(n, n, D, element),
                 exp2=exp2 * n * n, triton=blocks, torch=3 * blocks)  # fmt: skip
    else:
        cost.add("S", device, mm_pass, gemm, hbm=4 * n * n, torch=blocks)
        cost.add("G", device, hbm=4 * n * n + g_bytes, exp2=exp2 * n * n, triton=blocks,
                 torch=3 * blocks)  # fmt: skip
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
