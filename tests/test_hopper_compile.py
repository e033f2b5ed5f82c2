"""Every autotune config compiles for Hopper (sm_90) within what its intended occupancy allows.

Triton compiles ahead of time without a GPU, so this runs on any machine: it catches what the
interpreter cannot (tl.dot shape limits, shared memory, registers) before a GPU does. Each case
must compile with

- no register spills (fp32 features, the slow path, excepted);
- registers per thread and shared memory within what its CTAs per SM allow
  (``launch.SizedConfig``; other configs, and fp32 features, are meant for 1 CTA per SM);
- wgmma of shape m64nNk16 for its 16-bit products, N >= 128 where a product's output tile is
  at least 64 x 128 (Triton spreads warp groups over N once M is covered, 64 rows each: a
  64-row tile at 8 warps issues n64 and fails here);
- TMA instructions (cp.async.bulk.tensor) where the kernel uses tensor descriptors;
- for the persistent sweeps, their facts (``test_persistent_kernels_facts``): 2 CTAs per SM
  or 8 warps, TMA, exponentials per element counted in the Triton IR, reciprocals in PTX.

The configs are every one a GPU can launch: the autotune lists, and without autotuning
(FASTCLIP_AUTOTUNE=0, as the tests and the GPU script run) the first of each list that fits.
Register allocation differs between Triton versions, so every case compiles twice: with the
installed Triton and with the GPU machine's (GPU_TRITON, installed beside it by
``pip install --no-deps --target .gate/triton-3.6.0 triton==3.6.0``, as .ci/run does).

Arguments are specialized as the JIT would for contiguous, 16-byte aligned inputs. Running this
file prints every case's registers, spills, shared memory and wgmma shapes as JSON
(``python tests/test_hopper_compile.py [NAME-PART ...]`` compiles only the cases whose names
contain one of the parts).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import triton

import fastclip.kernels.contrastive as kc
import fastclip.kernels.fused as kfused
import fastclip.kernels.jit as kjit
import fastclip.kernels.launch as klaunch
import fastclip.kernels.persistent as kpersistent
import fastclip.kernels.persistent_siglip as kpsiglip
import fastclip.kernels.projection as kproj
import fastclip.kernels.projection_backward as kprojb
import fastclip.kernels.siglip as ks
import fastclip.kernels.similarity as ksim

# The GPU machine's Triton, and where the gate finds it beside the installed one.
GPU_TRITON = "3.6.0"
GPU_TRITON_DIR = Path(__file__).resolve().parents[1] / ".gate" / f"triton-{GPU_TRITON}"
# Sizes compiled as multiples of 16, as the JIT specializes them for the usual widths (512, 768).
DIVISIBLE = ("D", "n_in", "n_out")
# Pointers the launchers pass as None where a flag is off: the JIT makes them constants.
UNUSED_WITHOUT = {
    "COL_STATS": ("col_part_ptr",),
    "HAS_BIAS": ("bias_ptr",),
    "NORMALIZE": ("inv_a_ptr", "inv_b_ptr", "inv_q_ptr", "inv_k_ptr"),
    "A_TERM": ("a_stats_ptr",),
    "B_TERM": ("b_stats_ptr",),
    "DX": ("w_ptr", "dx_ptr"),
    "DW": ("x_ptr", "dw_ptr"),
    "DB": ("db_ptr",),
}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m(\d+)n(\d+)k(\d+)")
DESCRIPTORS = re.compile(r"tt\.(experimental_)?descriptor_|tt\.make_tensor_descriptor")
# Reciprocals in PTX (a division is one): special-function operations beside the exponentials.
RECIPROCALS = re.compile(r"\b(rcp|div)\.[a-z0-9.]*f32")

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # older Triton: the ahead-of-time API differs
    ASTSource = None

pytestmark = [
    pytest.mark.skipif(
        ASTSource is None or not os.path.exists(CUOBJDUMP),
        reason="needs Triton's ahead-of-time compiler (triton >= 3.3) and its bundled cuobjdump",
    ),
    pytest.mark.skipif(
        torch.cuda.is_available(), reason="a CUDA machine compiles and runs every config itself"
    ),
]


class Case(NamedTuple):
    kernel: triton.JITFunction
    pointers: dict[str, str]  # pointer argument -> element type
    constants: dict
    config: triton.Config
    products: tuple[tuple[int, int], ...] = ()  # (M, N) output tiles of its 16-bit tl.dots


def tile_elements(case: Case) -> int:
    """Elements of a case's S tile (BM x BN; 1 for kernels without one)."""
    blocks = case.config.kwargs
    return blocks.get("BM", 1) * blocks.get("BN", 1)


