"""benchmarks/render.py turns benchmark results into a table and a plot: the results format that
the runner and ``pytest benchmarks/ --benchmark-only`` write (with out-of-memory records), and the
pytest-benchmark JSON of earlier runs."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "cuda": "12.8"}


@pytest.fixture
def bench(monkeypatch):
    """Import a module of benchmarks/ (they import each other by name)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module


def info(provider, n):
    """The extra_info that the earlier pytest benchmarks recorded, less the measurements."""
    return {"provider": provider, "mode": "forward+backward", "N": n, "D": 512, "dtype": "bfloat16"}


def legacy_results():
    """Three cases at D=512: fastclip at two N (the smaller one not autotuned), eager at the larger;
    compile out of memory there."""
    timed = [
        ("fastclip", 4096, 0.002, 450.0, 12.5, {"autotune": False}),
        ("fastclip", 65536, 0.080, 440.0, 300.0, {"autotune": True}),
        ("eager", 65536, 0.200, 176.0, 40960.0, {}),
    ]
    benchmarks = [
        {
            "stats": {"median": median, "min": median, "max": median},
            "extra_info": {**info(provider, n), **ENV, "peak_mib": peak, "tflops": tflops, **more},
        }
        for provider, n, median, tflops, peak, more in timed
    ]
    return {
        "machine_info": {"python_version": "3.12.3", "cpu": {"brand_raw": "x86"}},
        "datetime": "2026-01-02T03:04:05.678+00:00",
        "benchmarks": benchmarks,
        "oom": [{**info("compile", 65536), **ENV, "oom": True}],
    }


def test_render_writes_table_and_plot(bench, tmp_path):
    pytest.importorskip("matplotlib")
    first, second = legacy_results(), legacy_results()
    first["benchmarks"], second["benchmarks"] = first["benchmarks"][:1], second["benchmarks"][1:]
    second["oom"] = []  # one run's OOM record, the cases split over two files as with `-k`
    paths = [tmp_path / "first.json", tmp_path / "second.json"]
    for path, results in zip(paths, (first, second), strict=True):
        path.write_text(json.dumps(results))
    out = tmp_path / "out"
    merged = tmp_path / "all.json"
    note = ["--note", "Tests: 9 passed (exit 0)", "--merge", str(merged)]
    bench("render").main([*map(str, paths), "--out", str(out), *note])

    summary = (out / "summary.md").read_text()
    for header in ["NVIDIA H100 80GB HBM3, CUDA 12.8", "torch 2.11.0, triton 3.6.0, Python 3.12.3"]:
        assert header in summary
    assert "2026-01-02 03:04 UTC" in summary and "Tests: 9 passed (exit 0)" in summary
    head = next(line for line in summary.splitlines() if line.startswith("| N |"))
    assert head.endswith("| provider | ms | TFLOP/s (passes) | vs eager | vs compile | peak MiB |")
    for row in [
        "| 4,096 | 512 | bfloat16 | full | fastclip | 2† | 450 | – | – | 12.5 |",
        "| 65,536 | 512 | bfloat16 | full | fastclip | 80 | 440 | 2.50× | – | 300 |",
        "| 65,536 | 512 | bfloat16 | full | eager | 200 | 176 |  |  | 40,960 |",
        "| 65,536 | 512 | bfloat16 | full | compile | OOM | – |  |  | – |",
    ]:
        assert row in summary, row
    assert "† fastclip with its default tiles, not autotuned." in summary
    png = out / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = json.loads(merged.read_text())["losses"]  # one file, in the results format
    assert sorted((r["provider"], r["N"], r.get("oom", False)) for r in rows) == [
        ("compile", 65536, True),
        ("eager", 65536, False),
        ("fastclip", 4096, False),
        ("fastclip", 65536, False),
    ]


def test_render_shows_the_passes_each_provider_executes(bench):
    """Rows as the runner and the pytest benchmarks write them: TFLOP/s with the passes counted,
    executed and at the floor, the spread of the times, each baseline's speedup."""
    rows = [
        {"provider": "blocks", "ms": 30.0, "p20": 29.0, "p80": 31.0, "tflops": 600.0, "passes": 4,
         "tflops_floor": 600.0, "floor_passes": 4, "autotune": True},
        {"provider": "eager", "ms": 114.0, "p20": 110.0, "p80": 120.0, "tflops": 118.0,
         "passes": 3, "tflops_floor": 158.0, "floor_passes": 4},
        {"provider": "compile", "ms": 90.0, "p20": 89.0, "p80": 91.0, "tflops": 150.0,
         "passes": 3, "tflops_floor": 200.0, "floor_passes": 4},
    ]  # fmt: skip
    case = {"op": "contrastive", "mode": "full", "N": 65536, "D": 512, "dtype": "bfloat16"}
    results = {"format": "fastclip-benchmarks 1", "cpu": "x86", **ENV, "gpu": None}
    summary = bench("render").markdown({**results, "losses": [{**case, **r} for r in rows]})
    assert "## InfoNCE (CLIP)" in summary
    assert "| full | blocks | 30 (29–31) | 600 (4) | 600 (4) | 3.80× | 3.00× |" in summary
    assert "| full | eager | 114 (110–120) | 118 (3) | 158 (4) |  |  |" in summary
    assert "- GPU: none: CPU (x86)" in summary


def test_pytest_benchmarks_write_the_results_format(bench, tmp_path):
    """``pytest benchmarks/ --benchmark-only``: each case's row, timed by the harness, in the
    results format inside the JSON pytest-benchmark writes, which render.py reads."""
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "benchmarks/bench_projection.py",
        "-k",
        "test_cpu",
        "--benchmark-only",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--benchmark-json={out}",
    ]
    # The CPU cases, even on a GPU machine; the PyTorch paths, not Triton's interpreter.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "0"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| 4,096 | 768→512 | float32 | full | torch |" in done.stdout  # the terminal's table
    results = bench("results").load(out)
    rows = results["projection"]
    assert {row["provider"] for row in rows} == {"torch", "eager"}
    assert all(row["p20"] <= row["ms"] <= row["p80"] and row["peak_mib"] > 0 for row in rows)
    assert results["torch"] and results["date"]
    assert "| 4,096 | 768→512 | float32 | full | torch |" in bench("render").markdown(results)
