"""summary.md and bench.png from benchmark results (``results.py``): where and how they ran,
the targets, then a table per section, and time and memory against N.

    python benchmarks/render.py RESULTS.json [MORE.json ...] [--out DIR] [--tests tests.log]
                                [--note TEXT ...] [--process PARTS EXIT LIMIT_S ...]
                                [--merge ALL.json] [--no-plot]

RESULTS.json: what the runner (``run.py``) or ``pytest benchmarks/ --benchmark-only
--benchmark-json=...`` wrote; several files (a run split into parts) make one summary, and
--merge writes them into one. ``--process`` reports how each runner process ended
(``gpu_quick.sh`` runs one per group of parts): its comma-separated parts, its exit status
("skipped" if it never started) and its limit; a part its process left unfinished gets the
status that explains it (``results.reconcile``), in the JSON too. Writes DIR/summary.md and,
unless --no-plot, DIR/bench.png; DIR defaults to the folder of the first file.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

from results import BASELINES, find, load, merge, reconcile, write_json
from targets import targets
from tuning import choices

TITLES = {
    "contrastive": "InfoNCE (CLIP)",
    "siglip": "SigLIP",
    "similarity": "Similarity",
    "topk": "Top-k retrieval",
    "projection": "Normalized projection",
}
MODES = ("eval", "forward", "backward", "full")
FIXED = "†"  # marks fastclip times measured without autotuning
LEGEND = (
    "Times: median ms of runs back to back on the device's timeline (CUDA events on a GPU; "
    f"p20–p80 in brackets); {FIXED} fastclip with its default tiles, not autotuned. Modes: eval "
    "(no gradients), forward (recording the graph), backward, full (forward and backward). "
    "TFLOP/s: 2·N²·D FLOPs per matmul pass (the projection: 2·N·D_in·D_out), counted as each "
    "provider executes them (in brackets, from fastclip.registry; eager stores S) and, "
    "separately, at the floor of an implementation that does not store S. Peak MiB: allocated "
    "on top of the inputs, against the bound N·D·8 bytes + the G buffer. Errors: relative norm "
    "error of dL/dx and dL/dy against the fp32 PyTorch path on the same (rounded) inputs (the "
    "confident batch: float64); floor: the exact gradient rounded to the dtype; ✓: within "
    "tolerance (benchmarks/tuning.py). vs: the baseline's time over the provider's. Predicted: "
    "fastclip.costs on the constants its column names."
)
Column = tuple[str, Callable[[dict], "str | None"]]  # (head, cell); None: the row has no value


def num(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def timing(row: dict | None, spread: bool = True) -> str:
    """A row's time (with its spread), or what stopped it."""
    if row is None:
        return "–"
    if row.get("oom"):
        return "OOM"
    if "ms" not in row:
        return "error" if "error" in row else "not run"
    spread = f" ({num(row['p20'])}–{num(row['p80'])})" if spread and "p20" in row else ""
    return num(row["ms"]) + spread + (FIXED if row.get("autotune") is False else "")


def get(key: str, show: Callable = num) -> Callable[[dict], str | None]:
    return lambda row: None if row.get(key) is None else show(row[key])


def pair(key: str, fmt: str) -> Callable[[dict], str | None]:
    """dx and dy of a row's errors (or floors)."""
    return get(key, lambda v: f"{v['dx']:{fmt}} / {v['dy']:{fmt}}")


def counted(key: str, count: str) -> Callable[[dict], str | None]:
    """TFLOP/s with the passes they count."""
    return lambda r: None if count not in r else f"{num(r.get(key))} ({r[count]})"


def stages(row: dict) -> str | None:
    predicted = row.get("predicted_stages_ms", {})
    measured = row.get("stages_ms") or {k: None for k in predicted}
    text = " · ".join(f"{k} {num(v)} ({num(predicted.get(k))})" for k, v in measured.items())
    return text or None


def versus(rows: list[dict], base: str) -> Callable[[dict], str]:
    """A fastclip row's speedup over the baseline ``base`` of the same case."""

    def cell(row: dict) -> str:
        if row["provider"] in BASELINES:
            return ""
        same = {k: row.get(k) for k in ("op", "dtype", "D", "N", "mode", "k")}
        other = find(rows, **same, provider=base)
        if not other or "ms" not in other or "ms" not in row:
            return "–"
        return f"{other['ms'] / row['ms']:.2f}×"

    return cell


