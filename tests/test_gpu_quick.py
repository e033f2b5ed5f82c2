"""The short GPU run's tools: benchmarks/gpu_quick.py's logic at tiny sizes (through Triton's
interpreter on a CPU), its summary, and the conversion of its results into the table that
``backend="auto"`` reads."""

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch

from fastclip import backends, costs

ROOT = Path(__file__).resolve().parents[1]
ERR = {"dx": 4e-3, "dy": 4e-3, "dscale": 1e-3}
FLOOR = {"dx": 2.3e-3, "dy": 2.3e-3}


@pytest.fixture
def bench(monkeypatch):
    """Import a module of benchmarks/ (they import each other by name)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module


@pytest.fixture
def tuning_file(tmp_path, monkeypatch):
    """Point fastclip.backends at a tuning.json of the test's own."""
    path = tmp_path / "tuning.json"
    monkeypatch.setattr(backends, "TUNING", path)
    backends._measured.cache_clear()
    yield path
    backends._measured.cache_clear()


def loss_row(op, n, impl, ms, err=ERR, **more):
    dim = 512 if op == "contrastive" else 768
    row = {"op": op, "dtype": "bfloat16", "D": dim, "N": n, "impl": impl, "floor": FLOOR}
    return {**row, "ms": ms, "err": err, "passes": 4, "floor_passes": 4, **more}


def fake_results():
    """A full GPU run: InfoNCE at two N, SigLIP at one; some implementations disqualified."""
    bad = {"dx": 0.5, "dy": 0.5}
    losses = [
        loss_row("contrastive", 4096, "eager", 1.0, {"dx": 0.03, "dy": 0.03}),
        loss_row("contrastive", 4096, "blocks", 0.5),
        loss_row("contrastive", 4096, "blocks-mm", 0.4, bad),  # fastest, but wrong
        loss_row("contrastive", 4096, "fused", 0.9),
        loss_row("contrastive", 65536, "eager", 114.0, {"dx": 0.03, "dy": 0.03}),
        loss_row("contrastive", 65536, "blocks", 30.0, peak_mib=300.0, bound_mib=512.0),
        loss_row("contrastive", 65536, "blocks-mm", 29.0),  # wrong on the confident batch
        loss_row("contrastive", 65536, "fused", 130.0),
        loss_row("siglip", 65536, "eager", 83.0, {"dx": 0.03, "dy": 0.03}),
        {**loss_row("siglip", 65536, "blocks", None), "oom": True},
        loss_row("siglip", 65536, "blocks-mm", 35.0, peak_mib=600.0, bound_mib=480.0),
        loss_row("siglip", 65536, "fused", 200.0),
    ]
    del losses[9]["ms"]
    confident = [
        {"impl": "eager", "err": {"dx": 0.9, "dy": 0.9}},
        {"impl": "blocks", "err": ERR},
        {"impl": "blocks-mm", "err": {"dx": 0.2, "dy": 0.2}},
        {"impl": "fused", "err": ERR},
    ]
    for row in confident:
        row.update(op="contrastive", dtype="bfloat16", N=4096, D=512, scale=100.0, floor=FLOOR)
        row["loss_err"] = 1e-6
    large = [  # blocks-mm failed the confident batch: only blocks qualifies at 2^20
        {"impl": "blocks-mm", "ms": 7500.0, "auto": True},
        {"impl": "blocks", "ms": 9000.0},
    ]
    for row in large:
        row.update(op="contrastive", dtype="bfloat16", D=512, N=2**20, passes=4, floor_passes=4)
        row.update(peak_mib=4200.0, bound_mib=4352.0)
    forward = {"op": "contrastive", "N": 65536, "provider": "fastclip", "ms": 9.0, "tflops": 489.0}
    retrieval = [
        {"op": "similarity", "provider": "fastclip", "mode": "forward", "N": 16384, "ms": 0.5},
        {"op": "similarity", "provider": "cublas", "mode": "forward", "N": 16384, "ms": 0.4},
        {"op": "topk", "provider": "fastclip", "mode": "k=10", "N": 65536, "ms": 10.0},
        {"op": "topk", "provider": "eager", "mode": "k=10", "N": 65536, "ms": 40.0},
    ]
    for row in retrieval:
        row["D"] = 512
    facts = {"gpu": "NVIDIA H200", "date": "2026-12-01 10:00 UTC", "torch": "2.11.0"}
    facts.update(triton="3.6.0", cuda="13.0", tiny=False, sms=132, memory_gib=139.8)
    parts = {"contrastive": {"status": "ok", "seconds": 8.1, "limit_s": 40}}
    return {**facts, "parts": parts, "losses": losses, "confident": confident,
            "large": large, "forward": [forward], "retrieval": retrieval}  # fmt: skip