def compile_for_hopper(case: Case) -> dict:
    """Compile a case for sm_90; returns its shared memory bytes, registers, spill stack bytes,
    wgmma shapes and whether it uses tensor descriptors and TMA instructions."""
    fn, pointers, config = case.kernel, case.pointers, case.config
    constants = {**case.constants, **config.kwargs}
    for flag, names in UNUSED_WITHOUT.items():
        if constants.get(flag) is False:
            constants.update({n: None for n in names if n in fn.arg_names})
    # The JIT treats a unit stride as a constant and 16-divisible ints and pointers as aligned.
    constants.update({n: 1 for n in fn.arg_names if n.startswith("stride") and n.endswith("d")})
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        signature[name] = "*" + pointers[name] if name in pointers else "i32"
        if name in pointers or name.startswith("stride") or name in DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.maxnreg:
        options["maxnreg"] = config.maxnreg
    source = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fastclip-{os.getpid()}.cubin")
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    try:
        usage = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.remove(path)
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    ptx = kernel.asm["ptx"]
    return {
        "shared": kernel.metadata.shared,
        "regs": int(regs),
        "stack": int(stack),
        "wgmma": sorted({"m{}n{}k{}".format(*m) for m in WGMMA.findall(ptx)}),
        "descriptors": bool(DESCRIPTORS.search(kernel.asm["ttir"])),
        "tma": "cp.async.bulk.tensor" in ptx,
        "exp2": exp2_paths(kernel.asm["ttir"], tile_elements(case)),
        "reciprocals": len(RECIPROCALS.findall(ptx)),
    }


TILE_EXP2 = re.compile(r"math\.exp2 .*: tensor<(\d+)x(\d+)xf32>")


def exp2_paths(ttir: str, tile: int) -> list[float]:
    """Exponentials per element of a ``tile``-element tile on each path through its epilogue:
    the 2-D math.exp2 ops of the Triton IR (before the pipeliner copies any), weighted by their
    share of the tile (an epilogue run in column halves takes two ops of half a tile each); those
    outside every branch count on every path, those of each if/else holding some on its own
    branch. [1, 2]: one on the fast path, two on the fallback; [n]: n everywhere."""
    base, paths, depth, branch = 0.0, [], 0, None
    for line in ttir.splitlines():
        text = line.strip()
        found = TILE_EXP2.search(text)
        share = int(found[1]) * int(found[2]) / tile if found else 0.0
        if branch is None and re.search(r"= scf\.if|^scf\.if", text):
            branch, depth, sides = 0, 0, [0.0, 0.0]
        if branch is None:
            base += share
            continue
        if text.startswith("} else {") and depth == 1:
            branch = 1
        depth += text.count("{") - text.count("}")
        sides[branch] += share
        if depth == 0 and text.startswith("}"):
            if sum(sides):
                paths.append(sides)
            branch = None
    if not paths:
        return [base]
    # Each if/else with exponentials is one of the epilogue's passes (a half, say): the fast
    # path takes every first branch, the fallback every second.
    return sorted({base + sum(p[0] for p in paths), base + sum(p[1] for p in paths)})


FEATURES = {"x_ptr": "bf16", "y_ptr": "bf16", "a_ptr": "bf16", "b_ptr": "bf16", "q_ptr": "bf16",
            "k_ptr": "bf16", "g_ptr": "bf16"}  # fmt: skip
FP32 = ("scale_ptr", "bias_ptr", "x_ref_ptr", "row_part_ptr", "col_part_ptr", "acc_ptr",
        "parts_ptr", "a_stats_ptr", "b_stats_ptr", "dots_ptr", "sums_ptr", "out_ptr", "inv_a_ptr",
        "inv_b_ptr", "inv_q_ptr", "inv_k_ptr", "part_ptr", "pdot_ptr", "m_ptr")  # fmt: skip


