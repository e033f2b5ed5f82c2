"""The short GPU run: what each implementation of the losses costs, stage by stage, in minutes.

    python benchmarks/gpu_quick.py [--out quick.json] [--merge] [--budget SECONDS] [--parts a,b]
                                   [--tiny]
    TRITON_INTERPRET=1 python benchmarks/gpu_quick.py --tiny --out runs/quick.json   # a CPU

No autotuning (FASTCLIP_AUTOTUNE=0): every kernel launches the first config of its autotune
list that fits the GPU, one the Hopper compile test checks; the JSON's "configs" names them.
Times are medians (with p20 and p80) of runs back to back on the GPU's timeline, from CUDA
events; peak memory is what a run allocates on top of its inputs. The JSON is rewritten
(atomically) after every measurement, so a part stopped at its time limit, or a killed process,
keeps what finished; each part's status is in its "parts", "running" until the part ends.
--merge adds the parts run to an existing JSON, replacing their earlier rows and keeping the
others': ``gpu_quick.sh`` runs each part that never ran on a GPU in a process of its own, under
a hard limit, all into one JSON. ``quick_summary.py`` turns it into summary.md and ``tuning.py``
into fastclip/tuning.json.

--tiny runs every part at tiny sizes. On a GPU it compiles the kernels the full run launches
(Triton caches them on disk; gpu_quick.sh runs it beside the tests). On a CPU, with
TRITON_INTERPRET=1, it runs the script's logic through Triton's interpreter in under a minute,
at feature widths of 32 and in fp16 (the interpreter's bf16 products are wrong): its times mean
nothing.

Parts, in this order (``--parts`` picks some, in the order given):
  bandwidth       HBM and L2 read and copy bandwidth (a Triton streaming kernel; torch's copy)
  cublas          cuBLAS at the block shapes ``plan_blocks`` gives each case: S = X_R Y_C^T into
                  fp32 (what blocks-mm runs) and into bf16, G Y and G^T X accumulated in fp32
  contrastive     InfoNCE, D = 512, and
  siglip          SigLIP, D = 768, at N = 4,096, 16,384, 65,536: blocks, blocks-mm, fused and
                  eager. Per case: the forward+backward time, TFLOP/s counting the matmul passes
                  it executes and the floor's, each stage's time beside ``fastclip.costs``'
                  prediction (on the constants of the GPU it runs on), peak extra memory against
                  N D 8 bytes + the buffer, the gradients' error in bf16 against the fp32 PyTorch
                  path on the same inputs. Also the evaluation forward (no grad, 1 pass) against
                  eager.
  confident       bf16 gradients on a confident batch (texts = images + 5% noise, logit scale
                  100) against float64 (``clip_loss_exact``, ``siglip_loss_reference``)
  retrieval       similarity at 16,384^2 against cuBLAS; top-k at 65,536, k = 10, against eager
  projection      the normalized projection, N = 32,768, 768 -> 512, against eager
  large           InfoNCE at N = 2^20, D = 512, forward+backward once by auto's implementation,
                  then by the other bounded-block one while the part's time lasts
  block-configs   the bounded-block G kernels with each config of their autotune lists (InfoNCE
                  5, SigLIP 3): one G pass at 16,384
  tma             InfoNCE's forward and both G kernels at 16,384 with their operands read through
                  tensor descriptors (FASTCLIP_TMA=1, opt-in until this measures it) and without
  compile         the projection's torch.compile baseline (its compilation dominates)

Stages, named as ``fastclip.costs`` names them: InfoNCE blocks = forward, G (the backward with
neither gradient wanted: the G kernel over every block), products (backward - G); blocks-mm
adds S (cuBLAS computing the blocks' dots, which G then excludes); fused = forward, backward.
SigLIP computes its gradients with its loss: blocks = G (S, loss and G), products; fused =
forward (both sweeps).

Budget on an H100 or H200, in seconds. The limits are enforced (and capped by --budget; in
gpu_quick.sh each process also runs under a hard limit of its parts' limits plus ~4 s to start
Python, torch and CUDA). The estimates are not measurements: they take the 2026-11-27 H200
run's rates (InfoNCE at N = 65,536: forward 16.4 ms, fused forward+backward 132 ms, eager 114 ms
and its forward 50 ms; SigLIP: fused 204 ms, eager 83 ms; an H100 has ~30% less HBM bandwidth
and the same compute), ``fastclip.costs``' predictions for what never ran (blocks and blocks-mm
~46 ms at 65,536 and 11.7 s at 2^20), and guesses (g) for compilation, which gpu_quick.sh mostly
does beforehand. A case runs ~11 times (error, memory, a probe, up to 9 timed runs filling
0.4 s), a stage ~11 times:

  | part          | limit | estimate | how                                                   |
  |---------------|------:|---------:|-------------------------------------------------------|
  | bandwidth     |     6 |        2 | 2 GiB streamed ~22 times at 3-4 TB/s: 0.8 s           |
  | cublas        |    10 |        3 | 15 shapes x 4 products x 11 runs of 0.05-3 ms         |
  | contrastive   |    28 |        8 | N = 65,536: fp32 reference 0.5, forwards 0.7, eager   |
  |               |       |          | 6 x 114 ms, blocks and blocks-mm 11 x 46 ms + stages  |
  |               |       |          | 0.7 each, fused 6 x 132 ms + stages 0.8: ~6 s; the    |
  |               |       |          | smaller N ~1 s; 20 s more if nothing was compiled (g) |
  | siglip        |    28 |        9 | N = 65,536: reference 0.7, eager 7 x 83 ms, blocks    |
  |               |       |          | 1.3, blocks-mm 1.4, fused 11 x 204 ms: ~7 s           |
  | confident     |    10 |        2 | N = 4,096: float64 on the GPU, 4 bf16 runs per loss   |
  | retrieval     |    10 |        4 | top-k at 65,536: eager ~40 ms (g), fastclip ~20 ms;   |
  |               |       |          | 2 kernels to compile if not yet (g)                   |
  | projection    |     6 |        2 | runs under 1 ms                                       |
  | large         |    25 |       25 | the model's 11.7 s, then the other implementation's   |
  |               |       |          | 11.8 s, which the limit may stop                      |
  | block-configs |    15 |        4 | 8 G passes of ~1.5 ms x 11; compiled beforehand       |
  | tma           |    10 |        4 | 6 passes of ~1.5 ms x 11, 4 kernels to compile (g)    |
  | compile       |    22 |       20 | Inductor compiling a forward and a backward (g)       |
  | sum           |   170 |       83 | plus ~4 s per process to start Python, torch, CUDA    |
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import platform
import signal
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from tuning import within_tolerance

import fastclip.kernels.contrastive as kc
import fastclip.kernels.projection as kp
import fastclip.kernels.siglip as ks
import fastclip.kernels.similarity as ksim
from fastclip import backends, clip_loss, costs, registry, siglip_loss, similarity, topk_similarity
from fastclip.kernels.blocks import (
    accumulate_mm,
    default_block_bytes,
    matmul_f32,
    out_dtype_products,
    plan_blocks,
)
from fastclip.kernels.tiles import (
    INTERPRETER_CONFIG,
    TileConfig,
    first_fitting,
    fixed_config,
    interpreting,
)
from fastclip.measure import peak_memory_bytes
from fastclip.projection import normalized_linear
from fastclip.reference import (
    clip_loss_exact,
    clip_loss_reference,
    normalized_linear_reference,
    siglip_loss_reference,
    similarity_reference,
)
from fastclip.registry import FLOOR

MIB, GIB = 2**20, 2**30


@dataclass(frozen=True)
class Sizes:
    """The shapes of a run: the real ones, or tiny ones that run every line in seconds."""

    batches: tuple[int, ...]  # N of the loss cases
    confident: int  # N of the confident batch
    large: int  # N of the one large InfoNCE case
    similarity: int  # n of the n x n similarity matrix
    topk: int  # queries and keys of the top-k case
    projection: int  # rows of the projection case
    l2_bytes: int  # the buffer the L2 bandwidth streams (it must fit the L2)
    hbm_bytes: int  # the buffer the HBM bandwidth streams
    block_bytes: int | None  # the losses' G buffer; None: the library's default
    block_configs_n: int  # N of the block-configs part
    max_runs: int  # timed runs after the probe, at most
    # Every feature width (the projection's: 1.5 x width -> width); None: the real ones.
    width: int | None = None


FULL = Sizes(
    batches=(4096, 16384, 65536),
    confident=4096,
    large=2**20,
    similarity=16384,
    topk=65536,
    projection=32768,
    l2_bytes=16 * MIB,
    hbm_bytes=2 * GIB,
    block_bytes=None,
    block_configs_n=16384,
    max_runs=9,
)
# Multiples of 16 as the real sizes are (Triton specializes integers on that), blocks of 64 x 64
# for the losses: a --tiny run on a GPU compiles the kernels the real one launches.
TINY = Sizes(
    batches=(64, 96),
    confident=64,
    large=256,
    similarity=64,
    topk=16,
    projection=64,
    l2_bytes=64 * 2**10,
    hbm_bytes=MIB,
    block_bytes=8 * 2**10,
    block_configs_n=64,
    max_runs=1,
)
# TINY narrower still, for Triton's interpreter: it compiles nothing, and pays for every feature
# chunk of every program in Python.
INTERPRETED = dataclasses.replace(
    TINY, batches=(64,), confident=32, large=128, block_configs_n=32, width=32
)


@dataclass(frozen=True)
class Loss:
    """One loss's cases: its public function and eager reference, width and parameters."""

    public: Callable
    reference: Callable
    D: int
    scale: float  # the logit scale of the random batches, exponentiated
    bias: float | None


