"""Launch configuration of fastclip's kernels: fixed tiles (``TileConfig``), autotune configs
sized for Hopper's SMs and pruned to the GPU's shared memory, TMA, and the launch itself.

Every kernel launches through ``launch``: with a given ``TileConfig`` (tests, benchmarks: the
``config=`` keyword of every public function reaches it), the interpreter's small tiles, the
first fitting autotune config (FASTCLIP_AUTOTUNE=0), or autotuned.
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

LN2 = math.log(2.0)
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
# Statistics kernels (one value per row or column): entries per program.
STATS = 1024
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
    device. ``programs``: the persistent kernels' one wave (``persistent_programs``).
    ``maxnreg`` caps registers per thread (ptxas), as a ``SizedConfig`` for several CTAs per
    SM does.
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
    programs: int | None = None


INTERPRETER_CONFIG = TileConfig(block_m=16, block_n=16, block_k=16, block_d=16, num_stages=1)
# Kernel meta-parameter names of the TileConfig fields.
BLOCKS = {"BM": "block_m", "BN": "block_n", "BK": "block_k", "BD": "block_d"}


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


def persistent_programs(device: torch.device, config: TileConfig | None = None) -> int:
    """The persistent kernels' one wave: 2 CTAs per SM (every persistent config is sized for
    2), a few programs under the interpreter; ``config.programs`` where given."""
    if config is not None and config.programs:
        return config.programs
    if device.type != "cuda":
        return 3
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def tma(*operands: torch.Tensor) -> bool:
    """Read these operands through tensor descriptors (Hopper's TMA copy engine) in the
    bounded-block kernels? Opt-in (FASTCLIP_TMA=1) until a GPU run has measured it against the
    pointer loads, where ``tma_usable``."""
    return os.environ.get("FASTCLIP_TMA", "0") == "1" and tma_usable(*operands)


def tma_usable(*operands: torch.Tensor) -> bool:
    """Can kernels read (and write) these tensors through tensor descriptors? Where Triton has
    device-side descriptors and the tensors allow them: 16-bit, unit feature stride, rows and
    base 16-byte aligned. A GPU run needs an allocator for the descriptors' scratch memory: set
    here, once. The persistent kernels always use them where they can."""
    usable = hasattr(tl, "make_tensor_descriptor") and all(
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
# The projection's kernels: which configs fit
# ----------------------------------------------------------------------------------------------


def projection_footprint(kernel: str, blocks: dict) -> tuple[int, int]:
    """(operand elements per pipeline stage, fp32 accumulator elements) of a projection kernel's
    tiles ("forward", "dx" or "dw"; ``projection.py``)."""
    bm, bo, bi = blocks["BM"], blocks["BO"], blocks["BI"]
    if kernel == "forward":  # x (BM, BI) and W (BO, BI) tiles into z (BM, BO)
        return (bm + bo) * bi, bm * bo
    if kernel == "dx":  # g, y (BM, BO) and W (BO, BI) into dx (BM, BI)
        return (2 * bm + bi) * bo, bm * bi
    return (2 * bo + bi) * bm, bo * bi  # dw: g, y (BM, BO) and x (BM, BI) into dW (BO, BI)


def projection_fitting(
    kernel: str, configs: list, meta: dict, element_size: int, shared_memory: int
) -> list:
    """The configs whose pipelined operand tiles take at most 3/4 of the shared memory and whose
    fp32 accumulator takes at most 128 registers a thread and half of what a thread may have
    (65536 / threads): the compiler spills the rest, or refuses it. The forward's two-stage
    epilogue counts its accumulator twice (compiled, it keeps about that much more live)."""
    kept = []
    for c in configs:
        sizes = {**meta, **c.kwargs}
        operands, accumulator = projection_footprint(kernel, sizes)
        smem = operands * c.num_stages * element_size
        threads = 32 * c.num_warps
        registers = accumulator / threads * (2 if meta.get("WIDE") else 1)
        if smem <= 0.75 * shared_memory and registers <= min(128, 65536 / threads / 2):
            if kernel != "forward" or _full_width_mma(sizes, c.num_warps):
                kept.append(c)
    return kept


def _full_width_mma(sizes: dict, num_warps: int) -> bool:
    """Hopper's MMA runs per warp group (4 warps) on 64 rows: warp groups beyond BM / 64 split
    the BO output columns between them, and an n64 instruction where n128 fits halves the
    operand reuse. A BO of 128 or more must stay at least 128 wide per warp group."""
    split = max(1, (num_warps // 4) // max(1, sizes["BM"] // 64))
    return sizes["BO"] < 128 or sizes["BO"] // split >= 128


def projection_prune(kernel: str, configs: list, named_args: dict, **meta) -> list:
    """``early_config_prune``: the fitting configs for this GPU (each kernel's first argument is an
    operand in the input dtype); the last config, the smallest, if none fits."""
    first = next(iter(named_args.values()))
    smem = driver.active.utils.get_device_properties(first.device.index)["max_shared_mem"]
    return projection_fitting(kernel, configs, meta, first.element_size(), smem) or configs[-1:]