def label(config: triton.Config) -> str:
    """BM128-BN128-BK64-w8-s3: a config's blocks, warps and stages."""
    blocks = "-".join(f"{name}{size}" for name, size in config.kwargs.items())
    return f"{blocks}-w{config.num_warps}-s{config.num_stages}"


def cases() -> dict[str, Case]:
    """name -> Case for every config the launchers use."""
    bf16 = {**FEATURES, **dict.fromkeys(FP32, "fp32"), "grad_ptr": "bf16"}
    fp32 = dict.fromkeys(bf16, "fp32")
    out = {}

    def add(name, kernel, pointers, constants, config, *products):
        out[name] = Case(kernel, pointers, constants, config, products)

    def first_fp32(configs):  # what FASTCLIP_AUTOTUNE=0 launches for fp32 features
        return klaunch.fitting_configs(configs, 4, klaunch.SM_SHARED_MEMORY)[0]

    def tile(c, m="BM", n="BN"):  # a product's (M, N) output tile
        return c.kwargs[m], c.kwargs[n]

    # 16-bit features: both directions take one exponential, and the operands may come through
    # tensor descriptors (TMA) where dots are computed.
    for c in kc._FORWARD_CONFIGS:
        for col in (True, False):
            for tma in (False, True):
                const = {"COL_STATS": col, "ONE_EXP": col, "DOT_PRECISION": "ieee", "TMA": tma}
                add(f"forward-{label(c)}-col{col}-tma{tma}", kc._forward_kernel, bf16, const, c,
                    tile(c))  # fmt: skip
    for c in kc._BLOCK_CONFIGS:
        for given, tma in ((False, False), (False, True), (True, False)):  # given: no product
            const = {"B_TERM": True, "DOTS_GIVEN": given, "DOT_PRECISION": "ieee", "TMA": tma}
            products = () if given else (tile(c),)
            add(f"block-{label(c)}-dots{given}-tma{tma}", kc._gradient_block_kernel, bf16,
                const, c, *products)  # fmt: skip
    for c in kfused._BACKWARD_CONFIGS:  # S, then G b
        const = {"A_TERM": True, "B_TERM": True, "DOT_PRECISION": "ieee"}
        add(f"backward-{label(c)}", kfused._backward_kernel, bf16, const, c, tile(c),
            tile(c, n="BD"))  # fmt: skip
    for precision in ("ieee", "tf32"):  # fp32 features
        const = {"COL_STATS": True, "ONE_EXP": False, "DOT_PRECISION": precision, "TMA": False}
        add(f"forward-fp32-{precision}", kc._forward_kernel, fp32, const,
            first_fp32(kc._FORWARD_CONFIGS))  # fmt: skip
        const = {"B_TERM": True, "DOTS_GIVEN": False, "DOT_PRECISION": precision, "TMA": False}
        add(f"block-fp32-{precision}", kc._gradient_block_kernel, fp32, const,
            first_fp32(kc._BLOCK_CONFIGS))  # fmt: skip
        const = {"A_TERM": True, "B_TERM": True, "DOT_PRECISION": precision}
        add(f"backward-fp32-{precision}", kfused._backward_kernel, fp32, const,
            first_fp32(kfused._BACKWARD_CONFIGS))  # fmt: skip
        const = {"HAS_BIAS": True, "HAS_PAIRS": True, "LOSS": True, "GRAD": True,
                 "DOT_PRECISION": precision, "G_SCALE": 1.0}  # fmt: skip
        add(f"siglip-fp32-{precision}", ks._sweep_kernel, fp32, const,
            first_fp32(ks._SWEEP_CONFIGS))  # fmt: skip
        const = {"HAS_BIAS": True, "HAS_PAIRS": True, "DOTS_GIVEN": False,
                 "DOT_PRECISION": precision, "TMA": False, "G_SCALE": 1.0}  # fmt: skip
        add(f"siglip-block-fp32-{precision}", ks._gradient_block_kernel, fp32, const,
            first_fp32(ks._BLOCK_CONFIGS))  # fmt: skip
        const = {"HAS_BIAS": True, "NORMALIZE": True, "DOT_PRECISION": precision, "GROUP": 8}
        add(f"similarity-fp32-{precision}", ksim._similarity_kernel, fp32, const,
            first_fp32(ksim._SIMILARITY_CONFIGS))  # fmt: skip
    for c in ks._SWEEP_CONFIGS:
        for loss, grad in ((True, True), (False, True), (True, False)):
            const = {"HAS_BIAS": True, "HAS_PAIRS": True, "LOSS": loss, "GRAD": grad,
                     "DOT_PRECISION": "ieee", "G_SCALE": 1.0}  # fmt: skip
            products = (tile(c), tile(c, n="BD")) if grad else (tile(c),)
            add(f"siglip-{label(c)}-loss{loss}-grad{grad}", ks._sweep_kernel, bf16, const, c,
                *products)  # fmt: skip
    for c in ks._BLOCK_CONFIGS:
        for given, tma in ((False, False), (False, True), (True, False)):
            const = {"HAS_BIAS": True, "HAS_PAIRS": True, "DOTS_GIVEN": given,
                     "DOT_PRECISION": "ieee", "TMA": tma, "G_SCALE": 1.0}  # fmt: skip
            products = () if given else (tile(c),)
            add(f"siglip-block-{label(c)}-dots{given}-tma{tma}", ks._gradient_block_kernel,
                bf16, const, c, *products)  # fmt: skip
    for c in ksim._SIMILARITY_CONFIGS:
        for norm in (False, True):
            const = {"HAS_BIAS": True, "NORMALIZE": norm, "DOT_PRECISION": "ieee", "GROUP": 8}
            add(f"similarity-{label(c)}-normalize{norm}", ksim._similarity_kernel, bf16, const,
                c, tile(c))  # fmt: skip
    for width in (16, 32, 64, ksim.MAX_TOPK):
        t = ksim.topk_config(width)
        blocks = {"BM": t.block_m, "BN": t.block_n, "BK": t.block_k}
        c = triton.Config(blocks, num_warps=t.num_warps, num_stages=t.num_stages)
        const = {"NORMALIZE": True, "DOT_PRECISION": "ieee", "K": width}
        add(f"topk-{width}", ksim._topk_kernel, {**bf16, "out_ptr": "i64"}, const, c, tile(c))
    # Normalized projection. Forward: each config at the widest column block it can hold (as
    # pruned on an H100), registers-only and two-stage epilogue; backward: every config; fp32:
    # what FASTCLIP_AUTOTUNE=0 launches. eps, a float argument, is compiled as a constant.
    # Products: forward x w^T, (BM, BO); dx: dz w, (BM, BI); dw: dz^T x, (BO, BI).
    proj = {**bf16, "w_ptr": "bf16", "g_ptr": "bf16", "dx_ptr": "bf16"}
    proj.update(dict.fromkeys(("norm_ptr", "yg_ptr", "dw_ptr", "db_ptr"), "fp32"))
    proj32 = dict.fromkeys(proj, "fp32")
    for c in kproj._FORWARD_CONFIGS:
        for wide, widths in ((False, (512, 256, 128)), (True, (256, 128))):
            meta = {"WIDE": wide, "DOT_PRECISION": "ieee", "HAS_BIAS": True}
            width = next((w for w in widths if klaunch.projection_fitting(
                "forward", [c], {**meta, "BO": w}, 2, klaunch.SM_SHARED_MEMORY)), None)  # fmt: skip
            if width is not None:  # else pruned for every width
                const = {**meta, "BO": width, "eps": 1e-12}
                add(f"projection-forward-{label(c)}-BO{width}-wide{wide}", kproj._forward_kernel,
                    proj, const, c, (c.kwargs["BM"], width))  # fmt: skip
    for c in kprojb._DX_CONFIGS:
        const = {"DX": True, "DOT_PRECISION": "ieee", "eps": 1e-12}
        add(f"projection-dx-{label(c)}", kprojb._dx_kernel, proj, const, c, tile(c, n="BI"))
    for c in kprojb._DW_CONFIGS:
        for db in (True, False):
            const = {"DW": True, "DB": db, "DOT_PRECISION": "ieee", "eps": 1e-12}
            add(f"projection-dw-{label(c)}-db{db}", kprojb._dw_kernel, proj, const, c,
                tile(c, "BO", "BI"))  # fmt: skip
    const = {"DX": False, "DOT_PRECISION": "ieee", "eps": 1e-12}
    add("projection-dx-statistic-only", kprojb._dx_kernel, proj, const, kprojb._DX_CONFIGS[0])
    const = {"DW": False, "DB": True, "DOT_PRECISION": "ieee", "eps": 1e-12}
    add("projection-dw-bias-only", kprojb._dw_kernel, proj, const, kprojb._DW_CONFIGS[0])
    for precision in ("ieee", "tf32"):  # fp32
        const = {"HAS_BIAS": True, "WIDE": False, "DOT_PRECISION": precision, "BO": 512,
                 "eps": 1e-12}  # fmt: skip
        c = klaunch.projection_fitting("forward", kproj._FORWARD_CONFIGS, {"BO": 512}, 4,
                          klaunch.SM_SHARED_MEMORY)[0]  # fmt: skip
        add(f"projection-forward-fp32-{precision}", kproj._forward_kernel, proj32, const, c)
        const = {"DX": True, "DOT_PRECISION": precision, "eps": 1e-12}
        c = klaunch.projection_fitting("dx", kprojb._DX_CONFIGS, {}, 4, klaunch.SM_SHARED_MEMORY)[0]
        add(f"projection-dx-fp32-{precision}", kprojb._dx_kernel, proj32, const, c)
        const = {"DW": True, "DB": True, "DOT_PRECISION": precision, "eps": 1e-12}
        c = klaunch.projection_fitting("dw", kprojb._DW_CONFIGS, {}, 4, klaunch.SM_SHARED_MEMORY)[0]
        add(f"projection-dw-fp32-{precision}", kprojb._dw_kernel, proj32, const, c)
    # The persistent sweeps: every config (16-bit features through TMA alone: the others run
    # the bounded blocks' kernels).
    for c in kpersistent._FORWARD_CONFIGS:
        for col in (True, False):
            const = {"COL_STATS": col, "ONE_EXP": col, "DOT_PRECISION": "ieee"}
            add(f"persistent-forward-{label(c)}-col{col}", kpersistent._forward_kernel, bf16,
                const, c, tile(c))  # fmt: skip
    for c in kpersistent._GRADIENT_CONFIGS:
        for b_term in (True, False):
            const = {"B_TERM": b_term, "DOT_PRECISION": "ieee"}
            add(f"persistent-gradient-{label(c)}-bterm{b_term}", kpersistent._gradient_kernel,
                bf16, const, c, tile(c))  # fmt: skip
    for c in kpsiglip._CONFIGS:
        const = {"HAS_BIAS": True, "HAS_PAIRS": True, "DOT_PRECISION": "ieee", "G_SCALE": 1.0}
        add(f"persistent-siglip-{label(c)}", kpsiglip._gradient_kernel, bf16, const,
            c, tile(c))  # fmt: skip
    rows = triton.Config({"BM": klaunch.ROWS, "BD": 128}, num_warps=4, num_stages=1)
    add("finalize", kjit.finalize_kernel, bf16, {}, rows)
    add("row-dot", kjit.row_dot_kernel, bf16, {}, rows)
    stats = triton.Config({"BLOCK": klaunch.STATS}, num_warps=4, num_stages=1)
    add("combine", kjit.combine_kernel, bf16, {}, stats)
    for columns in (False, True):
        const = {"COLUMNS": columns, "W_SCALE": klaunch.FP16_G_SCALE}
        add(f"side-stats-columns{columns}", kjit.side_stats_kernel, {**bf16, "w_ptr": "fp32"},
            const, stats)  # fmt: skip
    return out


