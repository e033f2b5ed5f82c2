"""Every autotune config compiles for Hopper (sm_90), fits shared memory and does not spill.

Triton compiles ahead of time without a GPU, so this runs on any machine: it catches what the
interpreter cannot (tl.dot shape limits, shared memory, register spills) before a GPU does.
Arguments are specialized as the JIT would for contiguous, 16-byte aligned inputs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import triton

import fastclip.kernels.contrastive as kc
import fastclip.kernels.projection as kproj
import fastclip.kernels.siglip as ks
import fastclip.kernels.similarity as ksim
import fastclip.kernels.tiles as tiles

H100_SHARED_MEMORY = 232448  # bytes per block, opt-in maximum
# Sizes compiled as multiples of 16, as the JIT specializes them for the usual widths (512, 768).
DIVISIBLE = ("D", "n_in", "n_out")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

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


def compile_for_hopper(fn, pointers: dict[str, str], constants: dict, config: triton.Config):
    """Compile ``fn`` for sm_90 and return (shared memory bytes, registers, spill stack bytes)."""
    constants = {**constants, **config.kwargs}
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
    source = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    kernel = triton.compile(
        source,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    cubin = kernel.asm["cubin"]
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fastclip-{os.getpid()}.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    try:
        usage = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.remove(path)
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return kernel.metadata.shared, int(regs), int(stack)


FEATURES = {"x_ptr": "bf16", "y_ptr": "bf16", "a_ptr": "bf16", "b_ptr": "bf16", "q_ptr": "bf16",
            "k_ptr": "bf16", "g_ptr": "bf16"}  # fmt: skip
FP32 = ("scale_ptr", "bias_ptr", "x_ref_ptr", "y_ref_ptr", "row_part_ptr", "col_part_ptr",
        "acc_ptr", "parts_ptr", "a_stats_ptr", "b_stats_ptr", "dots_ptr", "sums_ptr", "out_ptr",
        "inv_a_ptr", "inv_b_ptr", "inv_q_ptr", "inv_k_ptr")  # fmt: skip


def cases() -> dict[str, tuple]:
    """name -> (kernel, pointer dtypes, constants, config) for every config the launchers use."""
    bf16 = {**FEATURES, **dict.fromkeys(FP32, "fp32"), "grad_ptr": "bf16"}
    fp32 = dict.fromkeys(bf16, "fp32")
    smallest = lambda configs: min(configs, key=lambda c: c.kwargs["BM"] * c.kwargs["BN"])  # noqa: E731
    out = {}
    for c in kc._FORWARD_CONFIGS:
        for col in (True, False):
            const = {"COL_STATS": col, "DOT_PRECISION": "ieee"}
            out[f"forward-{c}-col{col}"] = (kc._forward_kernel, bf16, const, c)
    for c in kc._BLOCK_CONFIGS:
        for given in (False, True):
            const = {"B_TERM": True, "DOTS_GIVEN": given, "DOT_PRECISION": "ieee"}
            out[f"block-{c}-dots{given}"] = (kc._gradient_block_kernel, bf16, const, c)
    for c in kc._BACKWARD_CONFIGS:
        const = {"A_TERM": True, "B_TERM": True, "DOT_PRECISION": "ieee"}
        out[f"backward-{c}"] = (kc._backward_kernel, bf16, const, c)
    for precision in ("ieee", "tf32"):  # fp32 features: the configs pruning keeps as fallback
        const = {"COL_STATS": True, "DOT_PRECISION": precision}
        out[f"forward-fp32-{precision}"] = (kc._forward_kernel, fp32, const, smallest(
            kc._FORWARD_CONFIGS))  # fmt: skip
        const = {"B_TERM": True, "DOTS_GIVEN": False, "DOT_PRECISION": precision}
        out[f"block-fp32-{precision}"] = (kc._gradient_block_kernel, fp32, const, smallest(
            kc._BLOCK_CONFIGS))  # fmt: skip
        const = {"A_TERM": True, "B_TERM": True, "DOT_PRECISION": precision}
        out[f"backward-fp32-{precision}"] = (kc._backward_kernel, fp32, const, smallest(
            kc._BACKWARD_CONFIGS))  # fmt: skip
    for c in ks._SWEEP_CONFIGS:
        for loss, grad in ((True, True), (False, True), (True, False)):
            const = {"HAS_BIAS": True, "HAS_PAIRS": True, "LOSS": loss, "GRAD": grad,
                     "DOT_PRECISION": "ieee"}  # fmt: skip
            out[f"siglip-{c}-loss{loss}-grad{grad}"] = (ks._sweep_kernel, bf16, const, c)
    for c in ks._BLOCK_CONFIGS:
        for given in (False, True):
            const = {"HAS_BIAS": True, "HAS_PAIRS": True, "DOTS_GIVEN": given,
                     "DOT_PRECISION": "ieee"}  # fmt: skip
            out[f"siglip-block-{c}-dots{given}"] = (ks._gradient_block_kernel, bf16, const, c)
    for c in ksim._SIMILARITY_CONFIGS:
        for norm in (False, True):
            const = {"HAS_BIAS": True, "NORMALIZE": norm, "DOT_PRECISION": "ieee", "GROUP": 8}
            out[f"similarity-{c}-normalize{norm}"] = (ksim._similarity_kernel, bf16, const, c)
    for width in (16, 32, 64, ksim.MAX_TOPK):
        t = ksim.topk_config(width)
        blocks = {"BM": t.block_m, "BN": t.block_n, "BK": t.block_k}
        c = triton.Config(blocks, num_warps=t.num_warps, num_stages=t.num_stages)
        const = {"NORMALIZE": True, "DOT_PRECISION": "ieee", "K": width}
        out[f"topk-{width}"] = (ksim._topk_kernel, {**bf16, "out_ptr": "i64"}, const, c)
    # Normalized projection. Forward: each config at the widest column block it can hold (as
    # pruned on an H100), registers-only and two-stage epilogue; backward: every config, the
    # fixed default tiles, fp32 fallbacks. eps, a float argument, is compiled as a constant.
    proj = {**bf16, "w_ptr": "bf16", "g_ptr": "bf16", "dx_ptr": "bf16"}
    proj.update(dict.fromkeys(("norm_ptr", "yg_ptr", "dw_ptr", "db_ptr"), "fp32"))
    proj32 = dict.fromkeys(proj, "fp32")
    for c in kproj._FORWARD_CONFIGS:
        for wide, widths in ((False, (512, 256, 128)), (True, (256, 128))):
            meta = {"WIDE": wide, "DOT_PRECISION": "ieee", "HAS_BIAS": True}
            width = next((w for w in widths if kproj.fitting(
                "forward", [c], {**meta, "BO": w}, 2, H100_SHARED_MEMORY)), None)  # fmt: skip
            if width is not None:  # else pruned for every width
                const = {**meta, "BO": width, "eps": 1e-12}
                out[f"projection-forward-{c}-BO{width}-wide{wide}"] = (
                    kproj._forward_kernel, proj, const, c)  # fmt: skip
    default = tiles.TileConfig()  # the backward's tiles without autotuning
    fixed = triton.Config({"BM": default.block_m, "BO": default.block_n, "BI": default.block_d},
                          num_warps=default.num_warps, num_stages=default.num_stages)  # fmt: skip
    for c in [*kproj._DX_CONFIGS, fixed]:
        const = {"DX": True, "DOT_PRECISION": "ieee", "eps": 1e-12}
        out[f"projection-dx-{c}"] = (kproj._dx_kernel, proj, const, c)
    for c in [*kproj._DW_CONFIGS, fixed]:
        for db in (True, False):
            const = {"DW": True, "DB": db, "DOT_PRECISION": "ieee", "eps": 1e-12}
            out[f"projection-dw-{c}-db{db}"] = (kproj._dw_kernel, proj, const, c)
    const = {"DX": False, "DOT_PRECISION": "ieee", "eps": 1e-12}
    out["projection-dx-statistic-only"] = (kproj._dx_kernel, proj, const, kproj._DX_CONFIGS[0])
    const = {"DW": False, "DB": True, "DOT_PRECISION": "ieee", "eps": 1e-12}
    out["projection-dw-bias-only"] = (kproj._dw_kernel, proj, const, kproj._DW_CONFIGS[0])
    for precision in ("ieee", "tf32"):  # fp32: the configs pruning keeps as fallbacks
        const = {"HAS_BIAS": True, "WIDE": False, "DOT_PRECISION": precision, "BO": 512,
                 "eps": 1e-12}  # fmt: skip
        c = kproj.fitting("forward", kproj._FORWARD_CONFIGS, {"BO": 512}, 4, H100_SHARED_MEMORY)[0]
        out[f"projection-forward-fp32-{precision}"] = (kproj._forward_kernel, proj32, const, c)
        const = {"DX": True, "DOT_PRECISION": precision, "eps": 1e-12}
        out[f"projection-dx-fp32-{precision}"] = (kproj._dx_kernel, proj32, const, fixed)
        const = {"DW": True, "DB": True, "DOT_PRECISION": precision, "eps": 1e-12}
        out[f"projection-dw-fp32-{precision}"] = (kproj._dw_kernel, proj32, const, fixed)
    rows = triton.Config({"BM": tiles.ROWS, "BD": 128}, num_warps=4, num_stages=1)
    out["finalize"] = (tiles.finalize_kernel, bf16, {}, rows)
    out["row-dot"] = (tiles.row_dot_kernel, bf16, {}, rows)
    return out


@pytest.fixture(scope="module")
def compiled() -> dict:
    """Compile everything in a child process: under TRITON_INTERPRET=1 (set by conftest.py on
    CPU machines) kernels are interpreted functions, which cannot be compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, timeout=1200
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(cases()))
def test_compiles_without_spills(compiled, name):
    result = compiled[name]
    if "skip" in result:
        pytest.skip(result["skip"])
    assert "error" not in result, f"{name}: {result['error']}"
    assert result["shared"] <= H100_SHARED_MEMORY, f"{name}: {result['shared']} B shared memory"
    if "fp32" not in name:  # fp32 features (products on FMA units or TF32) are the slow path
        assert result["stack"] == 0, f"{name}: {result['regs']} regs, {result['stack']} B spilled"


def main() -> None:
    results = {}
    for name, (fn, pointers, constants, config) in cases().items():
        try:
            shared, regs, stack = compile_for_hopper(fn, pointers, constants, config)
            results[name] = {"shared": shared, "regs": regs, "stack": stack}
        except TypeError as e:  # the ahead-of-time API of this Triton version differs
            results[name] = {"skip": f"Triton's ahead-of-time API differs here: {e}"}
        except Exception as e:  # a compile error is a finding: report it per case
            results[name] = {"error": f"{type(e).__name__}: {str(e)[-1500:]}"}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
