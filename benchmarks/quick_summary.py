"""summary.md from a gpu_quick.py run: where and how it ran, the targets, then each part's table.

python benchmarks/quick_summary.py quick.json [--tests tests.log] [--note TEXT ...]
                                   [--process PARTS EXIT LIMIT_S ...] [--out summary.md]

``--process`` reports how each gpu_quick.py process ended (``gpu_quick.sh`` runs one per group
of parts): its comma-separated parts, its exit status ("skipped" if it never started) and its
limit. A part whose process ended while it was still "not started", "running" or "interrupted"
(or before it wrote anything) gets the status that explains it, in the JSON too: every part
has a status there, whatever was killed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from tuning import EAGER, choices

TITLES = {"contrastive": "InfoNCE (CLIP)", "siglip": "SigLIP"}
LEGEND = (
    "Times: median ms of runs back to back on the GPU (CUDA events; p20–p80 in brackets), fixed "
    "tiles, no autotuning. TFLOP/s: 2·N²·D FLOPs per matmul pass, counted as each "
    "implementation executes them (in brackets, from fastclip.registry; eager stores S) and, "
    "separately, at the floor of an implementation that does not store S. "
    "Peak MiB: allocated on top of the inputs, against the bound N·D·8 bytes + the G buffer. "
    "Errors: relative norm error of dL/dx and dL/dy in bf16 against the fp32 PyTorch path on the "
    "same (bf16) inputs; floor: the fp32 gradient rounded to bf16; ✓: within tolerance "
    "(benchmarks/tuning.py). Predicted: fastclip.costs on the constants of the {model}."
)
# Statuses gpu_quick.py leaves when its process ends from outside.
UNFINISHED = ("not started", "running", "interrupted")


def model_name(results: dict) -> str:
    """The GPU whose constants ``fastclip.costs`` predicted with."""
    return results.get("model_device") or "NVIDIA H200"


def predicted(results: dict, what: str = "predicted ms") -> str:
    """A predicted column's head, naming the constants: "predicted ms (H100 constants)"."""
    words = model_name(results).split()
    model = words[1] if words[0] == "NVIDIA" and len(words) > 1 else words[0]
    default = ", the default" if "default" in model_name(results) else ""
    return f"{what} ({model} constants{default})"