LOSSES = {
    "contrastive": Loss(clip_loss, clip_loss_reference, 512, 1 / 0.07, None),
    "siglip": Loss(siglip_loss, siglip_loss_reference, 768, 10.0, -10.0),
}
IMPLEMENTATIONS = registry.names("contrastive", triton=True)  # SigLIP's are the same


def passes(op: str, impl: str) -> int:
    """Matmul passes of 2 N^2 D a forward+backward by ``impl`` executes (fastclip.registry; the
    eager formula stores S: 3)."""
    return (registry.EAGER if impl == "eager" else registry.designs(op)[impl].passes).step


CONFIDENT_SCALE = 100.0  # a trained CLIP's logit scale; SigLIP's bias scales with it, as in tests
CONFIDENT_BIAS = -50.0
RETRIEVAL_D = 512  # the features' width of the similarity and top-k cases
TOPK = 10
PROJECTION = (768, 512)  # (D_in, D_out): ViT-B/16's image projection


class PartTimeout(BaseException):
    """A part ran past its limit (a BaseException, so that no case's error handling eats it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise PartTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# The kernels the parts launch, by their autotuners: without autotuning each launches the first
# config of its list that its pruning keeps for the GPU (``tiles.launch``). The projection's
# forward prunes by its output block, here the projection case's.
KERNELS = {
    "InfoNCE forward": (kc._forward_tuned, {}),
    "InfoNCE G": (kc._block_tuned, {}),
    "InfoNCE fused backward": (kc._backward_tuned, {}),
    "SigLIP sweep": (ks._sweep_tuned, {}),
    "SigLIP G": (ks._block_tuned, {}),
    "similarity": (ksim._similarity_tuned, {}),
    "projection forward": (
        kp._forward_tuned,
        {"BO": kp.output_block(PROJECTION[1]), "WIDE": False},
    ),
    "projection dx": (kp._dx_tuned, {}),
    "projection dW": (kp._dw_tuned, {}),
}


def config_name(config: TileConfig) -> str:
    blocks = "x".join(str(getattr(config, f)) for f in ("block_m", "block_n", "block_k"))
    cap = f", maxnreg {config.maxnreg}" if config.maxnreg else ""
    return f"{blocks}, {config.num_warps} warps, {config.num_stages} stages{cap}"


def launched_configs(operand: torch.Tensor) -> dict[str, dict]:
    """What each kernel of KERNELS launches without autotuning, for operands like ``operand``
    (its dtype and device): block sizes, warps, stages, register cap. On a CPU, the
    interpreter's tiles."""
    if operand.device.type != "cuda" and interpreting():
        c = INTERPRETER_CONFIG
        blocks = {"BM": c.block_m, "BN": c.block_n, "BK": c.block_k, "BD": c.block_d}
        return {"every kernel (the interpreter's)": describe(blocks, c)}
    configs = {}
    for name, (tuned, meta) in KERNELS.items():
        args = {"a_ptr": operand, **meta}
        first = first_fitting(tuned, args)
        configs[name] = describe(first.kwargs, first)
    return configs