@pytest.fixture(scope="module", params=["installed", GPU_TRITON], ids=lambda v: f"triton-{v}")
def compiled(request) -> dict:
    """Compile everything in a child process, with the installed Triton or the GPU machine's:
    under TRITON_INTERPRET=1 (set by conftest.py on CPU machines) kernels are interpreted
    functions, which cannot be compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if request.param == GPU_TRITON:
        if not (GPU_TRITON_DIR / "triton").is_dir():
            install = f"pip install --no-deps --target {GPU_TRITON_DIR} triton=={GPU_TRITON}"
            if os.environ.get("CI"):  # CI gates both versions: a missing one is a failure there
                pytest.fail(f"Triton {GPU_TRITON} is missing; .ci/run runs: {install}")
            pytest.skip(f"the GPU machine's Triton {GPU_TRITON} is not installed: {install}")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GPU_TRITON_DIR),
                                                          env.get("PYTHONPATH")]))  # fmt: skip
    run = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, timeout=1800
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    if request.param == GPU_TRITON:
        assert results.pop("triton") == GPU_TRITON, "the child imported another Triton"
    results.pop("triton", None)
    return results


CASES = cases()


def wgmma_problems(case: Case, shapes: list[str]) -> list[str]:
    """What the wgmma shapes of a case's 16-bit products lack (module docstring): wgmma wherever
    a product has 64 rows or more, m64nNk16 throughout, N >= 128 where the tile allows it."""
    if not case.products:
        return []
    allowing = [n >= 128 for m, n in case.products if m >= 64]
    widths = [int(re.search(r"n(\d+)", s).group(1)) for s in shapes]
    problems = [f"{s} is not m64nNk16" for s in shapes if not re.fullmatch(r"m64n\d+k16", s)]
    if allowing and not shapes:
        problems.append("no wgmma")
    elif any(allowing) and max(widths) < 128 or allowing and all(allowing) and min(widths) < 128:
        problems.append(f"{shapes}: narrower than N = 128 where the tile allows it")
    return problems


@pytest.mark.parametrize("name", list(CASES))
def test_compiles_within_occupancy(compiled, name):
    case, result = CASES[name], compiled[name]
    if "skip" in result:
        pytest.skip(result["skip"])
    assert "error" not in result, f"{name}: {result['error']}"
    # fp32 features (products on FMA units or in TF32, operand tiles twice the bytes) are the
    # slow path: one CTA per SM, spills tolerated.
    fp32 = "bf16" not in case.pointers.values()
    ctas = 1 if fp32 else getattr(case.config, "ctas", 1)
    registers = klaunch.register_budget(case.config.num_warps, ctas)
    shared = klaunch.SM_SHARED_MEMORY // ctas
    usage = f"{result['regs']} regs, {result['stack']} B spilled, {result['shared']} B shared"
    assert fp32 or result["stack"] == 0, f"{name}: {usage}"
    assert result["regs"] <= registers, f"{name}: {usage}; {ctas} CTAs per SM allow {registers}"
    assert result["shared"] <= shared, f"{name}: {usage}; {ctas} CTAs per SM allow {shared} B"
    problems = wgmma_problems(case, result["wgmma"])
    assert not problems, f"{name}: {problems}"
    if result["descriptors"]:
        assert result["tma"], f"{name}: tensor descriptors without TMA instructions"


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("persistent-")])
def test_persistent_kernels_facts(compiled, name):
    """The persistent sweeps (kernels/persistent.py): sized for 2 CTAs per SM (or 1 CTA of 8
    warps), operands through TMA, one exp2 per element on the fast path (two on InfoNCE's
    range fallback), and no reciprocal per element: none at all in SigLIP's G, one scalar
    division (d0) per column half in InfoNCE's, which the pipeliner may copy."""
    case, result = CASES[name], compiled[name]
    if "skip" in result or "error" in result:
        pytest.skip("reported by test_compiles_within_occupancy")
    config = case.config
    assert config.ctas == 2 or config.num_warps == 8, f"{name}: sized for {config.ctas} CTAs"
    assert result["descriptors"] and result["tma"], f"{name}: no TMA"
    assert result["exp2"][0] == 1, f"{name}: {result['exp2']} exp2 per element"
    assert max(result["exp2"]) <= 2, f"{name}: {result['exp2']} exp2 per element"
    limit = 0 if "siglip" in name else 4  # InfoNCE's G: d0, per column half
    assert result["reciprocals"] <= limit, f"{name}: {result['reciprocals']} reciprocals"


def main(parts: list[str]) -> None:
    results = {"triton": triton.__version__}
    for name, case in CASES.items():
        if parts and not any(part in name for part in parts):
            continue
        try:
            results[name] = compile_for_hopper(case)
        except TypeError as e:  # the ahead-of-time API of this Triton version differs
            results[name] = {"skip": f"Triton's ahead-of-time API differs here: {e}"}
        except Exception as e:  # a compile error is a finding: report it per case
            results[name] = {"error": f"{type(e).__name__}: {str(e)[-1500:]}"}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
