"""fastclip/tuning.json from benchmark results (``results.py``: the runner's, or pytest's on a
GPU): the implementation ``backend="auto"`` runs on CUDA for each measured (loss, dtype, D, N
bucket).

    python benchmarks/tuning.py quick.json [--out fastclip/tuning.json]

The rule: for each case, the fastest full step (forward+backward) among fastclip's
implementations (every provider but the baselines) whose gradients are within tolerance, on the
case's random batch and on its loss's confident batch.
The large runs (N = 2^20) are cases too, so that ``auto`` does not extrapolate from 65,536 to
where block shapes change.
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

from results import BASELINES, load

EAGER = "eager"  # the yardstick of every case
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
    """Eager's gradient errors by ``key`` of its rows."""
    return {key(r): r["err"] for r in rows if r["provider"] == EAGER and "err" in r}


def confident_results(results: dict) -> dict[tuple[str, str], bool]:
    """(op, implementation) -> whether its gradients on the confident batch are within tolerance."""
    rows = results.get("confident", [])
    eager = _eager_errors(rows, lambda r: r["op"])
    return {
        (r["op"], r["provider"]): "err" in r
        and within_tolerance(r["err"], r["floor"], eager.get(r["op"]))
        for r in rows
        if r["provider"] not in BASELINES
    }


def _case(row: dict) -> tuple:
    return row["op"], row["dtype"], row["D"], row["N"]


def choices(results: dict) -> list[dict]:
    """One entry per measured (op, dtype, D, N): every implementation's time, why any was
    rejected, and the pick (None when no implementation qualified). The large runs ("large")
    count as cases too; having no gradient error of their own, an implementation qualifies
    there as it did at the largest N measured for its loss."""
    rows = [r for r in results.get("losses", []) if r["mode"] == "full"]
    eager = _eager_errors(rows, _case)
    confident = confident_results(results)
    largest = {}  # (op, dtype, D, implementation) -> its row at the largest N
    for row in sorted(rows, key=lambda r: r["N"]):
        largest[(*_case(row)[:3], row["provider"])] = row

    def rejection(row: dict) -> str | None:
        if "ms" not in row:
            return "out of memory" if row.get("oom") else row.get("error", "not timed")
        checked = row if "err" in row else largest.get((*_case(row)[:3], row["provider"]), {})
        if "err" not in checked:
            return "gradient error not measured"
        if not within_tolerance(checked["err"], checked["floor"], eager.get(_case(checked))):
            return "gradient error beyond tolerance" + (
                "" if checked is row else f" at N={checked['N']}"
            )
        if not confident.get((row["op"], row["provider"]), True):
            return "gradient error beyond tolerance on the confident batch"
        return None

    large = results.get("large", [])
    measured = [r for r in rows + large if r["provider"] not in BASELINES]
    picks = []
    for key in sorted({_case(r) for r in measured}):
        mine = [r for r in measured if _case(r) == key]
        times = {r["provider"]: r["ms"] for r in mine if "ms" in r}
        rejected = {r["provider"]: why for r in mine if (why := rejection(r)) is not None}
        allowed = {impl: ms for impl, ms in times.items() if impl not in rejected}
        pick = min(allowed, key=allowed.get) if allowed else None
        op, dtype, dim, n = key
        picks.append(
            {"op": op, "dtype": dtype, "D": dim, "N": n, "pick": pick, "ms": times,
             "rejected": rejected}
        )  # fmt: skip
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
    parser.add_argument("results", type=Path, help="the results JSON (run.py's, or pytest's)")
    parser.add_argument("--out", type=Path, default=Path("fastclip/tuning.json"))
    args = parser.parse_args(argv)
    results = load(args.results)
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