def test_within_tolerance(bench):
    within = bench("tuning").within_tolerance
    assert within(ERR, FLOOR, {"dx": 0.03, "dy": 0.03})
    assert not within({"dx": 0.02, "dy": 4e-3}, FLOOR)  # beyond 2 x floor + 1e-2
    assert not within({"dx": 0.012, "dy": 4e-3}, FLOOR, {"dx": 0.011, "dy": 0.02})  # > eager's
    assert within({"dx": 0.012, "dy": 4e-3}, FLOOR, {"dx": float("nan"), "dy": 0.02})
    assert not within({"dx": float("nan"), "dy": 4e-3}, FLOOR)


def test_tuning_picks_the_fastest_within_tolerance(bench, tuning_file):
    tuning = bench("tuning")
    table = tuning.tuning(fake_results())
    assert table["source"]["gpu"] == "NVIDIA H200"
    by_n = {"4096": "blocks", "65536": "blocks", "1048576": "blocks"}
    assert table["contrastive"] == {"bfloat16": {"512": by_n}}
    assert table["siglip"] == {"bfloat16": {"768": {"65536": "blocks-mm"}}}
    rejected = {(c["op"], c["N"]): c["rejected"] for c in tuning.choices(fake_results())}
    assert rejected[("contrastive", 4096)] == {"blocks-mm": "gradient error beyond tolerance"}
    assert "confident" in rejected[("contrastive", 65536)]["blocks-mm"]
    assert rejected[("siglip", 65536)] == {"blocks": "out of memory"}
    assert rejected[("contrastive", 2**20)] == {
        "blocks-mm": "gradient error beyond tolerance on the confident batch"
    }

    # What fastclip.backends makes of it: the nearest measured D and N bucket.
    tuning_file.write_text(json.dumps(table))
    assert backends.fastest("contrastive", torch.bfloat16, 768, 50000) == "blocks"
    assert backends.fastest("siglip", torch.bfloat16, 768, 2**20) == "blocks-mm"
    expected = costs.fastest("siglip", ("blocks", "blocks-mm", "fused"), 4096, 512, 4)
    assert backends.fastest("siglip", torch.float32, 512, 4096) == expected  # not measured


def test_tuning_cli_writes_the_table_and_refuses_tiny_runs(bench, tmp_path, capsys):
    tuning = bench("tuning")
    results = tmp_path / "quick.json"
    results.write_text(json.dumps(fake_results()))
    out = tmp_path / "tuning.json"
    tuning.main([str(results), "--out", str(out)])
    assert json.loads(out.read_text())["contrastive"]["bfloat16"]["512"]["65536"] == "blocks"
    assert "siglip bfloat16 D=768 N=65536: blocks-mm" in capsys.readouterr().out
    results.write_text(json.dumps({**fake_results(), "tiny": True}))
    with pytest.raises(SystemExit):
        tuning.main([str(results), "--out", str(out)])