CASE = [  # a case's columns, the first six naming it
    ("N", get("N", "{:,}".format)),
    ("D", get("D", str)),
    ("k", get("k", str)),
    ("dtype", get("dtype", str)),
    ("mode", get("mode", str)),
    ("provider", get("provider", str)),
    ("ms", timing),
    ("TFLOP/s (passes)", lambda r: counted("tflops", "passes")(r) or num(r.get("tflops"))),
    ("TFLOP/s floor (passes)", counted("tflops_floor", "floor_passes")),
]
MEMORY = [("peak MiB", get("peak_mib")), ("bound MiB", get("bound_mib"))]
CHECKS = [
    ("error dx / dy", pair("err", ".2e")),
    ("floor dx / dy", pair("floor", ".1e")),
    ("ok", get("ok", lambda ok: "✓" if ok else "✗")),
]
PREDICTED = [("predicted ms ({model})", get("predicted_ms")), ("stages ms (predicted)", stages)]
CASES = [*CASE, *MEMORY, *PREDICTED, *CHECKS, ("compile s", get("compile_s"))]
LARGE = [
    *CASE[:2],
    ("provider", lambda r: r["provider"] + (" (auto's)" if r.get("auto") else "")),
    ("forward ms", get("forward_ms")),
    ("backward ms", get("backward_ms")),
    ("total ms", lambda r: timing(r, False)),
    *CASE[7:],
    *MEMORY,
    *PREDICTED,
]
CONFIDENT = [
    ("loss", lambda r: TITLES[r["op"]]),
    *CASE[:2],
    ("scale", lambda r: num(r["scale"]) + (f", bias {num(r['bias'])}" if r.get("bias") else "")),
    ("provider", get("provider", str)),
    ("loss error", get("loss_err", "{:.1e}".format)),
    *CHECKS,
]
BANDWIDTH = [
    ("what", get("what", str)),
    ("buffer MiB", get("buffer_mib")),
    ("ms", timing),
    ("GB/s", get("gb_s")),
]
TILES = [
    ("loss", lambda r: TITLES[r["op"]]),
    *CASE[:2],
    ("G kernel tiles", get("config", str)),
    ("stage", get("stage", str)),
    ("TMA", get("tma", str)),
    ("ms", timing),
    ("TFLOP/s (1 pass)", get("tflops")),
]


def table(head: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * left + "---:|" * (len(head) - left)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows] + [""]


def columns(results: dict, spec: list[Column], rows: list[dict], left: int) -> list[str]:
    """A table of ``rows`` by columns, less those no row has a value in; the first ``left``
    columns (of those kept) aligned left. Heads name the cost model's constants ({model})."""
    cells = [[cell(row) for _, cell in spec] for row in rows]
    kept = [i for i in range(len(spec)) if any(c[i] is not None for c in cells)]
    shown = [["–" if c[i] is None else c[i] for i in kept] for c in cells]
    head = [spec[i][0].format(model=model_label(results)) for i in kept]
    return table(head, shown, left=sum(i < left for i in kept))


def model_label(results: dict) -> str:
    """The constants fastclip.costs predicted with: "H100 constants"."""
    name = results.get("model_device") or "NVIDIA H200"
    words = name.split()
    model = words[1] if words[0] == "NVIDIA" and len(words) > 1 else words[0]
    return f"{model} constants{', the default' if 'default' in name else ''}"


def case_key(row: dict) -> tuple:
    mode = MODES.index(row["mode"]) if row.get("mode") in MODES else len(MODES)
    return row["op"], mode, row.get("dtype", ""), str(row["D"]), row.get("k", 0), row["N"]


def section(
    results: dict, title: str, rows: list[dict], spec: list[Column], left: int, note: str = ""
) -> list[str]:
    """A titled table of ``rows`` (none: nothing), the speedups over each baseline present after
    the times of a case table, and the errors that stopped any."""
    if not rows:
        return []
    if spec is CASES:
        rows = sorted(rows, key=case_key)
        found = [(f"vs {b}", versus(rows, b)) for b in BASELINES if find(rows, provider=b)]
        spec = [*CASES[:9], *found, *CASES[9:]]
    errors = [f"- {r.get('provider', r.get('op'))}: {r['error']}" for r in rows if "error" in r]
    notes = [note, ""] if note else []
    body = columns(results, spec, rows, left)
    return [f"## {title}", "", *notes, *body, *errors, *([""] if errors else [])]


