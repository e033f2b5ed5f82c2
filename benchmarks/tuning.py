"""fastclip/tuning.json from a gpu_quick.py run: the implementation ``backend="auto"`` runs on
CUDA for each measured (loss, dtype, D, N bucket).

    python benchmarks/tuning.py quick.json [--out fastclip/tuning.json]

The rule: for each case, the fastest forward+backward among the Triton implementations whose
gradients are within tolerance, on the case's random batch and on its loss's confident batch.
Within tolerance is the precision tests' rule for low precision: each feature gradient's
relative error is at most twice that of the exact gradient rounded to the dtype, plus 1e-2,
and no worse than eager PyTorch's in the same dtype (or 1e-2). ``fastclip.backends`` reads
{op: {dtype: {D: {N: implementation}}}}; the top-level "source" (GPU, versions, date) is not an
op, so it reads past it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

IMPLEMENTATIONS = ("blocks", "blocks-mm", "fused")
GRADIENTS = ("dx", "dy")
SLACK = 1e-2  # the tests' allowance beyond the rounding floor and eager's error


def within_tolerance(err: dict, floor: dict, eager: dict | None = None) -> bool:
    """Each feature gradient's relative error within 2 x the rounding floor + SLACK, and not
    above eager's (or SLACK) where eager's is known and finite."""
    for name in GRADIENTS:
        value = err.get(name)
        if value is None or not math.isfinite(value) or value > 2 * floor[name] + SLACK:
            return False
        bar = None if eager is None else eager.get(name)
        if bar is not None and math.isfinite(bar) and value > max(bar, SLACK):
            return False
    return True


def _eager_errors(rows: list[dict], key) -> dict:
    return {key(r): r["err"] for r in rows if r["impl"] == "eager" and "err" in r}


def confident_results(results: dict) -> dict[tuple[str, str], bool]:
    """(op, implementation) -> whether its gradients on the confident batch are within tolerance."""
    rows = results.get("confident", [])
    eager = _eager_errors(rows, lambda r: r["op"])
    return {
        (r["op"], r["impl"]): "err" in r
        and within_tolerance(r["err"], r["floor"], eager.get(r["op"]))
        for r in rows
        if r["impl"] in IMPLEMENTATIONS
    }


def choices(results: dict) -> list[dict]:
    """One entry per measured (op, dtype, D, N): every implementation's time, why any was
    rejected, and the pick (None when no implementation qualified)."""
    rows = results.get("losses", [])
    case = lambda r: (r["op"], r["dtype"], r["D"], r["N"])  # noqa: E731
    eager = _eager_errors(rows, case)
    confident = confident_results(results)
    picks = []
    for key in sorted({case(r) for r in rows}):
        times, rejected = {}, {}
        for row in (r for r in rows if case(r) == key and r["impl"] in IMPLEMENTATIONS):
            impl = row["impl"]
            if "ms" not in row:
                rejected[impl] = (
                    "out of memory" if row.get("oom") else row.get("error", "not timed")
                )
            elif "err" not in row or not within_tolerance(row["err"], row["floor"], eager.get(key)):
                rejected[impl] = "gradient error beyond tolerance"
            elif not confident.get((key[0], impl), True):
                rejected[impl] = "gradient error beyond tolerance on the confident batch"
            if "ms" in row:
                times[impl] = row["ms"]
        allowed = {impl: ms for impl, ms in times.items() if impl not in rejected}
        pick = min(allowed, key=allowed.get) if allowed else None
        op, dtype, dim, n = key
        picks.append(
            {
                "op": op,
                "dtype": dtype,
                "D": dim,
                "N": n,
                "pick": pick,
                "ms": times,
                "rejected": rejected,
            }
        )
    return picks


def tuning(results: dict) -> dict:
    """The tuning.json contents: {op: {dtype: {D: {N: implementation}}}} plus "source"."""
    table: dict = {
        "source": {key: results.get(key) for key in ("gpu", "date", "torch", "triton", "cuda")}
    }
    for choice in choices(results):
        if choice["pick"] is not None:
            by_n = table.setdefault(choice["op"], {}).setdefault(choice["dtype"], {})
            by_n.setdefault(str(choice["D"]), {})[str(choice["N"])] = choice["pick"]
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the JSON gpu_quick.py wrote")
    parser.add_argument("--out", type=Path, default=Path("fastclip/tuning.json"))
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    if results.get("gpu") is None or results.get("tiny"):
        parser.error(f"{args.results} is not a full GPU run: no tuning from it")
    for choice in choices(results):
        times = ", ".join(f"{impl} {ms:.3g} ms" for impl, ms in sorted(choice["ms"].items()))
        why = "; ".join(f"{impl}: {reason}" for impl, reason in choice["rejected"].items())
        print(
            f"{choice['op']} {choice['dtype']} D={choice['D']} N={choice['N']}: "
            f"{choice['pick']} ({times}){' — ' + why if why else ''}"
        )
    args.out.write_text(json.dumps(tuning(results), indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
