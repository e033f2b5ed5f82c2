"""The benchmarks' runner: the case files' parts, each under a time limit, within a budget.

    python benchmarks/run.py [--out quick.json] [--merge] [--budget SECONDS] [--parts a,b]
                             [--tiny]
    TRITON_INTERPRET=1 python benchmarks/run.py --tiny --out runs/quick.json   # a CPU

The five-minute GPU run (``gpu_quick.sh``) is this runner within its budget, a process per group
of parts; ``pytest benchmarks/ --benchmark-only`` runs the case files' grids through the same
measurement (``harness.Bench.measure``). No autotuning (FASTCLIP_AUTOTUNE=0): every kernel
launches the first config of its autotune list that fits the GPU, one the Hopper compile test
checks; the JSON's "configs" names them. The JSON (``results.py``) is rewritten atomically after
every measurement, so a part stopped at its limit, or a killed process, keeps what finished;
each part's status is in its "parts", "running" until the part ends. --merge adds the parts run
to an existing JSON, replacing their earlier rows and keeping the others'. ``render.py`` turns
it into summary.md, ``tuning.py`` into fastclip/tuning.json.

--tiny runs every part at tiny sizes. On a GPU it compiles the kernels the full run launches
(Triton caches them on disk). On a CPU, with TRITON_INTERPRET=1, it runs every line through
Triton's interpreter in about a minute, at feature widths of 32 and in fp16 (the interpreter's
bf16 products are wrong): its times mean nothing.

Parts, in this order (``--parts`` picks some, in the order given), each beside its cases:
bandwidth, cublas (``probes.py``); contrastive (``bench_contrastive.py``); siglip
(``bench_siglip.py``); confident (both losses' confident batch); graphs (both losses at
N = 4,096, a full step in a CUDA graph: ``losses.graphed``); retrieval
(``bench_retrieval.py``); projection (``bench_projection.py``); large (``bench_contrastive.py``);
block-configs, tma (``probes.py``); compile (``bench_projection.py``).

Limits on an H100 or H200, in seconds, enforced (and capped by --budget; ``gpu_quick.sh`` also
runs each process under a hard limit of its parts' limits plus ~4 s to start Python, torch and
CUDA). The estimates are not measurements: they take the 2026-11-27 H200 run's rates (InfoNCE at
N = 65,536: forward 16.4 ms, fused forward+backward 132 ms, eager 114 ms and its forward 50 ms;
SigLIP: fused 204 ms, eager 83 ms; an H100 has ~30% less HBM bandwidth and the same compute),
``fastclip.costs``' predictions for what never ran (blocks, blocks-mm and persistent 38-42 ms
at 65,536 and 9.8-10.7 s at 2^20), and guesses (g) for compilation, which gpu_quick.sh mostly
does beforehand. A case runs ~11 times (error, memory, a probe, up to 9 timed runs filling
0.4 s), a stage ~11 times:

  | part          | limit | estimate | how                                                   |
  |---------------|------:|---------:|-------------------------------------------------------|
  | bandwidth     |     6 |        2 | 2 GiB streamed ~22 times at 3-4 TB/s: 0.8 s           |
  | cublas        |    10 |        3 | 8 shapes x 4 products x 11 runs of 0.05-3 ms          |
  | contrastive   |    28 |        8 | N = 65,536: fp32 reference 0.5, forwards 0.7, eager   |
  |               |       |          | 6 x 114 ms, blocks, blocks-mm and persistent 11 x 42  |
  |               |       |          | ms + stages 0.7 each, fused 6 x 132 ms + stages 0.8:  |
  |               |       |          | ~7 s; the smaller N ~1 s; 20 s more if nothing was    |
  |               |       |          | compiled (g)                                          |
  | siglip        |    28 |        9 | N = 65,536: reference 0.7, eager 7 x 83 ms, blocks    |
  |               |       |          | 1.3, blocks-mm 1.4, persistent 1.3, fused 11 x 204    |
  |               |       |          | ms: ~8 s                                              |
  | confident     |    10 |        2 | N = 4,096: float64 on the GPU, 4 bf16 runs per loss   |
  | graphs        |     6 |        2 | N = 4,096: 5 providers x 2 losses, a capture and ~11  |
  |               |       |          | replays of < 1 ms each                                |
  | retrieval     |    10 |        4 | top-k at 65,536: eager ~40 ms (g), fastclip ~20 ms;   |
  |               |       |          | 2 kernels to compile if not yet (g)                   |
  | projection    |     6 |        2 | runs under 1 ms                                       |
  | large         |    25 |       25 | auto's pick (the model: 9.8 s), then persistent       |
  |               |       |          | (10.4 s), then the others, which the limit stops      |
  | block-configs |    15 |        6 | 13 G passes of ~1.5 ms and 3 forwards x 11; compiled  |
  |               |       |          | beforehand                                            |
  | tma           |    10 |        4 | 6 passes of ~1.5 ms x 11, 4 kernels to compile (g)    |
  | compile       |    22 |       20 | Inductor compiling a forward and a backward (g)       |
  | sum           |   176 |       89 | plus ~4 s per process to start Python, torch, CUDA    |
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import bench_contrastive
import bench_projection
import bench_retrieval
import bench_siglip
import probes
import torch
from harness import Bench, facts, settle
from losses import graphed
from results import Results

import fastclip.kernels.contrastive as kc
import fastclip.kernels.fused as kf
import fastclip.kernels.persistent as kpersistent
import fastclip.kernels.persistent_siglip as kpsiglip
import fastclip.kernels.projection as kp
import fastclip.kernels.projection_backward as kpb
import fastclip.kernels.siglip as ks
import fastclip.kernels.similarity as ksim
from fastclip import costs
from fastclip.kernels.blocks import default_block_bytes, out_dtype_products
from fastclip.kernels.launch import INTERPRETER_CONFIG, first_fitting, interpreting


@dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[Bench], None]
    limit_s: float


def confident(bench: Bench) -> None:
    bench_contrastive.part_confident(bench)
    bench_siglip.part_confident(bench)


def graphs(bench: Bench) -> None:
    """Both losses at the smallest batch, a full step captured in a CUDA graph."""
    for loss in (bench_contrastive.INFONCE, bench_siglip.SIGLIP):
        graphed(bench, loss, bench.pick(bench_contrastive.BATCHES)[0])


PARTS = (  # most wanted first: a run short of time skips the last ones
    Part("bandwidth", probes.part_bandwidth, 6),
    Part("cublas", probes.part_cublas, 10),
    Part("contrastive", bench_contrastive.part_batches, 28),
    Part("siglip", bench_siglip.part_batches, 28),
    Part("confident", confident, 10),
    Part("graphs", graphs, 6),
    Part("retrieval", bench_retrieval.part_retrieval, 10),
    Part("projection", bench_projection.part_projection, 6),
    Part("large", bench_contrastive.part_large, 25),
    Part("block-configs", probes.part_block_configs, 15),
    Part("tma", probes.part_tma, 10),
    Part("compile", bench_projection.part_compile, 22),
)
MIN_PART_S = 3  # a part with less time left than this is skipped
# The runner's scales: timed runs per case at most, the losses' bounded buffer, feature width.
SCALES = {
    "full": {"max_runs": 10},
    "tiny": {"max_runs": 1, "block_bytes": 8 * 2**10},  # blocks of 64 x 64 for the losses
    # Narrower still for Triton's interpreter: it pays for every feature chunk in Python.
    "interpreted": {"max_runs": 1, "block_bytes": 8 * 2**10, "width": 32},
}
# The kernels the parts launch, by their autotuners: without autotuning each launches the first
# config of its list that its pruning keeps for the GPU (``launch.launch``). The projection's
# forward prunes by its output block, here the projection case's.
KERNELS = {
    "InfoNCE forward": (kc._forward_tuned, {}),
    "InfoNCE G": (kc._block_tuned, {}),
    "InfoNCE fused backward": (kf._backward_tuned, {}),
    "InfoNCE persistent forward": (kpersistent._forward_tuned, {}),
    "InfoNCE persistent G": (kpersistent._gradient_tuned, {}),
    "SigLIP persistent G": (kpsiglip._tuned, {}),
    "SigLIP sweep": (ks._sweep_tuned, {}),
    "SigLIP G": (ks._block_tuned, {}),
    "similarity": (ksim._similarity_tuned, {}),
    "projection forward": (
        kp._forward_tuned,
        {"BO": kp.output_block(bench_projection.PROJECTION[1]), "WIDE": False},
    ),
    "projection dx": (kpb._dx_tuned, {}),
    "projection dW": (kpb._dw_tuned, {}),
}


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


def describe(blocks: dict, config) -> dict:
    """A config (TileConfig or triton.Config) as the JSON's "configs" names it."""
    return {
        "blocks": dict(blocks),
        "warps": config.num_warps,
        "stages": config.num_stages,
        "maxnreg": config.maxnreg,
    }


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
        first = first_fitting(tuned, {"a_ptr": operand, **meta})
        configs[name] = describe(first.kwargs, first)
    return configs


