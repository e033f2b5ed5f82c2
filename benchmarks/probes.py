"""Probes of the GPU under the losses: the runner's parts that measure no loss.

bandwidth       HBM and L2 read and copy bandwidth (a Triton streaming kernel; torch's copy)
cublas          cuBLAS at the block shapes ``plan_blocks`` gives each loss case with the run's
                buffer (the GPU default at full scale): S = X_R Y_C^T into fp32 (what blocks-mm
                runs) and into bf16, G Y and G^T X added into fp32 rows as the backward adds
                them (``addmm`` with out_dtype where torch has it), accumulator traffic included
block-configs   the G kernels with each config of their autotune lists, the bounded blocks'
                (InfoNCE 5, SigLIP 3) and the persistent ones' (2 and 3), and the persistent
                forward's (3): one pass at 16,384, each config given as ``config=``
tma             InfoNCE's forward and both G kernels at 16,384 with their operands read through
                tensor descriptors (FASTCLIP_TMA=1, read at each launch; opt-in until this
                measures it) and without
"""

from __future__ import annotations

import functools
import os
from unittest import mock

import torch
import triton
import triton.language as tl
from bench_contrastive import BATCHES, INFONCE, LARGE
from bench_siglip import SIGLIP
from harness import GIB, MIB, Bench, features, settle
from losses import block_plan, implementations, inputs, stage_functions

import fastclip.kernels.contrastive as kc
import fastclip.kernels.persistent as kp
import fastclip.kernels.persistent_siglip as kpsiglip
import fastclip.kernels.siglip as ks
from fastclip.kernels.blocks import accumulate_mm, matmul_f32
from fastclip.kernels.launch import TileConfig, fixed_config

LOSSES = (INFONCE, SIGLIP)
# The buffers the bandwidth streams: the L2's must fit the L2.
L2_BYTES = {"full": 16 * MIB, "tiny": 64 * 2**10, "interpreted": 64 * 2**10}
HBM_BYTES = {"full": 2 * GIB, "tiny": MIB, "interpreted": MIB}
CONFIGS_N = {"full": 16384, "tiny": 64, "interpreted": 32}  # N of block-configs and tma
# The G kernels' autotune lists, by loss and implementation, which block-configs times config by
# config (and the persistent forward's).
BLOCK_CONFIGS = {
    ("contrastive", "blocks"): kc._BLOCK_CONFIGS,
    ("contrastive", "persistent"): kp._GRADIENT_CONFIGS,
    ("siglip", "blocks"): ks._BLOCK_CONFIGS,
    ("siglip", "persistent"): kpsiglip._CONFIGS,
}


@triton.jit
def _stream_kernel(src_ptr, dst_ptr, chunk, n_chunks, COPY: tl.constexpr, BLOCK: tl.constexpr):
    """Program p streams chunk p mod n_chunks of src (``chunk`` elements) through L2, not L1
    (.cg): copied to the same place in dst, or summed into dst[p]. Fewer chunks than programs
    re-read the same bytes, from L2 once they fit there."""
    pid = tl.program_id(0)
    start = (pid % n_chunks).to(tl.int64) * chunk
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, chunk, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        values = tl.load(src_ptr + offs, cache_modifier=".cg")
        if COPY:
            tl.store(dst_ptr + offs, values, cache_modifier=".cg")
        else:
            acc += values
    if not COPY:
        tl.store(dst_ptr + pid, tl.sum(acc))


