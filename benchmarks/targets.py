"""The benchmarks' targets (H100/H200, bf16), checked against results (``results.py``): what
``render.py`` puts first in a summary."""

from __future__ import annotations

from results import BASELINES, find
from tuning import choices

Target = tuple[str, str | None, bool | None]  # (target, what was measured, met)
BIG = 65536  # N of the losses' targets
LARGE = 2**20


def best(results: dict, op: str, n: int) -> dict | None:
    """The full-step row of the implementation ``auto`` would run for (op, n): the fastest
    within tolerance (``tuning.choices``)."""
    pick = next((c["pick"] for c in choices(results) if c["op"] == op and c["N"] == n), None)
    rows = results.get("losses", []) + results.get("large", [])
    return find(rows, op=op, N=n, mode="full", provider=pick) if pick else None


def speedup(text: str, base: dict | None, ours: dict | None, goal: float) -> Target:
    """At least ``goal`` times the baseline: its time over ours."""
    if not base or not ours or "ms" not in base or "ms" not in ours:
        return text, None, None
    gain = base["ms"] / ours["ms"]
    return text, f"{gain:.2f}×", gain >= goal


def loss_targets(results: dict, op: str, title: str, D: int, ms: float, goal: float) -> list:
    ours = best(results, op, BIG)
    eager = find(results.get("losses", []), op=op, N=BIG, mode="full", provider="eager")
    name = f"{title}, N={BIG:,}, D={D}, forward+backward"
    measured = (
        None if ours is None or "ms" not in ours else f"{ours['provider']}: {ours['ms']:.3g} ms"
    )
    return [
        (f"{name} ≤ {ms} ms", measured, None if measured is None else ours["ms"] <= ms),
        speedup(f"{name} ≥ {goal}× eager", eager, ours, goal),
    ]


def memory_target(results: dict) -> Target:
    rows = results.get("losses", []) + results.get("large", [])
    ours = [r for r in rows if r.get("bound_mib") and r.get("peak_mib") is not None]
    over = [
        f"{r['op']} {r['provider']} N={r['N']:,}" for r in ours if r["peak_mib"] > r["bound_mib"]
    ]
    text = "peak extra memory ≤ N·D·8 bytes + the buffer"
    if not ours:
        return text, None, None
    found = f"{len(ours) - len(over)} of {len(ours)} cases" + (
        f"; over: {', '.join(over)}" if over else ""
    )
    return text, found, not over


def targets(results: dict) -> list[Target]:
    """(target, what was measured, met) for each target."""
    losses, out = results.get("losses", []), []
    out += loss_targets(results, "contrastive", "InfoNCE (CLIP)", 512, 32, 3.5)
    out += loss_targets(results, "siglip", "SigLIP", 768, 33, 2.5)
    large, text = (
        best(results, "contrastive", LARGE),
        "InfoNCE, N=1,048,576, D=512: ≤ 8 s within 5 GB",
    )
    if large and "ms" in large:
        peak = large.get("peak_mib")
        met = large["ms"] <= 8000 and peak is not None and peak * 2**20 <= 5e9
        peak_text = "–" if peak is None else f"{peak:,.0f}"
        out.append((text, f"{large['provider']}: {large['ms'] / 1e3:.2f} s, {peak_text} MiB", met))
    else:
        out.append((text, None, None))
    forward = [
        r for r in losses if r["op"] == "contrastive" and r["N"] == BIG and r["mode"] == "eval"
    ]
    tflops = next((r.get("tflops") for r in forward if r["provider"] not in BASELINES), None)
    met = None if tflops is None else tflops >= 450
    out.append((f"InfoNCE forward, N={BIG:,}: ≥ 450 TFLOP/s", tflops and f"{tflops:,.0f}", met))
    for op, title in (("contrastive", "InfoNCE (CLIP)"), ("siglip", "SigLIP")):
        eager = find(losses, op=op, N=4096, mode="full", provider="eager")
        out.append(speedup(f"{title}, N=4,096: ≥ 1× eager", eager, best(results, op, 4096), 1))
    out.append(memory_target(results))
    retrieval = results.get("retrieval", [])
    for text, op, n, base, goal in (
        ("similarity, 16,384², ≥ 0.9× cuBLAS", "similarity", 16384, "cublas", 0.9),
        ("top-k, 65,536, k=10, ≥ 3× eager", "topk", 65536, "eager", 3),
    ):
        cases = [r for r in retrieval if r["op"] == op and r["N"] == n and r.get("k") in (None, 10)]
        ours = next((r for r in cases if r["provider"] not in BASELINES), None)
        out.append(speedup(text, find(cases, provider=base), ours, goal))
    projection = [r for r in results.get("projection", []) if r["mode"] == "full"]
    projection = [r for r in projection if r["N"] == 32768 and r["D"] == "768→512"]
    ours = next((r for r in projection if r["provider"] not in BASELINES), None)
    for base, goal in (("eager", 1.3), ("compile", 1.0)):
        text = f"projection, N=32,768, 768→512, forward+backward ≥ {goal}× {base}"
        out.append(speedup(text, find(projection, provider=base), ours, goal))
    return out