def num(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def timing(row: dict | None) -> str:
    """A row's time with its spread, or what stopped it."""
    if row is None:
        return "–"
    if row.get("oom"):
        return "OOM"
    if "ms" not in row:
        return "error" if "error" in row else "not run"
    spread = f" ({num(row['p20'])}–{num(row['p80'])})" if "p20" in row else ""
    return num(row["ms"]) + spread


def timing_short(row: dict | None) -> str:
    """A row's median time alone."""
    return num(row["ms"]) if row and "ms" in row else timing(row)


def ratio(base: dict | None, ours: dict | None) -> float | None:
    if not base or not ours or "ms" not in base or "ms" not in ours:
        return None
    return base["ms"] / ours["ms"]


def times(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def errs(row: dict, names=("dx", "dy")) -> str:
    err = row.get("err")
    return " / ".join(f"{err[n]:.2e}" for n in names) if err else "–"


def table(head: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * left + "---:|" * (len(head) - left)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows] + [""]


def find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def best(results: dict, op: str, n: int) -> dict | None:
    """The row of the implementation ``auto`` would run for (op, n): the fastest within
    tolerance (``tuning.choices``)."""
    pick = next((c["pick"] for c in choices(results) if c["op"] == op and c["N"] == n), None)
    return find(results.get("losses", []), op=op, N=n, impl=pick) if pick else None


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------


def _loss_targets(results: dict, op: str, n: int, ms: float, speedup: float) -> list[tuple]:
    rows = results.get("losses", [])
    ours, eager = best(results, op, n), find(rows, op=op, N=n, impl="eager")
    name = f"{TITLES[op]}, N={n:,}, D={LOSSES_D[op]}, forward+backward"
    measured = None if ours is None else f"{ours['impl']}: {num(ours['ms'])} ms"
    gain = ratio(eager, ours)
    return [
        (f"{name} ≤ {ms} ms", measured, None if ours is None else ours["ms"] <= ms),
        (
            f"{name} ≥ {speedup}× eager",
            times(gain) if gain else None,
            None if gain is None else gain >= speedup,
        ),
    ]


LOSSES_D = {"contrastive": 512, "siglip": 768}


def targets(results: dict) -> list[tuple[str, str | None, bool | None]]:
    """(target, what was measured, met) for each target of the benchmarks (H100/H200, bf16)."""
    out = _loss_targets(results, "contrastive", 65536, 32, 3.5)
    out += _loss_targets(results, "siglip", 65536, 33, 2.5)
    pick = next((c["pick"] for c in choices(results) if c["N"] == 2**20), None)
    large = find(results.get("large", []), N=2**20, impl=pick) if pick else None
    if large:
        peak = large.get("peak_mib")
        met = large["ms"] <= 8000 and peak is not None and peak * 2**20 <= 5e9
        text = f"{large['impl']}: {large['ms'] / 1e3:.2f} s, {num(peak)} MiB"
        out.append(("InfoNCE, N=1,048,576, D=512: ≤ 8 s within 5 GB", text, met))
    else:
        out.append(("InfoNCE, N=1,048,576, D=512: ≤ 8 s within 5 GB", None, None))
    forward = find(results.get("forward", []), op="contrastive", N=65536, provider="fastclip")
    tflops = forward.get("tflops") if forward else None
    out.append(
        (
            "InfoNCE forward, N=65,536: ≥ 450 TFLOP/s",
            num(tflops) if tflops else None,
            None if tflops is None else tflops >= 450,
        )
    )
    for op in LOSSES_D:
        rows = results.get("losses", [])
        gain = ratio(find(rows, op=op, N=4096, impl="eager"), best(results, op, 4096))
        out.append(
            (
                f"{TITLES[op]}, N=4,096: ≥ 1× eager",
                times(gain) if gain else None,
                None if gain is None else gain >= 1,
            )
        )
    ours = [
        r
        for r in results.get("losses", []) + results.get("large", [])
        if r["impl"] != EAGER and r.get("peak_mib") is not None
    ]
    over = [f"{r['op']} {r['impl']} N={r['N']:,}" for r in ours if r["peak_mib"] > r["bound_mib"]]
    out.append(
        (
            "peak extra memory ≤ N·D·8 bytes + the buffer",
            (
                f"{len(ours) - len(over)} of {len(ours)} cases"
                + (f"; over: {', '.join(over)}" if over else "")
            )
            if ours
            else None,
            None if not ours else not over,
        )
    )
    retrieval = results.get("retrieval", [])
    for text, op, base, goal in (
        ("similarity, 16,384², ≥ 0.9× cuBLAS", "similarity", "cublas", 0.9),
        ("top-k, 65,536, k=10, ≥ 3× eager", "topk", "eager", 3),
    ):
        n = 16384 if op == "similarity" else 65536
        gain = ratio(
            find(retrieval, op=op, N=n, provider=base),
            find(retrieval, op=op, N=n, provider="fastclip"),
        )
        out.append((text, times(gain) if gain else None, None if gain is None else gain >= goal))
    projection = [r for r in results.get("projection", []) if r["mode"] == "forward+backward"]
    for base, goal in (("eager", 1.3), ("compile", 1.0)):
        gain = ratio(
            find(projection, N=32768, provider=base), find(projection, N=32768, provider="fastclip")
        )
        out.append(
            (
                f"projection, N=32,768, 768→512, forward+backward ≥ {goal}× {base}",
                times(gain) if gain else None,
                None if gain is None else gain >= goal,
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


def header(results: dict, tests: str | None, notes: list[str]) -> list[str]:
    gpu = results.get("gpu")
    if gpu:
        facts = [f"{results.get('sms')} SMs", f"{num(results.get('memory_gib'))} GiB"]
        if results.get("l2_mib"):
            facts.append(f"L2 {num(results['l2_mib'])} MiB")
        where = f"{gpu} ({', '.join(facts)}), CUDA {results.get('cuda')}"
    else:
        where = f"none: CPU ({results.get('cpu')}), Triton's interpreter, tiny sizes"
    configs = "; ".join(config_text(name, c) for name, c in results.get("configs", {}).items())
    parts = "; ".join(
        f"{name}: {p.get('status')}"
        + (f", {p['seconds']} s" if "seconds" in p else "")
        + (f" (limit {p['limit_s']} s)" if "limit_s" in p else "")
        for name, p in results.get("parts", {}).items()
    )
    lines = [
        "# fastclip quick GPU run",
        "",
        f"- GPU: {where}",
        f"- torch {results.get('torch')}, triton {results.get('triton')}, "
        f"Python {results.get('python')}; cuBLAS fp32 output from bf16: "
        f"{'native (out_dtype)' if results.get('out_dtype_gemm') else 'widened operands'}",
        f"- Date: {results.get('date')}",
        f"- Tiles, each kernel's first autotune config that fits: {configs}; G buffer "
        f"{num(results.get('block_bytes', 0) / 2**20)} MiB",
        f"- Parts: {parts}",
    ]
    if tests:
        lines.append(f"- CUDA tests: {tests}")
    lines += [f"- {note}" for note in notes]
    return [*lines, "", LEGEND.format(model=model_name(results)), ""]


def config_text(name: str, config: dict) -> str:
    """One entry of gpu_quick's "configs" as text: InfoNCE G 128×128×64, 8 warps, 3 stages."""
    if "blocks" not in config:
        return f"{name}: {config}"
    blocks = "×".join(str(size) for size in config["blocks"].values())
    cap = f", maxnreg {config['maxnreg']}" if config.get("maxnreg") else ""
    return f"{name} {blocks}, {config['warps']} warps, {config['stages']} stages{cap}"


def section_targets(results: dict) -> list[str]:
    mark = {True: "yes", False: "**no**", None: "–"}
    rows = [[t, m or "not measured", mark[met]] for t, m, met in targets(results)]
    return ["## Targets", "", *table(["target (H100/H200, bf16)", "measured", "met"], rows)]


def section_bandwidth(results: dict) -> list[str]:
    rows = [
        [r["what"], num(r["buffer_mib"]), timing(r), num(r.get("gb_s"))]
        for r in results.get("bandwidth", [])
    ]
    return ["## Bandwidth", "", *table(["what", "buffer MiB", "ms", "GB/s"], rows)] if rows else []


def section_cublas(results: dict) -> list[str]:
    rows = results.get("cublas", [])
    if not rows:
        return []
    products = list(dict.fromkeys(r["product"] for r in rows))
    cells = []
    for shape in dict.fromkeys((r["R"], r["C"], r["D"]) for r in rows):
        R, C, D = shape
        by = {r["product"]: r for r in rows if (r["R"], r["C"], r["D"]) == shape}
        uses = next(iter(by.values()))["uses"]
        cells.append(
            [f"{R:,} × {C:,}", str(D), "; ".join(uses)]
            + [f"{timing_short(by.get(p))} ({num(by.get(p, {}).get('tflops'))})" for p in products]
        )
    note = (
        "ms per block (TFLOP/s): one pass over the N×N matrix runs the product once per block, "
        "the count in brackets after each case. S: the block's dots into fp32 (blocks-mm) or "
        "bf16; G Y and G^T X accumulate into fp32 as the bounded-block backward does."
    )
    head = ["R × C", "D", "used by", *products]
    return ["## cuBLAS at the block shapes", "", note, "", *table(head, cells, left=3)]


def section_block_configs(results: dict) -> list[str]:
    rows = [
        [TITLES[r["op"]], f"{r['N']:,}", str(r["D"]), r["config"], timing(r), num(r.get("tflops"))]
        for r in results.get("block_configs", [])
    ]
    if not rows:
        return []
    head = ["loss", "N", "D", "G kernel tiles", "ms", "TFLOP/s (1 pass)"]
    return ["## G kernel tiles (one G pass)", "", *table(head, rows, left=4)]


def stages(row: dict) -> str:
    measured, predicted = row.get("stages_ms") or {}, row.get("predicted_stages_ms") or {}
    return " · ".join(
        f"{name} {num(ms)} ({num(predicted.get(name))})" for name, ms in measured.items()
    )


def section_loss(results: dict, op: str) -> list[str]:
    rows = [r for r in results.get("losses", []) if r["op"] == op]
    if not rows:
        return []
    cells = []
    for r in rows:
        eager = find(rows, N=r["N"], impl="eager")
        fp = r["floor"]
        cells.append(
            [
                f"{r['N']:,}",
                r["impl"],
                timing(r),
                f"{num(r.get('tflops'))} ({r['passes']})",
                f"{num(r.get('tflops_floor'))} ({r['floor_passes']})",
                times(ratio(eager, r)) if r["impl"] != "eager" else "",
                num(r.get("peak_mib")),
                num(r.get("bound_mib")),
                num(r.get("predicted_ms")),
                stages(r),
                errs(r),
                f"{fp['dx']:.1e} / {fp['dy']:.1e}",
                {True: "✓", False: "✗"}.get(r.get("ok"), "–"),
            ]
        )
    head = [
        "N",
        "implementation",
        "ms",
        "TFLOP/s executed (passes)",
        "TFLOP/s floor (passes)",
        "vs eager",
        "peak MiB",
        "bound MiB",
        predicted(results),
        predicted(results, "stages ms (predicted)"),
        "error dx / dy",
        "floor dx / dy",
        "ok",
    ]
    first = rows[0]
    title = f"## {TITLES[op]}, D={first['D']}, {first['dtype']}, forward+backward"
    lines = [title, "", *table(head, cells, left=2)]
    failed = [f"{r['impl']} N={r['N']:,}: {r['error']}" for r in rows if "error" in r]
    lines += [f"- {f}" for f in failed] + ([""] if failed else [])
    forward = [r for r in results.get("forward", []) if r["op"] == op]
    cells = []
    for n in sorted({r["N"] for r in forward}):
        ours, eager = find(forward, N=n, provider="fastclip"), find(forward, N=n, provider="eager")
        cells.append(
            [
                f"{n:,}",
                timing(ours),
                num((ours or {}).get("tflops")),
                num((ours or {}).get("predicted_ms")),
                timing(eager),
                num((eager or {}).get("tflops")),
                times(ratio(eager, ours)),
            ]
        )
    if cells:
        head = ["N", "fastclip ms", "TFLOP/s", predicted(results)]
        head += ["eager ms", "TFLOP/s", "vs eager"]
        lines += [f"Evaluation forward (no grad, 1 pass), {TITLES[op]}:", "", *table(head, cells)]
    return lines


def section_confident(results: dict) -> list[str]:
    rows = results.get("confident", [])
    if not rows:
        return []
    cells = [
        [
            TITLES[r["op"]],
            f"{r['N']:,}",
            str(r["D"]),
            f"{num(r['scale'])}" + (f", bias {num(r['bias'])}" if r.get("bias") else ""),
            r["impl"],
            f"{r['loss_err']:.1e}" if "loss_err" in r else "–",
            errs(r),
            f"{r['floor']['dx']:.1e} / {r['floor']['dy']:.1e}",
            {True: "✓", False: "✗"}.get(r.get("ok"), "–"),
        ]
        for r in rows
    ]
    gaps = {r["op"]: r["median_gap"] for r in rows if "median_gap" in r}
    note = (
        f"Texts = images + 5% noise; errors against float64 on the same {rows[0]['dtype']} inputs"
        + (f"; the median row's 1 − p_ii is {gaps['contrastive']:.1e}" if gaps else "")
        + "."
    )
    head = [
        "loss",
        "N",
        "D",
        "scale",
        "implementation",
        "loss error",
        "error dx / dy",
        "floor dx / dy",
        "ok",
    ]
    return ["## Confident batch", "", note, "", *table(head, cells, left=5)]


def section_large(results: dict) -> list[str]:
    rows = results.get("large", [])
    if not rows:
        return []
    cells = [
        [
            f"{r['N']:,}",
            r["impl"] + (" (auto's)" if r.get("auto") else ""),
            num(r.get("forward_ms")),
            num(r.get("backward_ms")),
            num(r.get("ms")),
            f"{num(r.get('tflops'))} ({r['passes']})",
            f"{num(r.get('tflops_floor'))} ({r['floor_passes']})",
            num(r.get("peak_mib")),
            num(r.get("bound_mib")),
            num(r.get("predicted_ms")),
            " · ".join(f"{k} {num(v)}" for k, v in r.get("predicted_stages_ms", {}).items()),
        ]
        for r in rows
    ]
    head = [
        "N",
        "implementation",
        "forward ms",
        "backward ms",
        "total ms",
        "TFLOP/s executed",
        "TFLOP/s floor",
        "peak MiB",
        "bound MiB",
        predicted(results),
        predicted(results, "predicted stages ms"),
    ]
    title = (
        f"## InfoNCE at N = {rows[0]['N']:,}, D={rows[0]['D']}, {rows[0]['dtype']} (one run each)"
    )
    return [title, "", *table(head, cells, left=2)]


def section_others(results: dict) -> list[str]:
    baseline = {"similarity": "cublas", "topk": "eager", "projection": "eager"}
    rows = results.get("retrieval", []) + results.get("projection", [])
    if not rows:
        return []
    cells = []
    for r in rows:
        base = find(rows, op=r["op"], mode=r["mode"], N=r["N"], provider=baseline[r["op"]])
        gain = ratio(base, r) if r["provider"] == "fastclip" else None
        cells.append(
            [
                r["op"],
                r["mode"],
                f"{r['N']:,}",
                str(r["D"]),
                r["provider"],
                timing(r),
                num(r.get("tflops")),
                num(r.get("peak_mib")),
                f"{times(gain)} {baseline[r['op']]}" if gain else "",
                num(r.get("compile_s")),
            ]
        )
    head = [
        "op",
        "mode",
        "N",
        "D",
        "provider",
        "ms",
        "TFLOP/s",
        "peak MiB",
        "fastclip vs",
        "compile s",
    ]
    return ["## Similarity, top-k and the normalized projection", "", *table(head, cells, left=5)]


def section_tuning(results: dict) -> list[str]:
    picks = choices(results)
    if not picks:
        return []
    cells = [
        [
            TITLES[c["op"]],
            c["dtype"],
            str(c["D"]),
            f"{c['N']:,}",
            c["pick"] or "none",
            "; ".join(f"{i}: {why}" for i, why in c["rejected"].items()),
        ]
        for c in picks
    ]
    note = (
        "What `python benchmarks/tuning.py` writes to fastclip/tuning.json from this run: the "
        "fastest implementation within tolerance."
    )
    head = ["loss", "dtype", "D", "N", "auto runs", "rejected"]
    return ["## auto's table", "", note, "", *table(head, cells, left=5)]


SECTIONS: tuple[Callable[[dict], list[str]], ...] = (
    section_targets,
    section_bandwidth,
    section_cublas,
    section_block_configs,
    lambda results: section_loss(results, "contrastive"),
    lambda results: section_loss(results, "siglip"),
    section_confident,
    section_large,
    section_others,
    section_tuning,
)


def summary(results: dict, tests: str | None = None, notes: list[str] = ()) -> str:
    lines = header(results, tests, list(notes))
    for section in SECTIONS:
        lines += section(results)
    return "\n".join(lines)


def tests_line(log: str) -> str | None:
    """pytest's closing line ("12 passed, 3 skipped in 40s"), or None."""
    found = re.findall(
        r"^=*\s*(\d+ (?:passed|failed|error|skipped|deselected).*?)\s*=*$", log, re.M
    )
    return found[-1] if found else None


def ended(code: str, limit: str, state: str | None) -> str:
    """The status of a part left ``state`` (None: never written) by a process that ended with
    exit status ``code`` (timeout's 124 or 137 at its limit of ``limit`` seconds)."""
    if code == "skipped":
        return "skipped: the run's budget was spent before its process"
    stopped = {
        "124": f"stopped at its {limit} s limit",
        "137": f"killed at its {limit} s limit (SIGINT ignored)",
    }.get(code)
    if state in ("running", "interrupted"):
        return f"{stopped} in this part" if stopped else f"process exit {code} in this part"
    if stopped:
        return f"not reached: its process was {stopped}"
    return f"not reached: its process ended with exit status {code}"


def reconcile(results: dict, processes: list[list[str]]) -> list[str]:
    """Give each part of ``processes`` ([parts, exit status, limit]) whose status its process
    left unfinished the one that explains it; returns a line per process for the summary."""
    statuses = results.setdefault("parts", {})
    lines = []
    for names, code, limit in processes:
        for name in names.split(","):
            part = statuses.setdefault(name, {})
            if part.get("status") in (None, *UNFINISHED):
                part["status"] = ended(code, limit, part.get("status"))
        lines.append(f"{names.replace(',', ', ')}: exit {code} (limit {limit} s)")
    return lines


def write_json(path: Path, data: dict) -> None:
    """Replace ``path`` atomically, through ``<name>.partial`` (gpu_quick.py's temporary)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1))
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the JSON gpu_quick.py wrote")
    parser.add_argument("--tests", type=Path, help="the CUDA tests' log")
    parser.add_argument("--note", action="append", default=[], help="extra line for the header")
    parser.add_argument(
        "--process",
        nargs=3,
        action="append",
        default=[],
        metavar=("PARTS", "EXIT", "LIMIT_S"),
        help="how a gpu_quick.py process ended: its parts (a,b), exit status or 'skipped', limit",
    )
    parser.add_argument("--out", type=Path, help="default: summary.md beside the results")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    if args.process:
        processes = reconcile(results, args.process)
        write_json(args.results, results)
        args.note.append("gpu_quick.py processes: " + "; ".join(processes))
    tests = None
    if args.tests and args.tests.exists():
        tests = tests_line(args.tests.read_text()) or "no result line (stopped?)"
    out = args.out or args.results.with_name("summary.md")
    out.write_text(summary(results, tests, args.note))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