def part_bandwidth(bench: Bench) -> None:
    l2_bytes, hbm_bytes, sms = bench.pick(L2_BYTES), bench.pick(HBM_BYTES), 4
    chunk = min(64 * 2**10, l2_bytes // 16)  # fp32 elements per program
    if bench.device.type == "cuda":
        props = torch.cuda.get_device_properties(bench.device)
        sms = props.multi_processor_count
        l2 = getattr(props, "L2_cache_size", 0)
        if l2:  # source and destination of the copy together within two thirds of the L2
            l2_bytes = min(l2_bytes, max(4 * chunk, l2 // 3 // (4 * chunk) * 4 * chunk))
    # Programs per buffer: one per chunk streams it from HBM once; more re-read it from L2.
    stream_case(bench, "HBM", hbm_bytes, hbm_bytes // (4 * chunk), chunk)
    stream_case(bench, "L2", l2_bytes, 32 * sms, chunk)


def stream_case(bench: Bench, where: str, nbytes: int, programs: int, chunk: int) -> None:
    """Read and copy bandwidth of ``programs`` streaming chunks of an ``nbytes`` buffer."""
    src = torch.ones(nbytes // 4, device=bench.device)
    for copy in (False, True):
        row = {"what": f"{where} {'copy' if copy else 'read'}", "buffer_mib": nbytes / MIB}
        with bench.case(bench.add("bandwidth", row)):
            dst = torch.empty_like(src) if copy else torch.empty(programs, device=bench.device)
            launch = _stream_kernel[(programs,)]
            stream = functools.partial(
                launch, src, dst, chunk, nbytes // (4 * chunk), COPY=copy, BLOCK=2048, num_warps=8
            )
            moved = programs * chunk * 4 * (2 if copy else 1)
            row.update(bench.timed(stream), bytes=moved)
            row["gb_s"] = moved / row["ms"] / 1e6
    if where == "HBM":
        row = {"what": "HBM copy (torch)", "buffer_mib": nbytes / MIB}
        with bench.case(bench.add("bandwidth", row)):
            dst = torch.empty_like(src)
            row.update(bench.timed(functools.partial(dst.copy_, src)), bytes=2 * nbytes)
            row["gb_s"] = 2 * nbytes / row["ms"] / 1e6


def block_shapes(bench: Bench) -> dict[tuple[int, int, int], list[str]]:
    """The (R, C, D) block shapes each loss case walks, with the cases that walk them (and how
    many blocks make one pass), and the 8192 x 8192 blocks of the design notes."""
    shapes: dict[tuple[int, int, int], list[str]] = {}
    for loss in LOSSES:
        D = bench.D(loss.D)
        large = (bench.pick(LARGE),) if loss is INFONCE else ()
        for n in (*bench.pick(BATCHES), *large):
            for impl in implementations(loss.op):
                if (plan := block_plan(bench, impl, n)) is not None:
                    count = -(-n // plan[0]) * -(-n // plan[1])
                    shapes.setdefault((*plan, D), []).append(f"{loss.op} N={n} {impl} ({count})")
        side = min(8192, max(bench.pick(BATCHES)))
        shapes.setdefault((side, side, D), []).append("square blocks")
    return shapes


def part_cublas(bench: Bench) -> None:
    for (R, C, D), uses in sorted(block_shapes(bench).items()):
        cublas_shape(bench, R, C, D, uses)
        settle(bench.device)


def cublas_shape(bench: Bench, R: int, C: int, D: int, uses: list[str]) -> None:
    """The four products of one block shape, as the bounded-block backward calls them."""
    device, dtype = bench.device, bench.dtype
    x, y = features(R, D, device, 1).to(dtype), features(C, D, device, 2).to(dtype)
    g = (torch.randn(R, C, device=device) / C).to(dtype)
    acc_r, acc_c = torch.zeros(R, D, device=device), torch.zeros(C, D, device=device)
    dots = torch.empty(R, C, device=device)
    products = {
        "S fp32": lambda: matmul_f32(x, y.T, out=dots),
        "S bf16": lambda: torch.mm(x, y.T),
        "G Y": lambda: accumulate_mm(acc_r, g, y),
        "G^T X": lambda: accumulate_mm(acc_c, g.T, x),
    }
    for name, fn in products.items():
        row = bench.add("cublas", {"R": R, "C": C, "D": D, "product": name, "uses": uses})
        with bench.case(row):
            row.update(bench.timed(fn))
            row["tflops"] = 2 * R * C * D / row["ms"] / 1e9


def g_pass(bench: Bench, loss, args: list, config: TileConfig | None = None, impl="blocks"):
    """An implementation's G kernels over every block, neither product wanted."""
    return stage_functions(bench, loss.op, impl, *args, config=config)["G-only"]


def detached_inputs(bench: Bench, loss, n: int) -> list[torch.Tensor]:
    return [t.detach() for t in inputs(loss, n, bench.D(loss.D), bench.dtype, bench.device)]


def part_block_configs(bench: Bench) -> None:
    """One pass per config of each G kernel's autotune list (and the persistent forward's), the
    first (what runs without autotuning) first."""
    n = bench.pick(CONFIGS_N)
    for loss in LOSSES:
        D, args = bench.D(loss.D), detached_inputs(bench, loss, n)
        timed = {
            f"G ({impl})": (BLOCK_CONFIGS[loss.op, impl], functools.partial(g_pass, impl=impl))
            for impl in ("blocks", "persistent")
        }
        if loss is INFONCE:
            forward = lambda bench, loss, args, config: functools.partial(  # noqa: E731
                kc.contrastive_forward, *args, 0, True, method="persistent", config=config
            )
            timed["forward (persistent)"] = (kp._FORWARD_CONFIGS, forward)
        for stage, (configs, fn) in timed.items():
            for config in map(fixed_config, configs):
                row = {"op": loss.op, "N": n, "D": D, "stage": stage, "config": config_name(config)}
                with bench.case(bench.add("block_configs", row)):
                    row.update(bench.timed(fn(bench, loss, args, config)))
                    row["tflops"] = 2 * n * n * D / row["ms"] / 1e9
        settle(bench.device)


def part_tma(bench: Bench) -> None:
    """The kernels that compute dots (InfoNCE's forward, both G kernels) with their operands
    through tensor descriptors (FASTCLIP_TMA=1) and through pointer loads, one pass each."""
    n = bench.pick(CONFIGS_N)
    for loss in LOSSES:
        D, args = bench.D(loss.D), detached_inputs(bench, loss, n)
        timed = {"G-only": g_pass(bench, loss, args)}
        if loss is INFONCE:
            timed["forward"] = functools.partial(kc.contrastive_forward, *args, 0, True)
        for stage, fn in timed.items():
            for tma in ("0", "1"):
                row = {"op": loss.op, "N": n, "D": D, "stage": stage, "tma": tma == "1"}
                with (
                    bench.case(bench.add("tma", row)),
                    mock.patch.dict(os.environ, {"FASTCLIP_TMA": tma}),
                ):
                    row.update(bench.timed(fn))
                    row["tflops"] = 2 * n * n * D / row["ms"] / 1e9
        settle(bench.device)


def config_name(config: TileConfig) -> str:
    blocks = "x".join(str(getattr(config, f)) for f in ("block_m", "block_n", "block_k"))
    cap = f", maxnreg {config.maxnreg}" if config.maxnreg else ""
    return f"{blocks}, {config.num_warps} warps, {config.num_stages} stages{cap}"
