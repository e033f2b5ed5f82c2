"""benchmarks/render.py turns pytest-benchmark JSON (with out-of-memory records) into a table and
a plot."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "cuda": "12.8"}


def load_render():
    spec = importlib.util.spec_from_file_location("render", ROOT / "benchmarks" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def info(provider, n):
    """The extra_info that bench_contrastive.py records, less the measurements."""
    return {"provider": provider, "mode": "forward+backward", "N": n, "D": 512, "dtype": "bfloat16"}


def fake_results():
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


def test_render_writes_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    first, second = fake_results(), fake_results()
    first["benchmarks"], second["benchmarks"] = first["benchmarks"][:1], second["benchmarks"][1:]
    second["oom"] = []  # one run's OOM record, the cases split over two files as with `-k`
    paths = [tmp_path / "first.json", tmp_path / "second.json"]
    for path, results in zip(paths, (first, second), strict=True):
        path.write_text(json.dumps(results))
    out = tmp_path / "out"
    load_render().main([*map(str, paths), "--out", str(out), "--note", "Tests: 9 passed (exit 0)"])

    summary = (out / "summary.md").read_text()
    for header in ["NVIDIA H100 80GB HBM3, CUDA 12.8", "torch 2.11.0, triton 3.6.0, Python 3.12.3"]:
        assert header in summary
    assert "2026-01-02 03:04 UTC" in summary and "Tests: 9 passed (exit 0)" in summary
    head = next(line for line in summary.splitlines() if line.startswith("| mode"))
    assert head.endswith("| compile peak MiB | fastclip vs eager | fastclip vs compile |")
    assert (
        "| forward+backward | bfloat16 | 512 | 65,536 | 80 | 440 | 300 | 200 | 176 | 40,960 "
        "| OOM | OOM | OOM | 2.50× | – |"
    ) in summary
    assert "| forward+backward | bfloat16 | 512 | 4,096 | 2† | 450 | 12.5 | – | – | – " in summary
    assert "† fastclip with its default tiles, not autotuned." in summary
    png = out / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_render_lists_the_passes_each_provider_executes(tmp_path):
    pytest.importorskip("matplotlib")
    results = fake_results()
    for bench, passes in zip(results["benchmarks"], (4, 4, 3), strict=True):
        bench["extra_info"]["passes"] = passes
    results["benchmarks"][0]["extra_info"]["provider"] = "fastclip-blocks"
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(results))
    load_render().main([str(path), "--out", str(tmp_path)])
    summary = (tmp_path / "summary.md").read_text()
    expected = "forward+backward: eager 3, fastclip 4, fastclip-blocks 4."
    assert f"TFLOP/s count the matmul passes as executed: {expected}" in summary