def cublas(results: dict) -> list[str]:
    """cuBLAS at the block shapes: one row per shape, a column per product."""
    rows = results.get("cublas", [])
    products = list(dict.fromkeys(r["product"] for r in rows))
    shapes = {(r["R"], r["C"], r["D"]): r["uses"] for r in rows}
    cells = []
    for (R, C, D), uses in shapes.items():
        by = {r["product"]: r for r in rows if (r["R"], r["C"], r["D"]) == (R, C, D)}
        found = [
            f"{timing(by.get(p), False)} ({num(by.get(p, {}).get('tflops'))})" for p in products
        ]
        cells.append([f"{R:,} × {C:,}", str(D), "; ".join(uses), *found])
    note = (
        "ms per block (TFLOP/s): one pass over the N×N matrix runs the product once per block, "
        "the count in brackets after each case. S: the block's dots into fp32 (blocks-mm) or "
        "bf16; G Y and G^T X accumulate into fp32 as the bounded-block backward does."
    )
    head = ["R × C", "D", "used by", *products]
    return ["## cuBLAS at the block shapes", "", note, "", *table(head, cells, 3)] if cells else []


def header(results: dict, tests: str | None, notes: list[str]) -> list[str]:
    where = f"none: CPU ({results.get('cpu')})"
    if results.get("interpreter"):
        where += ", Triton's interpreter" + (", tiny sizes" if results.get("tiny") else "")
    if results.get("gpu"):
        facts = [f"{results['sms']} SMs"] if "sms" in results else []
        facts += [f"{num(results['memory_gib'])} GiB"] if "memory_gib" in results else []
        facts += [f"L2 {num(results['l2_mib'])} MiB"] if results.get("l2_mib") else []
        where = results["gpu"] + (f" ({', '.join(facts)})" if facts else "")
        where += f", CUDA {results.get('cuda')}"
    versions = (results.get(k) for k in ("torch", "triton", "python"))
    lines = ["# fastclip benchmarks", "", f"- GPU: {where}"]
    lines += [
        "- torch {}, triton {}, Python {}".format(*versions),
        f"- Date: {results.get('date')}",
    ]
    if "out_dtype_gemm" in results:
        native = "native (out_dtype)" if results["out_dtype_gemm"] else "widened operands"
        lines.append(f"- cuBLAS fp32 output from bf16: {native}")
    if results.get("configs"):
        configs = "; ".join(config_text(n, c) for n, c in results["configs"].items())
        mib = num(results.get("block_bytes", 0) / 2**20)
        lines.append(
            f"- Tiles, each kernel's first autotune config that fits: {configs}; G buffer {mib} MiB"
        )
    parts = "; ".join(
        f"{name}: {p.get('status')}"
        + (f", {p['seconds']} s" if "seconds" in p else "")
        + (f" (limit {p['limit_s']} s)" if "limit_s" in p else "")
        for name, p in results.get("parts", {}).items()
    )
    lines += [f"- Parts: {parts}"] if parts else []
    lines += [f"- CUDA tests: {tests}"] if tests else []
    return [*lines, *(f"- {note}" for note in notes), "", LEGEND, ""]


def config_text(name: str, config: dict) -> str:
    """One entry of the runner's "configs": InfoNCE G 128×128×64, 8 warps, 3 stages."""
    if "blocks" not in config:
        return f"{name}: {config}"
    blocks = "×".join(str(size) for size in config["blocks"].values())
    cap = f", maxnreg {config['maxnreg']}" if config.get("maxnreg") else ""
    return f"{name} {blocks}, {config['warps']} warps, {config['stages']} stages{cap}"


def section_targets(results: dict) -> list[str]:
    found = targets(results)
    if all(measured is None for _, measured, _ in found):
        return []
    mark = {True: "yes", False: "**no**", None: "–"}
    rows = [[t, m or "not measured", mark[met]] for t, m, met in found]
    return ["## Targets", "", *table(["target (H100/H200, bf16)", "measured", "met"], rows)]


def section_tuning(results: dict) -> list[str]:
    picks = choices(results)
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
        "What `python benchmarks/tuning.py` writes to fastclip/tuning.json from these results: "
        "the fastest implementation within tolerance."
    )
    head = ["loss", "dtype", "D", "N", "auto runs", "rejected"]
    return ["## auto's table", "", note, "", *table(head, cells, left=5)] if picks else []