def run_facts(device: torch.device, dtype: torch.dtype, scale: str, model: costs.Device) -> dict:
    """``harness.facts`` and how this runner runs: sizes, tiles, the cost model's constants."""
    found = facts(device)
    found.update(
        tiny=scale != "full",
        out_dtype_gemm=out_dtype_products(device.type),  # cuBLAS writes fp32 from bf16 directly
        autotune=False,
        block_bytes=SCALES[scale].get("block_bytes") or default_block_bytes(device),
        model_device=model.name,  # the constants fastclip.costs' predictions use
    )
    try:  # a fact, not a reason to lose the run
        found["configs"] = launched_configs(torch.empty(0, dtype=dtype, device=device))
    except Exception as error:  # noqa: BLE001
        found["configs"] = {"error": f"{type(error).__name__}: {error}"[:300]}
    return found


def run_part(bench: Bench, part: Part, status: dict, limit_s: float) -> None:
    """One part under its limit, its status kept up to date in the results."""
    print(f"=== {part.name} (limit {status['limit_s']} s)", flush=True)
    start = time.monotonic()
    status["status"] = "running"
    bench.results.start(part.name)
    bench.results.save()
    try:
        with time_limit(limit_s):
            part.run(bench)
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
            settle(bench.device)
        status["seconds"] = round(time.monotonic() - start, 1)
        bench.results.save()
        print(f"    {status['status']} after {status['seconds']} s", flush=True)


