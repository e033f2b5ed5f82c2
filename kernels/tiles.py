"""Building blocks shared by fastclip's pairwise kernels: similarity tiles, the numerics of the
losses' epilogues, the fused backward's row sweep, launch configuration.

The pairwise losses (InfoNCE in ``contrastive.py``, SigLIP in ``siglip.py``) score every row of
``a`` (n_a, D) against every row of ``b`` (n_b, D) tile by tile. Their gradients have the shape
dL/da = s G b, with G = dL/dS formed per tile in fp32 with the positive pairs' -d_ij already
folded in. The fused backward accumulates G b in a private fp32 workspace per program
(``sweep_rows``); ``finalize_kernel`` sums the programs' partials, scales, casts and emits the row
terms of dL/ds. The bounded-block backward (``blocks.py``) instead writes G to a buffer and lets
cuBLAS form the products.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime import driver

from .blocks import blocked_gradients, default_block_bytes, matmul_f32, plan_blocks

LOG2E = tl.constexpr(math.log2(math.e))  # exp(x) = exp2(x * LOG2E)
LN2_C = tl.constexpr(math.log(2.0))
LN2 = math.log(2.0)
# A finite "minus infinity" for running maxima: max(-inf, -inf) - -inf would be NaN, and a row
# whose every logit is masked (a lone pair) must come out as an empty sum, 2^NEG = 0.
NEG = tl.constexpr(-1e30)
# fp16 G buffers hold G times this: G's entries are at most 2 in magnitude (InfoNCE's two
# softmaxes, SigLIP's 1), so 2^14 G stays below fp16's largest number (65504), while a confident
# row's entries (1e-8 and less) become normal numbers rather than subnormals or zeros. The
# products divide it out in fp32, exactly (a power of two). bf16 has fp32's range: factor 1.
FP16_G_SCALE = 2.0**14


def g_storage_scale(dtype: torch.dtype) -> float:
    """The factor a G buffer (or tile) of ``dtype`` holds G times (``FP16_G_SCALE``)."""
    return FP16_G_SCALE if dtype == torch.float16 else 1.0


# A gradient's fp32 accumulator never exceeds this; larger problems run in row slices.
WORKSPACE_BYTES = 256 * 2**20
# Smallest block in any config: the work splits are sized with it.
MIN_BLOCK = 64
# Smallest tile of a bounded-block kernel's configs (the interpreter's): sizes its sums.
BLOCKS_MIN = 16
# Row-wise kernels (positive dots, finalize): rows per program.
ROWS = 32
# Per-SM resources of a Hopper GPU (H100, H200) that the autotune configs are sized against.
SM_REGISTERS = 65536  # 32-bit registers
SM_SHARED_MEMORY = 232448  # bytes a CTA can use: 227 KiB


@dataclass(frozen=True)
class TileConfig:
    """Fixed launch parameters: given by tests and benchmarks, the interpreter's, or an autotune
    config fixed (``fixed_config``, as FASTCLIP_AUTOTUNE=0 launches them).

    The names mean the same in every kernel: ``block_m`` rows of the owned operand per tile,
    ``block_n`` rows of the other operand (columns of S) per tile, ``block_k`` the feature chunk
    of the similarity product, ``block_d`` the feature chunk of a gradient product and its
    accumulator. Every block is >= 16, the smallest shape ``tl.dot`` compiles. ``row_split`` and
    ``col_split`` set how many programs share the rows and the columns; None sizes them to the
    device. ``maxnreg`` caps registers per thread (ptxas), as a ``SizedConfig`` for several CTAs
    per SM does.
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    block_d: int = 64
    num_warps: int = 4
    num_stages: int = 2
    row_split: int | None = None
    col_split: int | None = None
    maxnreg: int | None = None


INTERPRETER_CONFIG = TileConfig(block_m=16, block_n=16, block_k=16, block_d=16, num_stages=1)
# Kernel meta-parameter names of the TileConfig fields.
BLOCKS = {"BM": "block_m", "BN": "block_n", "BK": "block_k", "BD": "block_d"}


# ----------------------------------------------------------------------------------------------
# Triton building blocks
# ----------------------------------------------------------------------------------------------


