"""Markdown tables and plot of the loss benchmarks.

    python benchmarks/render.py RESULTS.json [MORE.json ...] [--out DIR] [--note TEXT ...]
                                [--merge ALL.json]

RESULTS.json is what ``pytest benchmarks/ --benchmark-only --benchmark-json=RESULTS.json`` writes:
timed cases under "benchmarks" (their ``extra_info`` holds op, provider, mode, N, D, dtype,
peak_mib, tflops, the matmul passes they count and the versions), out-of-memory cases under
"oom" (see conftest.py). Several
files (runs split with ``-k``) make one summary, a table per loss. Writes DIR/summary.md and
DIR/bench.png; DIR defaults to the folder of the first file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

BASELINES = ("eager", "compile", "cublas")
MODES = ("forward", "forward+backward")
METRICS = (("ms", "ms"), ("tflops", "TFLOP/s"), ("peak_mib", "peak MiB"))
LEGEND = (
    "ms: median over the timed rounds. TFLOP/s: 2·N²·D FLOPs per matmul pass (normalized "
    "projection: 2·N·D_in·D_out), counting the passes each provider executes where a table lists "
    "them below it; otherwise the algorithmic floor, the same count for every provider: 1 pass "
    "for a forward, 4 for an InfoNCE forward+backward, 3 for SigLIP's and the projection's. "
    "Peak MiB: memory allocated on top of the inputs. OOM: ran out of memory. Speedup: the "
    "baseline's time over fastclip's."
)
OP_TITLES = {
    "clip": "InfoNCE (CLIP) loss",
    "siglip": "SigLIP loss",
    "projection": "Normalized projection",
    "similarity": "Similarity matrix",
    "topk": "Top-k retrieval",
}
FIXED_TILES = "†"  # marks fastclip times measured without autotuning


def load_cases(results: dict) -> list[dict]:
    """One dict per case: its ``extra_info`` plus "ms", the median time (None: out of memory)."""
    cases = [{**b["extra_info"], "ms": b["stats"]["median"] * 1e3} for b in results["benchmarks"]]
    cases += [{**oom, "ms": None} for oom in results.get("oom", [])]
    # Older results named the op "loss", and those from before SigLIP named none: InfoNCE.
    return [{"op": case.pop("loss", "clip"), **case} for case in cases]


def provider_order(cases: list[dict]) -> tuple[list[str], list[str]]:
    """(fastclip's providers, the baselines present), each in column order."""
    names = {c["provider"] for c in cases}
    return sorted(names - set(BASELINES)), [b for b in BASELINES if b in names]


def _row_key(case: dict) -> tuple:
    """(op, mode, dtype, D, N), sortable: known modes in MODES order, others by name."""
    mode = case["mode"]
    mode_key = (MODES.index(mode), "") if mode in MODES else (len(MODES), mode)
    return case["op"], mode_key, case["dtype"], str(case["D"]), case["N"]


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _cell(case: dict | None, metric: str) -> str:
    if case is None:
        return "–"
    if case["ms"] is None:
        return "OOM"
    if case.get(metric) is None:  # e.g. no memory reading on this platform
        return "n/a"
    fixed = metric == "ms" and case.get("autotune") is False
    return _num(case[metric]) + (FIXED_TILES if fixed else "")


def _speedup(ours: dict | None, base: dict | None) -> str:
    if ours is None or base is None or ours["ms"] is None or base["ms"] is None:
        return "–"
    return f"{base['ms'] / ours['ms']:.2f}×"


def markdown(results: dict, cases: list[dict], notes: list[str]) -> str:
    """The summary: where and when ``results`` ran, then a table per loss."""
    env = cases[0]
    python = results["machine_info"]["python_version"]
    device = env["gpu"] or f"none (CPU: {results['machine_info']['cpu'].get('brand_raw', '?')})"
    lines = [
        "# fastclip benchmarks",
        "",
        f"- GPU: {device}" + (f", CUDA {env['cuda']}" if env["cuda"] else ""),
        f"- torch {env['torch']}, triton {env['triton']}, Python {python}",
        f"- Date: {results['datetime'][:16].replace('T', ' ')} UTC",
        *(f"- {note}" for note in notes),
        "",
        LEGEND,
        "",
    ]
    if any(c.get("autotune") is False for c in cases):
        lines += [f"{FIXED_TILES} fastclip with its default tiles, not autotuned.", ""]
    for op in sorted({c["op"] for c in cases}):
        mine = [c for c in cases if c["op"] == op]
        lines += [f"## {OP_TITLES.get(op, op)}", "", *_table(mine), "", *_passes(mine)]
    return "\n".join(lines)


def _passes(cases: list[dict]) -> list[str]:
    """The matmul passes each provider's TFLOP/s count, per mode, where the cases record them."""
    counted: dict[str, dict[str, int]] = {}
    for case in cases:
        if case.get("passes") is not None:
            counted.setdefault(case["mode"], {})[case["provider"]] = case["passes"]
    if not counted:
        return []
    modes = sorted(counted, key=lambda m: (MODES.index(m) if m in MODES else len(MODES), m))
    per_mode = [
        f"{mode}: " + ", ".join(f"{p} {n}" for p, n in sorted(counted[mode].items()))
        for mode in modes
    ]
    return [f"TFLOP/s count the matmul passes as executed: {'; '.join(per_mode)}.", ""]


def _table(cases: list[dict]) -> list[str]:
    """One row per (mode, dtype, D, N): every provider's metrics, then fastclip's speedups."""
    ours, baselines = provider_order(cases)
    providers = ours + baselines
    pairs = [(o, b) for o in ours for b in baselines]
    head = ["mode", "dtype", "D", "N"]
    head += [f"{p} {label}" for p in providers for _, label in METRICS]
    head += [f"{o} vs {b}" for o, b in pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    rows: dict[tuple, dict[str, dict]] = {}
    for case in cases:
        rows.setdefault(_row_key(case), {})[case["provider"]] = case
    for key in sorted(rows):
        by = rows[key]
        case = next(iter(by.values()))
        cells = [case["mode"], case["dtype"], str(case["D"]), f"{case['N']:,}"]
        cells += [_cell(by.get(p), metric) for p in providers for metric, _ in METRICS]
        cells += [_speedup(by.get(o), by.get(b)) for o, b in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(cases: list[dict], path: Path) -> None:
    """One row of panels per (op, mode, dtype, D): time and peak memory vs N, log-log."""
    ours, baselines = provider_order(cases)
    groups = sorted({_row_key(c)[:4] for c in cases})
    fig = Figure(figsize=(11, 3.6 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for group, (ax_time, ax_mem) in zip(groups, axes, strict=True):
        for provider in ours + baselines:
            mine = [c for c in cases if c["provider"] == provider and _row_key(c)[:4] == group]
            runs = sorted((c for c in mine if c["ms"] is not None), key=lambda c: c["N"])
            oom = sorted(c["N"] for c in mine if c["ms"] is None)
            label = provider + (f" (OOM at N={', '.join(f'{n:,}' for n in oom)})" if oom else "")
            n = [c["N"] for c in runs]
            ax_time.plot(n, [c["ms"] for c in runs], marker="o", label=label)
            measured = [c for c in runs if c.get("peak_mib") is not None]
            ax_mem.plot([c["N"] for c in measured], [c["peak_mib"] for c in measured], marker="o",
                        label=label)  # fmt: skip
        op, _, dtype, dim = group
        mode = next(c["mode"] for c in cases if _row_key(c)[:4] == group)
        title = f"{op}, {mode}, {dtype}, D={dim}"
        ax_time.set(yscale="log", ylabel="median ms", title=f"{title}: time")
        ax_mem.set(yscale="log", ylabel="peak MiB above inputs", title=f"{title}: memory")
        for ax in ax_time, ax_mem:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N")
        ax_time.legend(fontsize="small")
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="pytest-benchmark JSON files")
    parser.add_argument("--out", type=Path, help="output folder (default: the first file's)")
    parser.add_argument("--note", action="append", default=[], help="extra line for the header")
    parser.add_argument("--merge", type=Path, help="also write every case into one JSON file")
    args = parser.parse_args(argv)

    runs = [json.loads(path.read_text()) for path in args.results]
    cases = [case for results in runs for case in load_cases(results)]
    if not cases:
        raise SystemExit(f"no benchmark results in {', '.join(map(str, args.results))}")
    if args.merge:
        merged = {**runs[0], "benchmarks": [b for r in runs for b in r["benchmarks"]]}
        merged["oom"] = [oom for r in runs for oom in r.get("oom", [])]
        args.merge.write_text(json.dumps(merged, indent=1))
    out = args.out or args.results[0].parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(markdown(runs[0], cases, args.note))
    plot(cases, out / "bench.png")
    print(f"wrote {out / 'summary.md'} and {out / 'bench.png'}")


if __name__ == "__main__":
    main()