def markdown(results: dict, tests: str | None = None, notes: list[str] = ()) -> str:
    """The summary: where and how the results ran, the targets, then a table per section."""
    rows = {key: value for key, value in results.items() if isinstance(value, list)}
    losses, large = rows.get("losses", []), rows.get("large", [])
    confident = rows.get("confident", [])
    gap = next((f"{r['median_gap']:.1e}" for r in confident if "median_gap" in r), None)
    lines = header(results, tests, list(notes)) + section_targets(results)
    lines += section(results, "Bandwidth", rows.get("bandwidth", []), BANDWIDTH, 1)
    lines += cublas(results)
    lines += section(
        results, "G kernel tiles (one G pass)", rows.get("block_configs", []), TILES, 4
    )
    lines += section(results, "Tensor descriptors (TMA), one pass", rows.get("tma", []), TILES, 4)
    for op in ("contrastive", "siglip"):
        lines += section(results, TITLES[op], [r for r in losses if r["op"] == op], CASES, 6)
    note = "Texts = images + 5% noise" + (f"; the median row's 1 − p_ii is {gap}." if gap else ".")
    lines += section(results, "Confident batch", confident, CONFIDENT, 5, note)
    note = "A full step captured in a CUDA graph and replayed: the host launches nothing."
    lines += section(results, "Small batches in a CUDA graph", rows.get("graphs", []), CASES, 6,
                     note)  # fmt: skip
    title = f"InfoNCE at N = {large[0]['N']:,}, one run each" if large else ""
    lines += section(results, title, large, LARGE, 3)
    lines += section(results, "Similarity and top-k", rows.get("retrieval", []), CASES, 6)
    lines += section(results, TITLES["projection"], rows.get("projection", []), CASES, 6)
    return "\n".join(lines + section_tuning(results))


def plot(results: dict, path: Path) -> None:
    """One row of panels per (op, mode, dtype, D): time and peak memory against N, log-log."""
    from matplotlib.figure import Figure  # here: the summary alone starts faster without it

    rows = [r for key in ("losses", "retrieval", "projection") for r in results.get(key, [])]
    groups = sorted({case_key(r)[:5] for r in rows})
    fig = Figure(figsize=(11, 3.6 * max(1, len(groups))), layout="constrained")
    axes = fig.subplots(max(1, len(groups)), 2, squeeze=False)
    for group, (ax_time, ax_mem) in zip(groups, axes, strict=False):
        mine = [r for r in rows if case_key(r)[:5] == group]
        for provider in dict.fromkeys(r["provider"] for r in mine):
            runs = sorted((r for r in mine if r["provider"] == provider), key=lambda r: r["N"])
            oom = [f"{r['N']:,}" for r in runs if r.get("oom")]
            label = provider + (f" (OOM at N={', '.join(oom)})" if oom else "")
            for ax, key in ((ax_time, "ms"), (ax_mem, "peak_mib")):
                held = [r for r in runs if r.get(key)]
                if held:
                    ax.plot([r["N"] for r in held], [r[key] for r in held], "o-", label=label)
        name = f"{TITLES.get(group[0], group[0])}, {mine[0]['mode']}, {group[2]}, D={group[3]}"
        ax_time.set(ylabel="median ms", title=f"{name}: time")
        ax_mem.set(ylabel="peak MiB above inputs", title=f"{name}: memory")
        for ax in ax_time, ax_mem:
            if ax.has_data():  # no memory reading under Triton's interpreter
                ax.set(xscale="log", yscale="log")
            ax.set_xlabel("N")
        ax_time.legend(fontsize="small")
    fig.savefig(path, dpi=110)


def tests_line(log: str) -> str | None:
    """pytest's closing line ("12 passed, 3 skipped in 40s"), or None."""
    pattern = r"^=*\s*(\d+ (?:passed|failed|error|skipped|deselected).*?)\s*=*$"
    found = re.findall(pattern, log, re.M)
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="results JSON files")
    parser.add_argument("--out", type=Path, help="output folder (default: the first file's)")
    parser.add_argument("--tests", type=Path, help="the CUDA tests' log")
    parser.add_argument("--note", action="append", default=[], help="extra line for the header")
    parser.add_argument(
        "--process",
        nargs=3,
        action="append",
        default=[],
        metavar=("PARTS", "EXIT", "LIMIT_S"),
        help="how a runner process ended: its parts (a,b), exit status or 'skipped', its limit",
    )
    parser.add_argument("--merge", type=Path, help="also write every result into one JSON file")
    parser.add_argument("--no-plot", action="store_true", help="the summary alone")
    args = parser.parse_args(argv)
    results = merge([load(path) or {"parts": {}} for path in args.results])
    if args.process:
        args.note.append("runner processes: " + "; ".join(reconcile(results, args.process)))
        write_json(args.results[0], results)
    if args.merge:
        write_json(args.merge, results)
    tests = None
    if args.tests and args.tests.exists():
        tests = tests_line(args.tests.read_text()) or "no result line (stopped?)"
    out = args.out or args.results[0].parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(markdown(results, tests, args.note))
    if not args.no_plot:
        plot(results, out / "bench.png")
    print(f"wrote {out / 'summary.md'}" + ("" if args.no_plot else f" and {out / 'bench.png'}"))


if __name__ == "__main__":
    main()