def describe(blocks: dict, config) -> dict:
    """A config (TileConfig or triton.Config) as the JSON's "configs" names it."""
    return {"blocks": dict(blocks), "warps": config.num_warps, "stages": config.num_stages,
            "maxnreg": config.maxnreg}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Timing, memory, errors
# ----------------------------------------------------------------------------------------------


class Marks:
    """Points on the device's timeline: CUDA events, or the host's clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.points: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append(event)
        else:
            self.points.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Milliseconds between consecutive marks (waits for the device)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.points, self.points[1:], strict=False)]
        return [(b - a) * 1e3 for a, b in zip(self.points, self.points[1:], strict=False)]


def settle(device: torch.device) -> None:
    """Wait for the device and return cached memory, so the next case starts from the same state."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error: how much of the quantity is wrong."""
    diff = (got.double() - expected.double()).norm()
    return (diff / expected.double().norm()).item()


def features(n: int, dim: int, device: torch.device, seed: int) -> torch.Tensor:
    """(n, dim) fp32 rows of unit norm."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=gen, device=device), dim=-1)


def leaves(
    loss: Loss,
    x: torch.Tensor,
    y: torch.Tensor,
    scale: float,
    bias: float | None,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """The loss's arguments, every one a leaf requiring grad: features in ``dtype``, the logit
    scale (and SigLIP's bias) in fp32, or float64 with float64 features."""
    param = torch.float64 if dtype == torch.float64 else torch.float32
    args = [x.to(dtype), y.to(dtype), torch.tensor(scale, dtype=param, device=x.device)]
    if loss.bias is not None:
        args.append(torch.tensor(bias, dtype=param, device=x.device))
    return [t.detach().requires_grad_() for t in args]


def gradients(fn: Callable, args: list[torch.Tensor]) -> tuple[torch.Tensor, tuple]:
    value = fn(*args)
    return value.detach(), torch.autograd.grad(value, args)


GRADIENT_NAMES = ("dx", "dy", "dscale", "dbias")


def errors(grads, expected) -> dict[str, float]:
    """Relative error of each gradient (features, scale, bias) against ``expected``."""
    return {
        name: relative(g, r) for name, g, r in zip(GRADIENT_NAMES, grads, expected, strict=False)
    }


def rounding_floor(expected, dtype: torch.dtype) -> dict[str, float]:
    """The feature gradients' error after rounding the expected ones to ``dtype``: what no
    implementation returning that dtype can beat."""
    return {
        name: relative(r.to(dtype), r) for name, r in zip(("dx", "dy"), expected[:2], strict=True)
    }


@contextlib.contextmanager
def case(row: dict, results: Results) -> Iterator[None]:
    """Measure into ``row``: an out-of-memory or other error is recorded there, and the part
    goes on with its next case."""
    try:
        yield
    except torch.OutOfMemoryError:
        row["oom"] = True
    except Exception as error:  # noqa: BLE001 - recorded, the next case may still run
        traceback.print_exc()
        row["error"] = f"{type(error).__name__}: {error}"[:500]
    results.save()


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


class Results:
    """The run's JSON, rewritten whole (atomically, through ``<name>.partial`` beside it) after
    every measurement. With ``merge``, an existing JSON at ``path`` is kept: its facts (those of
    the first process) and the rows of the parts this run does not repeat."""

    def __init__(self, path: Path, header: dict, merge: bool = False) -> None:
        self.path = path
        old = json.loads(path.read_text()) if merge and path.exists() else {}
        self.data = {**header, **old}
        self.data.setdefault("parts", {})
        self.part: str | None = None  # the part running, which the rows added belong to
        path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    def start(self, part: str) -> None:
        """Rows added from now on belong to ``part``; its rows of an earlier run are dropped."""
        self.part = part
        for key, rows in self.data.items():
            if isinstance(rows, list):
                self.data[key] = [row for row in rows if row.get("part") != part]

    def add(self, section: str, row: dict) -> dict:
        """Append ``row`` to the section's list; fill it in afterwards and save again."""
        row["part"] = self.part
        self.data.setdefault(section, []).append(row)
        self.save()
        return row

    def save(self) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.data, indent=1))
        os.replace(partial, self.path)