@triton.jit
def similarity_tile(a_rows, b_rows, a_ok, b_ok, D, stride_ad, stride_bd, BK: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):  # fmt: skip
    """<a_i, b_j> for a tile in fp32, from row pointers a_rows (BM,) and b_rows (BN,).

    Each step loads from the fixed pointer tiles plus k0 rather than from pointer tiles carried
    and advanced through the loop: the software pipeline then holds one set of addresses."""
    ks = tl.arange(0, BK)
    a_ptrs = a_rows[:, None] + ks[None, :] * stride_ad
    b_ptrs = b_rows[:, None] + ks[None, :] * stride_bd
    acc = tl.zeros((a_rows.shape[0], b_rows.shape[0]), dtype=tl.float32)
    for k0 in range(0, D, BK):
        a = tl.load(a_ptrs + k0 * stride_ad, mask=a_ok[:, None] & (ks[None, :] < D - k0), other=0.0)
        b = tl.load(b_ptrs + k0 * stride_bd, mask=b_ok[:, None] & (ks[None, :] < D - k0), other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def operand(ptr, n, D, stride, BR: tl.constexpr, BK: tl.constexpr, TMA: tl.constexpr):
    """How a kernel reads an operand's (n, D) rows: with TMA a tensor descriptor of (BR, BK)
    boxes (the copy engine fetches them, rows and features past the ends read as 0), else the
    base pointer itself."""
    if TMA:  # one return: the compiler types every return of a function alike
        rows = tl.make_tensor_descriptor(ptr, shape=[n, D], strides=[stride, 1],
                                         block_shape=[BR, BK])  # fmt: skip
    else:
        rows = ptr
    return rows


@triton.jit
def tile_dots(a, b, row0, col0, D, stride_a, stride_ad, stride_b, stride_bd, row_ok, col_ok,
              BK: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """<a_i, b_j> (fp32) for the tile of rows row0 + arange(BM) of a (``row_ok`` their mask)
    and rows col0 + arange(BN) of b, the operands as ``operand`` returned them: through their
    descriptors with TMA, else ``similarity_tile``."""
    if TMA:  # one return (see ``operand``); the other branch is not even compiled
        acc = tl.zeros((row_ok.shape[0], col_ok.shape[0]), dtype=tl.float32)
        for k0 in range(0, D, BK):
            a_tile = a.load([row0, k0])
            b_tile = b.load([col0, k0])
            acc = tl.dot(a_tile, tl.trans(b_tile), acc, input_precision=DOT_PRECISION)
    else:
        a_rows = a + (row0 + tl.arange(0, row_ok.shape[0])).to(tl.int64) * stride_a
        b_rows = b + (col0 + tl.arange(0, col_ok.shape[0])).to(tl.int64) * stride_b
        acc = similarity_tile(a_rows, b_rows, row_ok, col_ok, D, stride_ad, stride_bd, BK,
                              DOT_PRECISION)  # fmt: skip
    return acc


@triton.jit
def pairs_of(rows, cols, offset):
    """(BM, BN) mask of the positive pairs among rows (BM,) and columns (BN,), int32 indices:
    row i's partner is column i + offset. Indices that change from tile to tile keep the
    compiler from holding a tile-sized constant in registers across the loops."""
    return cols[None, :] == (rows + offset)[:, None]


@triton.jit
def tile_offsets(BM: tl.constexpr, BN: tl.constexpr, stride):
    """(BM, BN) int32 offsets of a row-major tile with row stride ``stride``, to add to the
    tile's 64-bit base pointer: 32-bit arithmetic per element rather than 64-bit."""
    return tl.arange(0, BM)[:, None] * stride + tl.arange(0, BN)[None, :]


@triton.jit
def block_tile(a_ptr, b_ptr, dots_ptr, n_a, n_b, D, stride_a, stride_ad, stride_b, stride_bd,
               stride_dots, DOTS_GIVEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               TMA: tl.constexpr):  # fmt: skip
    """The tile of a G block that program (m, n) owns: its rows and columns (int32), the mask
    of its valid entries, and its dots <a_i, b_j> in fp32, computed (1 matmul pass over the
    grid) or, with DOTS_GIVEN, read from a GEMM's fp32 output (row stride ``stride_dots``)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < n_a
    col_ok = cols < n_b
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if DOTS_GIVEN:
        dots_tile = dots_ptr + (pid_m * BM).to(tl.int64) * stride_dots + pid_n * BN
        dots = tl.load(dots_tile + tile_offsets(BM, BN, stride_dots), mask=tile_ok, other=0.0)
    else:
        a = operand(a_ptr, n_a, D, stride_a, BM, BK, TMA)
        b = operand(b_ptr, n_b, D, stride_b, BN, BK, TMA)
        dots = tile_dots(a, b, pid_m * BM, pid_n * BN, D, stride_a, stride_ad, stride_b,
                         stride_bd, row_ok, col_ok, BK, DOT_PRECISION, TMA)  # fmt: skip
    return rows, cols, tile_ok, dots


@triton.jit
def store_tile(out_ptr, values, stride, tile_ok, BM: tl.constexpr, BN: tl.constexpr):
    """Store program (m, n)'s (BM, BN) tile of ``values`` in out's dtype (row stride
    ``stride``)."""
    base = out_ptr + (tl.program_id(0) * BM).to(tl.int64) * stride + tl.program_id(1) * BN
    tl.store(base + tile_offsets(BM, BN, stride), values.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def log1p_unit(e):
    """log(1 + e) for e in [0, 1] to a few ulps, without log1p (the interpreter lacks libdevice,
    and a fast log2(1 + e) loses e's low bits when e is small): 2 atanh(t) with t = e / (2 + e)
    <= 1/3, a series in t^2 <= 1/9 whose 8 terms reach fp32 precision."""
    t = e / (2.0 + e)
    w = t * t
    p = 1.0 / 15.0
    p = p * w + 1.0 / 13.0
    p = p * w + 1.0 / 11.0
    p = p * w + 1.0 / 9.0
    p = p * w + 1.0 / 7.0
    p = p * w + 1.0 / 5.0
    p = p * w + 1.0 / 3.0
    p = p * w + 1.0
    return 2.0 * t * p


@triton.jit
def sigmoid_base2(z2, e):
    """sigmoid(z) of z = z2 / log2(e), given e = exp(-|z|) = 2^-|z2|: (1 or e) / (1 + e), full
    relative precision in either tail."""
    return tl.where(z2 >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def softplus_base2(z2, e):
    """softplus(z) of z = z2 / log2(e), given e = exp(-|z|) = 2^-|z2|: max(z, 0) + log1p(e),
    full relative precision in either tail (softplus(-15) = 3.06e-7, not 0 or a negative).
    Shares e with ``sigmoid_base2``: one exponential for both."""
    return tl.maximum(z2, 0.0) * LN2_C + log1p_unit(e)


@triton.jit
def column_chunk(n_cols, BN: tl.constexpr):
    """[start, end): the column blocks of this program's chunk (chunks along grid axis 1)."""
    n_blocks = tl.cdiv(n_cols, BN)
    per_chunk = tl.cdiv(n_blocks, tl.num_programs(1))
    start = tl.program_id(1) * per_chunk
    return start, tl.minimum(start + per_chunk, n_blocks)


@triton.jit
def accumulate_tile(g, b_ptr, cb, col_ok, acc_blk, row_ok, D, stride_b, stride_bd, fresh,
                    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):  # fmt: skip
    """acc (BM, D) += g (BM, BN) @ b's rows of column block cb (BN, D), BD features at a time.

    acc_blk points at the block's first row in an fp32 workspace of row stride D (a scalar 64-bit
    base plus int32 row and column offsets, not a 64-bit pointer per row or element, keeps the
    addresses held across the column loop few); ``fresh`` overwrites instead.
    """
    g = g.to(b_ptr.dtype.element_ty)
    b_blk = b_ptr + tl.cast(cb, tl.int64) * BN * stride_b
    b_offs = tl.arange(0, BN)[:, None] * stride_b + tl.arange(0, BD)[None, :] * stride_bd
    acc_rows = tl.arange(0, BM) * D
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        d_ok = ds < D
        b = tl.load(b_blk + d0 * stride_bd + b_offs, mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)  # fmt: skip
        acc_ptrs = acc_blk + (acc_rows[:, None] + ds[None, :])
        acc_ok = row_ok[:, None] & d_ok[None, :]
        if fresh:
            acc = tl.zeros((BM, BD), tl.float32)
        else:
            acc = tl.load(acc_ptrs, mask=acc_ok, other=0.0)
        acc = tl.dot(g, b, acc, input_precision=DOT_PRECISION)
        tl.store(acc_ptrs, acc, mask=acc_ok)
    # Other threads re-read these accumulators on the next tile: make the stores visible.
    tl.debug_barrier()


@triton.jit
def clear_rows(acc_blk, row_ok, D, BM: tl.constexpr, BD: tl.constexpr):
    """Zero a block's workspace rows: a program whose column chunk is empty still owes its
    partial to ``finalize_kernel``, which sums every chunk's (stale data otherwise, e.g. from
    a previous row slice or an autotuning trial)."""
    acc_rows = tl.arange(0, BM) * D
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        ok = row_ok[:, None] & (ds < D)[None, :]
        tl.store(acc_blk + (acc_rows[:, None] + ds[None, :]), tl.zeros((BM, BD), tl.float32),
                 mask=ok)  # fmt: skip


@triton.jit
def finalize_kernel(
    # pointers
    acc_ptr,  # (col_split, n_a, D) fp32 partials of G b
    scale_ptr,  # the gradient's scale
    grad_ptr,  # (n_a, D) contiguous gradient, written
    # sizes
    n_a,
    D,
    col_split,
    # meta-parameters
    BM: tl.constexpr,
    BD: tl.constexpr,
):
    """The gradient s (G b)_i, (G b)_i the sum of the column chunks' partials, cast to the
    gradient's dtype. O(n_a D) work, no N^2 D pass."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < n_a
    scale = tl.load(scale_ptr).to(tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        ok = row_ok[:, None] & (ds[None, :] < D)
        acc = tl.zeros((BM, BD), tl.float32)
        for c in range(0, col_split):
            partial = acc_ptr + (c * n_a + rows[:, None]) * D + ds[None, :]  # c * n_a < 2**31
            acc += tl.load(partial, mask=ok, other=0.0)
        grad = (acc * scale).to(grad_ptr.dtype.element_ty)
        tl.store(grad_ptr + rows[:, None] * D + ds[None, :], grad, mask=ok)


@triton.jit
def store_parts(parts_ptr, sums, k, rows, row_ok, n_a):
    """Store a program's per-row partial sum number k, (BM,), in the (n_parts, col_split, n_a)
    buffer of ``sweep_rows``."""
    chunk = tl.program_id(1).to(tl.int64)
    tl.store(parts_ptr + (k * tl.num_programs(1) + chunk) * n_a + rows, sums, mask=row_ok)


@triton.jit
def row_dot_kernel(
    x_ptr, y_ptr, out_ptr, n, D, stride_x, stride_xd, stride_y, stride_yd,
    BM: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """out_i = <x_i, y_i> in fp32, for the positive pairs' dots (y already offset by the
    caller). O(n D) work, no N^2 D pass."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < n
    dot = tl.zeros((BM,), tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        ok = row_ok[:, None] & (ds[None, :] < D)
        x = tl.load(x_ptr + rows[:, None] * stride_x + ds[None, :] * stride_xd, mask=ok, other=0.0)
        y = tl.load(y_ptr + rows[:, None] * stride_y + ds[None, :] * stride_yd, mask=ok, other=0.0)
        dot += tl.sum(x.to(tl.float32) * y.to(tl.float32), axis=1)
    tl.store(out_ptr + rows, dot, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def register_budget(num_warps: int, ctas: int) -> int:
    """Registers per thread that let ``ctas`` CTAs of ``num_warps`` warps share one SM (at most
    255, the most a thread can address)."""
    return min(255, SM_REGISTERS // (32 * num_warps * ctas))


class SizedConfig(triton.Config):
    """An autotune config sized for ``ctas`` CTAs per SM: its registers per thread
    (``register_budget``) and shared memory (``SM_SHARED_MEMORY / ctas``) leave room for that
    many CTAs at once, so that one CTA's epilogue overlaps another's main loop. The Hopper
    compile test checks both. Where several CTAs need fewer than 255 registers per thread, the
    budget is also ptxas's limit (maxnreg), so that the compiler keeps to it."""

    def __init__(self, kwargs: dict, num_warps: int, num_stages: int, ctas: int = 1):
        budget = register_budget(num_warps, ctas)
        maxnreg = budget if ctas > 1 and budget < 255 else None
        super().__init__(kwargs, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)
        self.ctas = ctas


def configs(blocks: tuple[str, ...], rows: list[tuple]) -> list[triton.Config]:
    """Autotune configs from rows of (*block sizes named by ``blocks``, num_warps, num_stages,
    ctas): ctas, the CTAs per SM the config is sized for (``SizedConfig``; 1 when omitted)."""
    n = len(blocks)
    return [SizedConfig(dict(zip(blocks, row[:n], strict=True)), *row[n:]) for row in rows]


def fitting_configs(configs: list, element_size: int, shared_memory: int) -> list:
    """The configs whose pipelined operand tiles fit within 3/4 of ``shared_memory`` bytes, for
    operands of ``element_size`` bytes; the smallest config if none does (a fallback for GPUs
    with little shared memory)."""
    kept = []
    for c in configs:
        kw = c.kwargs
        operands = (kw["BM"] + kw["BN"]) * kw["BK"] * c.num_stages + kw.get("BD", 0) * kw["BN"]
        if operands * element_size <= 0.75 * shared_memory:
            kept.append(c)
    return kept or [min(configs, key=lambda c: c.kwargs["BM"] * c.kwargs["BN"])]


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """``early_config_prune``: drop configs whose operand tiles would not fit this GPU's shared
    memory (``fitting_configs``). The compiler rejects them anyway ("out of resources"); pruning
    saves the attempt."""
    x = named_args.get("x_ptr", named_args.get("a_ptr"))
    budget = driver.active.utils.get_device_properties(x.device.index)["max_shared_mem"]
    return fitting_configs(configs, x.element_size(), budget)


def autotuning() -> bool:
    """Kernels without a given config autotune, but under the interpreter or FASTCLIP_AUTOTUNE=0."""
    return not interpreting() and os.environ.get("FASTCLIP_AUTOTUNE", "1") != "0"


def fixed_config(config: triton.Config, blocks: dict[str, str] = BLOCKS) -> TileConfig:
    """An autotune config as fixed launch parameters (``blocks`` maps the kernel's block names
    to TileConfig fields), its register cap included."""
    sizes = {field: config.kwargs[name] for name, field in blocks.items() if name in config.kwargs}
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return TileConfig(**sizes, **options, maxnreg=config.maxnreg)


def first_fitting(tuned, args: dict) -> triton.Config:
    """The config an autotuned kernel launches without autotuning: the first of its list that its
    pruning keeps for these arguments (``args``, by name) on this GPU."""
    return tuned.early_config_prune(tuned.configs, args, **args)[0]


def launch(kernel, tuned, grid, config: TileConfig | None, args: dict, blocks=BLOCKS) -> None:
    """Launch the autotuned kernel, or the plain one with a fixed config; ``args`` are the
    kernel's arguments by name, ``blocks`` maps its block meta-parameters to TileConfig fields.

    Fixed configs: the one given; the interpreter's small tiles; without autotuning
    (FASTCLIP_AUTOTUNE=0), the first of the kernel's autotune configs that its pruning keeps for
    this GPU, so that every config a GPU can launch is one the Hopper compile test checks.
    """
    if config is None and autotuning():
        tuned[grid](**args)
        return
    if config is None and not interpreting():
        config = fixed_config(first_fitting(tuned, args), blocks)
    config = config or INTERPRETER_CONFIG
    sizes = {name: getattr(config, field) for name, field in blocks.items()}
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.maxnreg:
        options["maxnreg"] = config.maxnreg
    kernel[grid(sizes)](**args, **sizes, **options)


def target_programs(device: torch.device) -> int:
    """Enough programs to keep every SM busy for a few waves (a handful under the interpreter)."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def tma(*operands: torch.Tensor) -> bool:
    """Read these operands through tensor descriptors (Hopper's TMA copy engine)?

    Opt-in (FASTCLIP_TMA=1) until a GPU run has measured it against the pointer loads, where
    Triton has device-side descriptors and the operands allow them: 16-bit, unit feature
    stride, rows and base 16-byte aligned. A GPU run needs an allocator for the descriptors'
    scratch memory: set here, once.
    """
    wanted = os.environ.get("FASTCLIP_TMA", "0") == "1" and hasattr(tl, "make_tensor_descriptor")
    usable = wanted and all(
        t.dtype in (torch.float16, torch.bfloat16)
        and t.stride(1) == 1
        and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
        for t in operands
    )
    if usable and not interpreting():
        _descriptor_scratch()
    return usable


@functools.cache
def _descriptor_scratch() -> None:
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8,
                                                                     device="cuda"))  # fmt: skip


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products follow torch's own matmul setting; 16-bit inputs are exact products anyway."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def row_block_d(D: int) -> int:
    return min(128, max(16, triton.next_power_of_2(D)))


def bucket(n: int) -> int:
    """Autotune key: powers of two from 1K to 64K rows, so a new batch size does not trigger a new
    search; past 64K rows every config fills the GPU many times over and the best one is settled."""
    return min(triton.next_power_of_2(max(n, 1024)), 65536)


# ----------------------------------------------------------------------------------------------
# Shared launchers
# ----------------------------------------------------------------------------------------------


def positive_dots(x: torch.Tensor, y: torch.Tensor, offset: int) -> torch.Tensor:
    """<x_i, y_i+offset> for every row of x: (n_x,) fp32."""
    n, D = x.shape
    partners = y[offset : offset + n]
    dots = torch.empty(n, device=x.device, dtype=torch.float32)
    row_dot_kernel[(triton.cdiv(n, ROWS),)](
        x_ptr=x,
        y_ptr=partners,
        out_ptr=dots,
        n=n,
        D=D,
        stride_x=x.stride(0),
        stride_xd=x.stride(1),
        stride_y=partners.stride(0),
        stride_yd=partners.stride(1),
        BM=ROWS,
        BD=row_block_d(D),
    )
    return dots


def split_columns(n_a: int, n_b: int, device: torch.device, config: TileConfig | None) -> int:
    """Column chunks per row block: enough programs to fill the GPU when n_a is small."""
    if config is not None and config.col_split:
        return config.col_split
    col_blocks = triton.cdiv(n_b, MIN_BLOCK)
    row_blocks = triton.cdiv(n_a, MIN_BLOCK)
    return min(col_blocks, max(1, triton.cdiv(target_programs(device), row_blocks)))


def sweep_rows(
    kernel,
    tuned,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    config: TileConfig | None,
    args_of,
    n_parts: int,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Drive a row-owning sweep of a's rows against b: the fused backward of both losses.

    Each program owns a block of a's rows and a chunk of b's column blocks (``split_columns``),
    and accumulates G b over its chunk in a private slice of an fp32 workspace: deterministic,
    no atomics. Rows run in slices whose (col_split, rows, D) workspace stays within
    WORKSPACE_BYTES; ``finalize_kernel`` then sums each slice's partials into the gradient.

    ``args_of(rows)`` returns the kernel's own arguments for the row slice ``rows`` (its loss
    statistics, pairing, flags); the driver adds a, b, scale, the workspace and a buffer of
    ``n_parts`` per-row partial sums (``store_parts``) as ``a_ptr``, ``b_ptr``, ``scale_ptr``,
    ``acc_ptr``, ``parts_ptr``, with sizes, strides and DOT_PRECISION. ``grad_scale`` (one
    element: the logit scale times the factor the loss kept out of G) scales the gradient;
    None: a sweep that accumulates nothing (its sums alone), all rows at once.

    Returns dL/da = grad_scale * G b (n_a, D) in a's dtype, or None, and the (n_parts,) totals
    of the partial sums.
    """
    gradient = grad_scale is not None
    n_a, D = a.shape
    n_b = b.shape[0]
    col_split = split_columns(n_a, n_b, a.device, config)
    slice_rows = min(n_a, max(MIN_BLOCK, WORKSPACE_BYTES // (4 * D * col_split)))
    if not gradient:
        slice_rows = n_a
    f32 = {"dtype": torch.float32, "device": a.device}
    workspace = torch.zeros((col_split, slice_rows, D if gradient else 0), **f32)
    grad = torch.empty((n_a, D), dtype=a.dtype, device=a.device) if gradient else None
    totals = torch.zeros(n_parts, **f32)
    for start in range(0, n_a, slice_rows):
        rows = slice(start, min(start + slice_rows, n_a))
        n_rows = rows.stop - start
        parts = torch.empty((n_parts, col_split, n_rows), **f32)
        common = dict(
            a_ptr=a[rows],
            b_ptr=b,
            scale_ptr=scale,
            acc_ptr=workspace,
            parts_ptr=parts,
            n_a=n_rows,
            n_b=n_b,
            D=D,
            n_bucket=bucket(max(n_a, n_b)),
            stride_a=a.stride(0),
            stride_ad=a.stride(1),
            stride_b=b.stride(0),
            stride_bd=b.stride(1),
            DOT_PRECISION=dot_precision(a.dtype),
        )
        grid = lambda meta, n=n_rows: (triton.cdiv(n, meta["BM"]), col_split)  # noqa: E731
        launch(kernel, tuned, grid, config, {**common, **args_of(rows)})
        totals += parts.sum(dim=(1, 2))
        if gradient:
            finalize_kernel[(triton.cdiv(n_rows, ROWS),)](
                acc_ptr=workspace,
                scale_ptr=grad_scale,
                grad_ptr=grad[rows],
                n_a=n_rows,
                D=D,
                col_split=col_split,
                BM=ROWS,
                BD=row_block_d(D),
            )
    return grad, totals


def sweep_blocks(
    kernel,
    tuned,
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    grad_scale: torch.Tensor,
    config: TileConfig | None,
    args_of,
    n_sums: int,
    need_dx: bool,
    need_dy: bool,
    dots_by_gemm: bool = False,
    block_bytes: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Drive a bounded-block gradient (``blocks.blocked_gradients``) whose G comes from a
    Triton kernel, one BM x BN tile per program: the fast backward of both losses.

    The driver owns the buffers (G in x's dtype, the fp32 dots when ``dots_by_gemm`` lets cuBLAS
    compute them, the programs' partial sums) and passes the kernel the block's operands as
    ``a_ptr`` (x's rows) and ``b_ptr`` (y's rows), ``dots_ptr``, ``scale_ptr``, ``g_ptr`` and
    ``sums_ptr`` (n_sums, programs) with sizes, strides, DOTS_GIVEN and DOT_PRECISION;
    ``args_of(r0, r1, c0, c1)`` adds the loss's own (statistics, pairing, flags).

    Returns grad_scale * G y, grad_scale * G^T x (each None unless needed) and the (n_sums,)
    totals of the sums.
    """
    n_x, D = x.shape
    n_y = y.shape[0]
    element = x.element_size() + (4 if dots_by_gemm else 0)
    R, C = plan_blocks(n_x, n_y, element, block_bytes or default_block_bytes(x.device))
    f32 = {"dtype": torch.float32, "device": x.device}
    g_buffer = torch.empty(R * C, dtype=x.dtype, device=x.device)
    dots_buffer = torch.empty(R * C if dots_by_gemm else 0, **f32)
    sums = torch.empty((n_sums, triton.cdiv(R, BLOCKS_MIN) * triton.cdiv(C, BLOCKS_MIN)), **f32)

    def form(r0: int, r1: int, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_a, n_b = r1 - r0, c1 - c0
        a, b = x[r0:r1], y[c0:c1]
        g = g_buffer[: n_a * n_b].view(n_a, n_b)
        dots = dots_buffer[: n_a * n_b].view(n_a, n_b) if dots_by_gemm else g
        if dots_by_gemm:
            matmul_f32(a, b.T, out=dots)
        common = dict(
            a_ptr=a,
            b_ptr=b,
            dots_ptr=dots,
            scale_ptr=scale,
            g_ptr=g,
            sums_ptr=sums,
            n_a=n_a,
            n_b=n_b,
            D=D,
            n_bucket=bucket(max(n_x, n_y)),
            stride_a=a.stride(0),
            stride_ad=a.stride(1),
            stride_b=b.stride(0),
            stride_bd=b.stride(1),
            stride_dots=dots.stride(0),
            stride_g=g.stride(0),
            stride_sums=sums.stride(0),
            DOTS_GIVEN=dots_by_gemm,
            DOT_PRECISION=dot_precision(x.dtype),
            TMA=not dots_by_gemm and tma(a, b),
        )
        programs = []

        def grid(meta):  # the launched config's program count: the sums to read back
            programs.append(triton.cdiv(n_a, meta["BM"]) * triton.cdiv(n_b, meta["BN"]))
            return triton.cdiv(n_a, meta["BM"]), triton.cdiv(n_b, meta["BN"])

        launch(kernel, tuned, grid, config, {**common, **args_of(r0, r1, c0, c1)})
        return g, sums[:, : programs[-1]].sum(dim=1)

    return blocked_gradients(x, y, grad_scale, form, need_dx, need_dy, n_sums, (R, C))
