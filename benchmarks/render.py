"""Markdown tables and plot of the loss benchmarks.

    python benchmarks/render.py RESULTS.json [MORE.json ...] [--out DIR] [--note TEXT ...]

RESULTS.json is what ``pytest benchmarks/ --benchmark-only --benchmark-json=RESULTS.json`` writes:
timed cases under "benchmarks" (their ``extra_info`` holds loss, provider, mode, N, D, dtype,
peak_mib, tflops and the versions), out-of-memory cases under "oom" (see conftest.py). Several
files (runs split with ``-k``) make one summary, a table per loss. Writes DIR/summary.md and
DIR/bench.png; DIR defaults to the folder of the first file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

BASELINES = ("eager", "compile")
MODES = ("forward", "forward+backward")
METRICS = (("ms", "ms"), ("tflops", "TFLOP/s"), ("peak_mib", "peak MiB"))
LEGEND = (
    "ms: median over the timed rounds. TFLOP/s: 2·N²·D FLOPs per matmul pass, 1 pass for a "
    "forward; for forward+backward 4 (InfoNCE) or 3 (SigLIP), the algorithmic floor, the same "
    "count for every provider. Peak MiB: memory "
    "allocated on top of the inputs. OOM: ran out of memory. Speedup: the baseline's time over "
    "fastclip's."
)
LOSS_TITLES = {"clip": "InfoNCE (CLIP) loss", "siglip": "SigLIP loss"}
FIXED_TILES = "†"  # marks fastclip times measured without autotuning


def load_cases(results: dict) -> list[dict]:
    """One dict per case: its ``extra_info`` plus "ms", the median time (None: out of memory)."""
    cases = [{**b["extra_info"], "ms": b["stats"]["median"] * 1e3} for b in results["benchmarks"]]
    cases += [{**oom, "ms": None} for oom in results.get("oom", [])]
    return [{"loss": "clip", **case} for case in cases]  # results from before SigLIP: InfoNCE


def provider_order(cases: list[dict]) -> tuple[list[str], list[str]]:
    """(fastclip's providers, the baselines present), each in column order."""
    names = {c["provider"] for c in cases}
    return sorted(names - set(BASELINES)), [b for b in BASELINES if b in names]


def _row_key(case: dict) -> tuple:
    return case["loss"], MODES.index(case["mode"]), case["dtype"], case["D"], case["N"]


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _cell(case: dict | None, metric: str) -> str:
    if case is None:
        return "–"
    if case["ms"] is None:
        return "OOM"
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
    for loss in sorted({c["loss"] for c in cases}):
        table = _table([c for c in cases if c["loss"] == loss])
        lines += [f"## {LOSS_TITLES.get(loss, loss)}", "", *table, ""]
    return "\n".join(lines)


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
        mode, dtype, dim, n = MODES[key[1]], *key[2:]
        cells = [mode, dtype, str(dim), f"{n:,}"]
        cells += [_cell(by.get(p), metric) for p in providers for metric, _ in METRICS]
        cells += [_speedup(by.get(o), by.get(b)) for o, b in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(cases: list[dict], path: Path) -> None:
    """One row of panels per (loss, mode, dtype, D): time and peak memory vs N, log-log."""
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
            ax_mem.plot(n, [c["peak_mib"] for c in runs], marker="o", label=label)
        loss, mode, dtype, dim = group
        title = f"{loss}, {MODES[mode]}, {dtype}, D={dim}"
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
    args = parser.parse_args(argv)

    runs = [json.loads(path.read_text()) for path in args.results]
    cases = [case for results in runs for case in load_cases(results)]
    if not cases:
        raise SystemExit(f"no benchmark results in {', '.join(map(str, args.results))}")
    out = args.out or args.results[0].parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(markdown(runs[0], cases, args.note))
    plot(cases, out / "bench.png")
    print(f"wrote {out / 'summary.md'} and {out / 'bench.png'}")


if __name__ == "__main__":
    main()