@dataclass
class Run:
    """What every part uses: the device, the sizes, the results."""

    device: torch.device
    sizes: Sizes
    results: Results
    model: costs.Device  # the constants fastclip.costs predicts with

    @property
    def dtype(self) -> torch.dtype:
        """bf16 on a GPU; fp16 under Triton's interpreter, whose bf16 products are wrong."""
        return torch.bfloat16 if self.device.type == "cuda" else torch.float16

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def block_bytes(self) -> int:
        return self.sizes.block_bytes or default_block_bytes(self.device)

    def loss(self, op: str) -> Loss:
        """LOSSES[op] at the sizes' feature width."""
        width = self.sizes.width
        return LOSSES[op] if width is None else dataclasses.replace(LOSSES[op], D=width)

    @property
    def retrieval_d(self) -> int:
        return self.sizes.width or RETRIEVAL_D

    @property
    def projection(self) -> tuple[int, int]:
        width = self.sizes.width
        return PROJECTION if width is None else (width * 3 // 2, width)

    def timed(self, fn: Callable[[], object], warmup: bool = True) -> dict:
        """Median milliseconds of ``fn()`` with p20 and p80: a probe run, then as many more as
        fill about 0.4 s (2 to 9; 1 with tiny sizes), back to back."""
        if warmup and self.sizes.max_runs > 1:
            fn()
        probe = Marks(self.device)
        probe.mark()
        fn()
        probe.mark()
        first = probe.intervals()[0]
        marks = Marks(self.device)
        marks.mark()
        for _ in range(max(1, min(self.sizes.max_runs, int(400 / max(first, 1e-3))))):
            fn()
            marks.mark()
        times = [first, *marks.intervals()]
        p20, _, _, p80 = statistics.quantiles(times, n=5, method="inclusive")
        return {"ms": statistics.median(times), "p20": p20, "p80": p80, "runs": len(times)}

    def peak_mib(self, fn: Callable[[], object], warmup: bool = True) -> float | None:
        """Peak memory ``fn()`` allocates on top of what is allocated, after a warm-up run that
        compiles and initializes libraries (CUDA; None elsewhere, without running ``fn``)."""
        if self.device.type != "cuda":
            return None
        if warmup:
            fn()
        return peak_memory_bytes(fn, self.device) / MIB


def device_facts(device: torch.device, sizes: Sizes, model: costs.Device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16  # as Run.dtype
    facts = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "gpu": None,
        "cpu": platform.processor() or platform.machine(),
        "interpreter": interpreting(),
        "tiny": sizes != FULL,
        # cuBLAS writes fp32 from bf16 operands directly
        "out_dtype_gemm": out_dtype_products(device.type),
        "autotune": False,
        "block_bytes": sizes.block_bytes or default_block_bytes(device),
        "model_device": model.name,  # the constants fastclip.costs' predictions use
    }
    try:  # a fact, not a reason to lose the run
        facts["configs"] = launched_configs(torch.empty(0, dtype=dtype, device=device))
    except Exception as error:  # noqa: BLE001
        facts["configs"] = {"error": f"{type(error).__name__}: {error}"[:300]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=props.total_memory / GIB,
            l2_mib=getattr(props, "L2_cache_size", 0) / MIB or None,
        )
        driver = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
        facts.update(
            {
                k: driver.get(k)
                for k in ("sm_clock_rate", "mem_clock_rate", "mem_bus_width", "max_shared_mem")
            }
        )
    return facts


# ----------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------


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


def part_bandwidth(run: Run) -> None:
    device, sizes = run.device, run.sizes
    chunk = min(64 * 2**10, sizes.l2_bytes // 16)  # fp32 elements per program
    l2_bytes, sms = sizes.l2_bytes, 4
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        sms = props.multi_processor_count
        l2 = getattr(props, "L2_cache_size", 0)
        if l2:  # source and destination of the copy together within two thirds of the L2
            l2_bytes = min(l2_bytes, max(4 * chunk, l2 // 3 // (4 * chunk) * 4 * chunk))
    # Programs per buffer: one per chunk streams it from HBM once; more re-read it from L2.
    stream_case(run, "HBM", sizes.hbm_bytes, sizes.hbm_bytes // (4 * chunk), chunk)
    stream_case(run, "L2", l2_bytes, 32 * sms, chunk)


def stream_case(run: Run, where: str, nbytes: int, programs: int, chunk: int) -> None:
    """Read and copy bandwidth of ``programs`` streaming chunks of an ``nbytes`` buffer."""
    src = torch.ones(nbytes // 4, device=run.device)
    for copy in (False, True):
        row = {"what": f"{where} {'copy' if copy else 'read'}", "buffer_mib": nbytes / MIB}
        with case(run.results.add("bandwidth", row), run.results):
            dst = torch.empty_like(src) if copy else torch.empty(programs, device=run.device)
            launch = _stream_kernel[(programs,)]
            stream = functools.partial(
                launch, src, dst, chunk, nbytes // (4 * chunk), COPY=copy, BLOCK=2048, num_warps=8
            )
            moved = programs * chunk * 4 * (2 if copy else 1)
            row.update(run.timed(stream), bytes=moved)
            row["gb_s"] = moved / row["ms"] / 1e6
    if where == "HBM":
        row = {"what": "HBM copy (torch)", "buffer_mib": nbytes / MIB}
        with case(run.results.add("bandwidth", row), run.results):
            dst = torch.empty_like(src)
            row.update(run.timed(functools.partial(dst.copy_, src)), bytes=2 * nbytes)
            row["gb_s"] = 2 * nbytes / row["ms"] / 1e6


def block_plans(run: Run) -> dict[tuple[int, int, int], list[str]]:
    """The (R, C, D) block shapes each loss case walks, with the cases that walk them (and how
    many blocks make one pass), and the 8192 x 8192 blocks of the design notes."""
    shapes: dict[tuple[int, int, int], list[str]] = {}
    for op in LOSSES:
        loss = run.loss(op)
        batches = run.sizes.batches + ((run.sizes.large,) if op == "contrastive" else ())
        for n in batches:
            for impl, element in (("blocks", 2), ("blocks-mm", 6)):
                R, C = plan_blocks(n, n, element, run.block_bytes)
                count = -(-n // R) * -(-n // C)
                shapes.setdefault((R, C, loss.D), []).append(f"{op} N={n} {impl} ({count})")
        side = min(8192, max(run.sizes.batches))
        shapes.setdefault((side, side, loss.D), []).append("square blocks")
    return shapes


def part_cublas(run: Run) -> None:
    for (R, C, D), uses in sorted(block_plans(run).items()):
        cublas_shape(run, R, C, D, uses)
        settle(run.device)


def cublas_shape(run: Run, R: int, C: int, D: int, uses: list[str]) -> None:
    """The four products of one block shape, as the bounded-block backward calls them."""
    device = run.device
    x, y = features(R, D, device, 1).to(run.dtype), features(C, D, device, 2).to(run.dtype)
    g = (torch.randn(R, C, device=device) / C).to(run.dtype)
    acc_r, acc_c = torch.zeros(R, D, device=device), torch.zeros(C, D, device=device)
    dots = torch.empty(R, C, device=device)
    products = {
        "S fp32": lambda: matmul_f32(x, y.T, out=dots),
        "S bf16": lambda: torch.mm(x, y.T),
        "G Y": lambda: accumulate_mm(acc_r, g, y),
        "G^T X": lambda: accumulate_mm(acc_c, g.T, x),
    }
    for name, fn in products.items():
        row = run.results.add("cublas", {"R": R, "C": C, "D": D, "product": name, "uses": uses})
        with case(row, run.results):
            row.update(run.timed(fn))
            row["tflops"] = 2 * R * C * D / row["ms"] / 1e9


# The bounded-block G kernels' autotune lists, which block-configs times config by config.
BLOCK_CONFIGS = {"contrastive": kc._BLOCK_CONFIGS, "siglip": ks._BLOCK_CONFIGS}


def part_block_configs(run: Run) -> None:
    """One G pass (the backward with neither gradient wanted) per config of the G kernel's
    autotune list, the first (what runs without autotuning) first."""
    device, n = run.device, run.sizes.block_configs_n
    for op in LOSSES:
        loss = run.loss(op)
        args = [t.detach() for t in stage_inputs(run, op, n)]
        for config in map(fixed_config, BLOCK_CONFIGS[op]):
            row = {"op": op, "N": n, "D": loss.D, "config": config_name(config)}
            with case(run.results.add("block_configs", row), run.results):
                g_only = stage_functions(run, op, "blocks", *args, config=config)["G-only"]
                row.update(run.timed(g_only))
                row["tflops"] = 2 * n * n * loss.D / row["ms"] / 1e9
        settle(device)


def part_tma(run: Run) -> None:
    """The kernels that compute dots (InfoNCE's forward, both G kernels) with their operands
    through tensor descriptors (FASTCLIP_TMA=1) and through pointer loads, one G pass each."""
    n = run.sizes.block_configs_n
    for op in LOSSES:
        loss = run.loss(op)
        args = [t.detach() for t in stage_inputs(run, op, n)]
        stages = stage_functions(run, op, "blocks", *args)
        timed = {"G-only": stages["G-only"]}
        if op == "contrastive":
            timed["forward"] = lambda a=args: kc.contrastive_forward(a[0], a[1], a[2], 0, True)
        for stage, fn in timed.items():
            for tma in ("0", "1"):
                row = {"op": op, "N": n, "D": loss.D, "stage": stage, "tma": tma == "1"}
                with (
                    case(run.results.add("tma", row), run.results),
                    mock.patch.dict(os.environ, {"FASTCLIP_TMA": tma}),
                ):
                    row.update(run.timed(fn))
                    row["tflops"] = 2 * n * n * loss.D / row["ms"] / 1e9
        settle(run.device)


def stage_inputs(run: Run, op: str, n: int) -> list[torch.Tensor]:
    loss = run.loss(op)
    x, y = (features(n, loss.D, run.device, seed) for seed in (n, n + 1))
    return leaves(loss, x, y, loss.scale, loss.bias, run.dtype)


def stage_functions(
    run: Run, op: str, impl: str, x, y, scale, bias=None, config: TileConfig | None = None
) -> dict[str, Callable]:
    """One implementation's stages as separate calls, without autograd: "gradients" (InfoNCE's
    backward; SigLIP's whole step, whose gradients come with its loss), "forward" (InfoNCE),
    "G-only" (the blocked implementations' G kernels with neither product) and "S" (blocks-mm's
    dots by cuBLAS, as ``sweep_blocks`` asks for them). ``config``: the tiles of the kernels
    that compute the gradients (None: the first of their autotune lists)."""
    n = x.shape[0]
    ops = backends.IMPLEMENTATIONS[op][impl].ops(run.sizes.block_bytes)
    tiles = {} if config is None else {"config": config}
    if op == "contrastive":
        stats = ops.contrastive_forward(x, y, scale, 0, True)
        w = torch.ones(n, device=x.device)
        weight = torch.tensor(0.5 / n, device=x.device)
        backward = functools.partial(ops.contrastive_backward, **tiles)
        step = functools.partial(backward, x, y, scale, stats, w, w, weight, 0)
        fns = {"forward": functools.partial(ops.contrastive_forward, x, y, scale, 0, True)}
    else:
        step = functools.partial(ops.siglip_forward, x, y, scale, bias, 0)
        step = functools.partial(step, need_dparams=True, **tiles)
        fns = {}
    fns["gradients"] = functools.partial(step, True, True)
    if impl != "fused":
        fns["G-only"] = functools.partial(step, False, False)
    if impl == "blocks-mm":
        R, C = plan_blocks(n, n, x.element_size() + 4, run.block_bytes)
        dots = torch.empty(R * C, device=x.device)

        def dots_by_gemm():
            for r0 in range(0, n, R):
                for c0 in range(0, n, C):
                    a, b = x[r0 : r0 + R], y[c0 : c0 + C]
                    matmul_f32(a, b.T, out=dots[: a.shape[0] * b.shape[0]].view(a.shape[0], -1))

        fns["S"] = dots_by_gemm
    return fns


def measure_stages(run: Run, op: str, impl: str, args: list[torch.Tensor]) -> dict[str, float]:
    """Milliseconds per stage, named as ``fastclip.costs`` names them (module docstring)."""
    fns = stage_functions(run, op, impl, *[t.detach() for t in args])
    ms = {name: run.timed(fn)["ms"] for name, fn in fns.items()}
    stages = {"forward": ms["forward"]} if "forward" in ms else {}
    if impl == "fused":
        stages["backward" if stages else "forward"] = ms["gradients"]
        return stages
    if "S" in ms:
        stages["S"] = ms["S"]
    stages["G"] = ms["G-only"] - ms.get("S", 0.0)
    stages["products"] = ms["gradients"] - ms["G-only"]
    return stages


def part_losses(run: Run, op: str) -> None:
    for n in run.sizes.batches:
        loss_batch(run, op, n)
        settle(run.device)


def loss_batch(run: Run, op: str, n: int) -> None:
    """One batch size of a loss: the evaluation forward, then each implementation and eager."""
    loss, device, block_bytes = run.loss(op), run.device, run.sizes.block_bytes
    args = stage_inputs(run, op, n)
    # The reference: the fp32 PyTorch path on the same (bf16-rounded) features.
    exact = leaves(loss, args[0].float(), args[1].float(), loss.scale, loss.bias, torch.float32)
    _, expected = gradients(functools.partial(loss.public, backend="torch"), exact)
    floor = rounding_floor(expected, run.dtype)
    common = {"op": op, "dtype": run.dtype_name, "D": loss.D, "N": n}
    pass_flops = 2 * n * n * loss.D

    for provider in ("fastclip", "eager"):  # the loss alone: 1 pass, no gradients
        row = run.results.add("forward", {**common, "provider": provider})
        with case(row, run.results), torch.no_grad():
            fn = functools.partial(loss.public, backend="blocks", block_bytes=block_bytes)
            fn = loss.reference if provider == "eager" else fn
            row.update(run.timed(functools.partial(fn, *args)))
            row["tflops"] = pass_flops / row["ms"] / 1e9
            if provider == "fastclip":
                cost = costs.loss_cost(
                    op, "blocks", n, loss.D, 2, False, run.model, block_bytes=block_bytes
                )
                row["predicted_ms"] = cost.seconds * 1e3
        settle(device)

    eager_errors = None
    for impl in ("eager", *IMPLEMENTATIONS):  # eager first: its error is the yardstick
        row = {**common, "impl": impl, "passes": passes(op, impl), "floor_passes": FLOOR[op]}
        row = run.results.add("losses", {**row, "floor": floor})
        with case(row, run.results):
            fn = loss.reference
            if impl != "eager":
                fn = functools.partial(loss.public, backend=impl, block_bytes=block_bytes)
                cost = costs.loss_cost(
                    op, impl, n, loss.D, 2, device=run.model, block_bytes=block_bytes
                )
                element = 6 if impl == "blocks-mm" else 2  # G, and the fp32 dots of blocks-mm
                row.update(
                    plan=None if impl == "fused" else plan_blocks(n, n, element, run.block_bytes),
                    bound_mib=(n * loss.D * 8 + run.block_bytes) / MIB,
                    predicted_ms=cost.seconds * 1e3,
                    predicted_stages_ms={k: v * 1e3 for k, v in cost.stages.items()},
                )
            step = functools.partial(gradients, fn, args)
            row["err"] = errors(step()[1], expected)  # the first run compiles
            if impl == "eager":
                eager_errors = row["err"]
            row["ok"] = within_tolerance(row["err"], floor, eager_errors)
            run.results.save()
            row["peak_mib"] = run.peak_mib(step, warmup=False)
            row.update(run.timed(step, warmup=False))
            row["tflops"] = passes(op, impl) * pass_flops / row["ms"] / 1e9
            row["tflops_floor"] = FLOOR[op] * pass_flops / row["ms"] / 1e9
            run.results.save()
            if impl != "eager":
                row["stages_ms"] = measure_stages(run, op, impl, args)
        settle(device)


def confident_batch(n: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image features and their texts, the image plus 5% noise: at a trained logit scale
    every row is confident (p_ii close to 1), and the gradient lives in 1 - p_ii."""
    x = features(n, dim, device, 7)
    noise = torch.randn(
        n, dim, generator=torch.Generator(device=device).manual_seed(8), device=device
    )
    return x, F.normalize(x + 0.05 * noise, dim=-1)


def part_confident(run: Run) -> None:
    for op in LOSSES:
        confident_loss(run, op)
        settle(run.device)


def confident_loss(run: Run, op: str) -> None:
    loss, n = run.loss(op), run.sizes.confident
    x, y = (t.to(run.dtype) for t in confident_batch(n, loss.D, run.device))
    params = (CONFIDENT_SCALE, CONFIDENT_BIAS)
    # The float64 reference on the features as rounded to bf16: exact on the same inputs.
    exact = clip_loss_exact if op == "contrastive" else siglip_loss_reference
    ref_loss, expected = gradients(
        exact, leaves(loss, x.double(), y.double(), *params, torch.float64)
    )
    floor = rounding_floor(expected, run.dtype)
    common = {"op": op, "dtype": run.dtype_name, "D": loss.D, "N": n, "scale": CONFIDENT_SCALE}
    common.update(bias=CONFIDENT_BIAS if loss.bias is not None else None, floor=floor)
    if op == "contrastive":  # how confident: the median row's 1 - p_ii = sigmoid(m_i)
        logits = CONFIDENT_SCALE * x.double() @ y.double().T
        others = logits - logits.diagonal()[:, None]
        others.diagonal().fill_(float("-inf"))
        common["median_gap"] = torch.sigmoid(others.logsumexp(dim=1)).median().item()
    eager_errors = None
    for impl in ("eager", *IMPLEMENTATIONS):
        row = run.results.add("confident", {**common, "impl": impl})
        with case(row, run.results):
            fn = functools.partial(loss.public, backend=impl) if impl != "eager" else loss.reference
            value, grads = gradients(fn, leaves(loss, x, y, *params, run.dtype))
            row["loss_err"] = relative(value, ref_loss)
            row["err"] = errors(grads, expected)
            if impl == "eager":
                eager_errors = row["err"]
            row["ok"] = within_tolerance(row["err"], floor, eager_errors)


def measure_provider(run: Run, row: dict, fn: Callable, flops: float) -> None:
    """Fill ``row`` with ``fn``'s peak memory, time and TFLOP/s."""
    with case(row, run.results):
        row["peak_mib"] = run.peak_mib(fn)
        row.update(run.timed(fn, warmup=False))  # warmed up by peak_mib on a GPU
        row["tflops"] = flops / row["ms"] / 1e9
    settle(run.device)


def part_retrieval(run: Run) -> None:
    similarity_case(run, run.sizes.similarity, run.retrieval_d)
    settle(run.device)
    topk_case(run, run.sizes.topk, run.retrieval_d)


def similarity_case(run: Run, n: int, dim: int) -> None:
    a, b = (features(n, dim, run.device, seed).to(run.dtype) for seed in (0, 1))
    providers = {
        "fastclip": lambda: similarity(a, b, 14.3, 0.5, backend="triton"),
        "cublas": lambda: torch.matmul(a, b.T),
        "eager": lambda: similarity_reference(a, b, 14.3, 0.5),
    }
    for provider, fn in providers.items():
        row = {"op": "similarity", "provider": provider, "mode": "forward", "N": n, "D": dim}
        measure_provider(run, run.results.add("retrieval", row), fn, 2 * n * n * dim)


def topk_case(run: Run, n: int, dim: int) -> None:
    q, keys = (features(n, dim, run.device, seed).to(run.dtype) for seed in (2, 3))
    providers = {
        "fastclip": lambda: topk_similarity(q, keys, TOPK, backend="triton"),
        "eager": lambda: torch.topk(q @ keys.T, TOPK, dim=1),
    }
    for provider, fn in providers.items():
        row = {"op": "topk", "provider": provider, "mode": f"k={TOPK}", "N": n, "D": dim}
        measure_provider(run, run.results.add("retrieval", row), fn, 2 * n * n * dim)


def projection_step(fn: Callable, inputs: list[torch.Tensor], grad: torch.Tensor | None):
    """The projection's forward, and its backward for a given dL/dy unless ``grad`` is None."""
    y = fn(*inputs)
    return y if grad is None else torch.autograd.grad(y, inputs, grad)


def projection_case(run: Run, providers: dict[str, Callable]) -> None:
    device, n = run.device, run.sizes.projection
    n_in, n_out = run.projection
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, n_in, generator=gen, device=device).to(run.dtype)
    weight = (torch.randn(n_out, n_in, generator=gen, device=device) / n_in**0.5).to(run.dtype)
    bias = (0.1 * torch.randn(n_out, generator=gen, device=device)).to(run.dtype)
    grad = torch.randn(n, n_out, generator=gen, device=device).to(run.dtype)
    inputs = [t.requires_grad_() for t in (x, weight, bias)]
    for provider, fn in providers.items():
        if provider == "compile":  # the first call compiles forward and backward
            start = time.perf_counter()
            torch.autograd.grad(fn(*inputs), inputs, grad)
            compile_s = time.perf_counter() - start
        for mode, passes in (("forward", 1), ("forward+backward", 3)):
            step = functools.partial(projection_step, fn, inputs, grad if passes > 1 else None)
            row = {"op": "projection", "provider": provider, "mode": mode, "N": n}
            row = run.results.add("projection", {**row, "D": f"{n_in}→{n_out}"})
            if provider == "compile":
                row["compile_s"] = compile_s
            measure_provider(run, row, step, passes * 2 * n * n_in * n_out)


def part_projection(run: Run) -> None:
    fastclip = functools.partial(normalized_linear, backend="triton")
    projection_case(run, {"fastclip": fastclip, "eager": normalized_linear_reference})


def part_compile(run: Run) -> None:
    if run.sizes != FULL:
        run.results.data["parts"]["compile"]["note"] = "not run with --tiny"
        return
    import torch._inductor.config as inductor

    inductor.compile_threads = 1  # in this process: a part stopped at its limit leaves no workers
    projection_case(run, {"compile": torch.compile(normalized_linear_reference)})


def part_large(run: Run) -> None:
    """InfoNCE at N = 2^20: once by the implementation ``auto`` picks, then by the other
    bounded-block one while the part's time lasts."""
    picked = backends.fastest("contrastive", run.dtype, run.loss("contrastive").D, run.sizes.large)
    for impl in dict.fromkeys((picked, "blocks", "blocks-mm")):
        large_case(run, impl, auto=impl == picked)
        settle(run.device)


def large_case(run: Run, impl: str, auto: bool) -> None:
    """One forward+backward, peak memory and time from the same run; the forward timed first
    on its own, so that a run stopped in its backward keeps it."""
    device, n, loss = run.device, run.sizes.large, run.loss("contrastive")
    cost = costs.loss_cost(
        "contrastive", impl, n, loss.D, 2, device=run.model, block_bytes=run.sizes.block_bytes
    )
    row = {"op": "contrastive", "dtype": run.dtype_name, "D": loss.D, "N": n, "impl": impl}
    row.update(auto=auto, passes=passes("contrastive", impl), floor_passes=FLOOR["contrastive"])
    row.update(
        predicted_ms=cost.seconds * 1e3,
        predicted_stages_ms={k: v * 1e3 for k, v in cost.stages.items()},
        bound_mib=(n * loss.D * 8 + run.block_bytes) / MIB,
    )
    with case(run.results.add("large", row), run.results):
        args = stage_inputs(run, "contrastive", n)
        settle(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        marks = Marks(device)
        marks.mark()
        value = clip_loss(*args, backend=impl, block_bytes=run.sizes.block_bytes)
        marks.mark()
        row["forward_ms"] = marks.intervals()[0]
        run.results.save()
        torch.autograd.grad(value, args)
        marks.mark()
        row["backward_ms"] = marks.intervals()[1]
        row["ms"] = row["forward_ms"] + row["backward_ms"]
        if device.type == "cuda":
            row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / MIB
        pass_flops = 2 * n * n * loss.D
        row["tflops"] = passes("contrastive", impl) * pass_flops / row["ms"] / 1e9
        row["tflops_floor"] = FLOOR["contrastive"] * pass_flops / row["ms"] / 1e9


@dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[Run], None]
    limit_s: float


PARTS = (  # most wanted first: a run short of time skips the last ones
    Part("bandwidth", part_bandwidth, 6),
    Part("cublas", part_cublas, 10),
    Part("contrastive", functools.partial(part_losses, op="contrastive"), 28),
    Part("siglip", functools.partial(part_losses, op="siglip"), 28),
    Part("confident", part_confident, 10),
    Part("retrieval", part_retrieval, 10),
    Part("projection", part_projection, 6),
    Part("large", part_large, 25),
    Part("block-configs", part_block_configs, 15),
    Part("tma", part_tma, 10),
    Part("compile", part_compile, 22),
)
MIN_PART_S = 3  # a part with less time left than this is skipped


def run_parts(run: Run, parts: list[Part], budget_s: float) -> None:
    """Each part under min(its limit, what is left of the budget); its status, time and limit
    recorded in the JSON's "parts": "not started" for all of them first, then "running" while
    one runs, so that a process killed from outside leaves where it was."""
    deadline = time.monotonic() + budget_s
    statuses = run.results.data["parts"]
    for part in parts:
        statuses[part.name] = {"status": "not started", "limit_s": part.limit_s}
    run.results.save()
    for part in parts:
        left = deadline - time.monotonic()
        status = statuses[part.name] = {"limit_s": round(min(part.limit_s, left))}
        if left < MIN_PART_S:
            status["status"] = "skipped: the run's budget was spent"
            run.results.save()
            continue
        print(f"=== {part.name} (limit {status['limit_s']} s)", flush=True)
        start = time.monotonic()
        status["status"] = "running"
        run.results.start(part.name)
        run.results.save()
        try:
            with time_limit(min(part.limit_s, left)):
                part.run(run)
            status["status"] = "ok"
        except PartTimeout:
            status["status"] = "stopped at its limit"
        except KeyboardInterrupt:  # SIGINT: the process's own limit (timeout) or a user
            status["status"] = "interrupted"
            raise
        except Exception as error:  # noqa: BLE001 - recorded; the other parts still run
            traceback.print_exc()
            status["status"] = f"error: {type(error).__name__}: {error}"[:500]
        finally:
            with contextlib.suppress(Exception):
                settle(run.device)
            status["seconds"] = round(time.monotonic() - start, 1)
            run.results.save()
            print(f"    {status['status']} after {status['seconds']} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Parts: " + ", ".join(p.name for p in PARTS),
    )
    parser.add_argument("--out", type=Path, default=Path("quick.json"), help="the JSON written")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add to the JSON at --out if there is one, replacing the rows of the parts run",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=sum(p.limit_s for p in PARTS),
        help="seconds for all parts together (default: the sum of their limits)",
    )
    parser.add_argument(
        "--parts", help="comma-separated parts to run, in that order (default: all)"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny sizes: on a GPU, compiles the kernels the full run launches; "
        "on a CPU (with TRITON_INTERPRET=1), runs the logic through Triton's "
        "interpreter",
    )
    args = parser.parse_args(argv)
    by_name = {part.name: part for part in PARTS}
    names = args.parts.split(",") if args.parts else list(by_name)
    unknown = [name for name in names if name not in by_name]
    if unknown:
        parser.error(f"unknown parts {unknown}; the parts are {list(by_name)}")
    parts = [by_name[name] for name in names]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not (args.tiny and interpreting()):
        parser.error("needs a CUDA device; on a CPU, run TRITON_INTERPRET=1 ... --tiny")
    os.environ["FASTCLIP_AUTOTUNE"] = "0"  # each kernel's first config that fits the GPU
    # SIGINT (the limit of timeout --signal=INT) raises KeyboardInterrupt, even where the process
    # was started with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Triton's interpreter computes padding lanes too (e.g. log2(0)); their values are masked out.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    sizes = FULL if not args.tiny else TINY if device.type == "cuda" else INTERPRETED
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    model = costs.device_constants(gpu)
    results = Results(args.out, device_facts(device, sizes, model), merge=args.merge)
    run_parts(Run(device, sizes, results, model), parts, args.budget)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