def run_parts(bench: Bench, parts: list[Part], budget_s: float) -> None:
    """Each part under min(its limit, what is left of the budget); its status, time and limit
    recorded in the JSON's "parts": "not started" for all of them first, then "running" while
    one runs, so that a process killed from outside leaves where it was."""
    deadline = time.monotonic() + budget_s
    statuses = bench.results.data["parts"]
    for part in parts:
        statuses[part.name] = {"status": "not started", "limit_s": part.limit_s}
    bench.results.save()
    for part in parts:
        left = deadline - time.monotonic()
        status = statuses[part.name] = {"limit_s": round(min(part.limit_s, left))}
        if left < MIN_PART_S:
            status["status"] = "skipped: the run's budget was spent"
            bench.results.save()
            continue
        run_part(bench, part, status, min(part.limit_s, left))


def arguments(argv: list[str] | None) -> argparse.Namespace:
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
        help="tiny sizes: on a GPU, compiles the kernels the full run launches; on a CPU (with "
        "TRITON_INTERPRET=1), runs the logic through Triton's interpreter",
    )
    args = parser.parse_args(argv)
    by_name = {part.name: part for part in PARTS}
    names = args.parts.split(",") if args.parts else list(by_name)
    unknown = [name for name in names if name not in by_name]
    if unknown:
        parser.error(f"unknown parts {unknown}; the parts are {list(by_name)}")
    args.parts = [by_name[name] for name in names]
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.type == "cpu" and not (args.tiny and interpreting()):
        parser.error("needs a CUDA device; on a CPU, run TRITON_INTERPRET=1 ... --tiny")
    return args


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    device = args.device
    os.environ["FASTCLIP_AUTOTUNE"] = "0"  # each kernel's first config that fits the GPU
    # SIGINT (the limit of timeout --signal=INT) raises KeyboardInterrupt, even where the process
    # was started with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Triton's interpreter computes padding lanes too (e.g. log2(0)); their values are masked out.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    scale = "full" if not args.tiny else "tiny" if device.type == "cuda" else "interpreted"
    # bf16 on a GPU; fp16 under Triton's interpreter, whose bf16 products are wrong.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    model = costs.device_constants(gpu)
    results = Results(args.out, run_facts(device, dtype, scale, model), merge=args.merge)
    bench = Bench(device, dtype, results, model, scale, **SCALES[scale])
    run_parts(bench, args.parts, args.budget)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