def test_summary_checks_the_targets(bench):
    text = bench("quick_summary").summary(fake_results(), tests="89 passed in 70.1s")
    lines = text.splitlines()
    assert "- GPU: NVIDIA H200 (132 SMs, 140 GiB), CUDA 13.0" in lines
    assert "- CUDA tests: 89 passed in 70.1s" in lines
    for row in [
        "| InfoNCE (CLIP), N=65,536, D=512, forward+backward ≤ 32 ms | blocks: 30 ms | yes |",
        "| InfoNCE (CLIP), N=65,536, D=512, forward+backward ≥ 3.5× eager | 3.80× | yes |",
        "| SigLIP, N=65,536, D=768, forward+backward ≤ 33 ms | blocks-mm: 35 ms | **no** |",
        "| InfoNCE, N=1,048,576, D=512: ≤ 8 s within 5 GB | blocks: 9.00 s, 4,200 MiB | **no** |",
        "| InfoNCE forward, N=65,536: ≥ 450 TFLOP/s | 489 | yes |",
        "| similarity, 16,384², ≥ 0.9× cuBLAS | 0.80× | **no** |",
        "| top-k, 65,536, k=10, ≥ 3× eager | 4.00× | yes |",
        "| peak extra memory ≤ N·D·8 bytes + the buffer | 3 of 4 cases; over: siglip "
        "blocks-mm N=65,536 | **no** |",
        "| projection, N=32,768, 768→512, forward+backward ≥ 1.3× eager | not measured | – |",
    ]:
        assert row in lines, row
    assert "| InfoNCE (CLIP) | bfloat16 | 512 | 4,096 | blocks | blocks-mm: gradient error" in text


@pytest.fixture
def tiny(bench, monkeypatch):
    """gpu_quick at its tiny sizes, narrower still: every part in seconds on a CPU."""
    quick = bench("gpu_quick")
    sizes = dataclasses.replace(quick.TINY, batches=(64,), confident=32, large=128)
    monkeypatch.setattr(quick, "TINY", dataclasses.replace(sizes, block_configs_n=32))
    losses = {op: dataclasses.replace(loss, D=32) for op, loss in quick.LOSSES.items()}
    monkeypatch.setattr(quick, "LOSSES", losses)
    monkeypatch.setattr(quick, "PROJECTION", (48, 32))
    monkeypatch.setattr(quick, "RETRIEVAL_D", 32)
    monkeypatch.setenv("FASTCLIP_AUTOTUNE", "0")
    return quick


def test_tiny_run_measures_every_part(tiny, bench, tmp_path):
    out = tmp_path / "quick.json"
    tiny.main(["--tiny", "--out", str(out)])
    results = json.loads(out.read_text())

    assert {name: part["status"] for name, part in results["parts"].items()} == {
        part.name: "ok" for part in tiny.PARTS
    }
    assert {row["impl"] for row in results["losses"]} == {"eager", "blocks", "blocks-mm", "fused"}
    for row in results["losses"]:
        assert row["ms"] > 0 and row["ok"], row
        if row["impl"] != "eager":  # every stage the cost model predicts, measured
            assert row["stages_ms"].keys() == row["predicted_stages_ms"].keys(), row
    assert all(row["ok"] for row in results["confident"] if row["impl"] != "eager")
    assert len(results["cublas"]) % 4 == 0 and all("tflops" in r for r in results["cublas"])
    for part in ("bandwidth", "block_configs", "forward", "retrieval", "projection", "large"):
        assert results[part] and all("ms" in row for row in results[part]), part

    summary = bench("quick_summary").summary(results)
    assert "## InfoNCE (CLIP), D=32" in summary and "## auto's table" in summary
    picks = {c["pick"] for c in bench("tuning").choices(results)}
    assert picks <= {"blocks", "blocks-mm", "fused"} and None not in picks


def test_tiny_run_keeps_what_finished_when_a_part_runs_out_of_time(tiny, tmp_path, monkeypatch):
    def endless(run):
        run.results.add("bandwidth", {"what": "first"})
        while True:
            pass

    part = tiny.Part("bandwidth", endless, 0.5)
    monkeypatch.setattr(tiny, "PARTS", (part, *tiny.PARTS[1:]))
    out = tmp_path / "quick.json"
    tiny.main(["--tiny", "--parts", "bandwidth,cublas", "--out", str(out), "--budget", "30"])
    results = json.loads(out.read_text())
    assert results["parts"]["bandwidth"]["status"] == "stopped at its limit"
    assert results["bandwidth"] == [{"what": "first"}]
    assert results["parts"]["cublas"]["status"] == "ok"
