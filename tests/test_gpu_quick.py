"""The short GPU run's tools: benchmarks/gpu_quick.sh rehearsed whole on a CPU (the benchmarks'
runner at tiny sizes through Triton's interpreter, a process per group of parts, one JSON), its
summary, and the conversion of its results into the table that ``backend="auto"`` reads."""

import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastclip import backends, costs, registry

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
    row = {"op": op, "dtype": "bfloat16", "D": dim, "N": n, "provider": impl, "mode": "full"}
    return {**row, "floor": FLOOR, "ms": ms, "err": err, "passes": 4, "floor_passes": 4, **more}


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
        {"provider": "eager", "err": {"dx": 0.9, "dy": 0.9}},
        {"provider": "blocks", "err": ERR},
        {"provider": "blocks-mm", "err": {"dx": 0.2, "dy": 0.2}},
        {"provider": "fused", "err": ERR},
    ]
    for row in confident:
        row.update(op="contrastive", dtype="bfloat16", N=4096, D=512, scale=100.0, floor=FLOOR)
        row["loss_err"] = 1e-6
    large = [  # blocks-mm failed the confident batch: only blocks qualifies at 2^20
        {"provider": "blocks-mm", "ms": 7500.0, "auto": True},
        {"provider": "blocks", "ms": 9000.0},
    ]
    for row in large:
        row.update(op="contrastive", dtype="bfloat16", D=512, N=2**20, passes=4, floor_passes=4)
        row.update(mode="full", peak_mib=4200.0, bound_mib=4352.0)
    forward = {"op": "contrastive", "dtype": "bfloat16", "D": 512, "N": 65536, "mode": "eval"}
    losses.append({**forward, "provider": "blocks", "ms": 9.0, "tflops": 489.0})
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
            "large": large, "retrieval": retrieval}  # fmt: skip


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
    text = bench("render").markdown(fake_results(), tests="89 passed in 70.1s")
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


def test_summary_labels_predictions_with_the_constants_used(bench):
    summary = bench("render").markdown
    results = fake_results()
    results["losses"][1]["predicted_ms"] = 0.4
    h100 = summary({**results, "model_device": costs.H100.name})
    assert "| predicted ms (H100 constants) |" in h100
    other = costs.device_constants("NVIDIA A100-SXM4-80GB").name
    assert "predicted ms (H200 constants, the default)" in summary(
        {**results, "model_device": other}
    )


def test_a_process_that_ended_early_leaves_every_part_a_status(bench):
    """What the summary step makes of how gpu_quick.sh's processes ended."""
    results = {"parts": {"a": {"status": "ok"}, "b": {"status": "running"}}}
    results["parts"]["c"] = {"status": "not started"}
    results["parts"]["d"] = {"status": "interrupted"}
    processes = [
        ["a,b,c", "137", "14"],
        ["d", "124", "32"],
        ["e", "1", "14"],
        ["f", "skipped", "9"],
    ]
    lines = bench("results").reconcile(results, processes)
    status = {name: part["status"] for name, part in results["parts"].items()}
    assert status == {
        "a": "ok",
        "b": "killed at its 14 s limit (SIGINT ignored) in this part",
        "c": "not reached: its process was killed at its 14 s limit (SIGINT ignored)",
        "d": "stopped at its 32 s limit in this part",
        "e": "not reached: its process ended with exit status 1",
        "f": "skipped: the run's budget was spent before its process",
    }
    assert lines[0] == "a, b, c: exit 137 (limit 14 s)"


def test_the_script_gives_each_part_its_limit_plus_a_start(bench):
    """gpu_quick.sh's processes: every part once, each process's limit its parts' limits in
    the runner plus STARTUP_S."""
    script = (ROOT / "benchmarks" / "gpu_quick.sh").read_text()
    listed = re.search(r"^PROCESSES=\((.*?)^\)", script, flags=re.S | re.M).group(1).split()
    startup = int(re.search(r"^STARTUP_S=\$\{STARTUP_S:-(\d+)\}", script, flags=re.M).group(1))
    limits = {part.name: part.limit_s for part in bench("run").PARTS}
    names = []
    for entry in listed:
        parts, limit = entry.split(":")
        names += parts.split(",")
        assert int(limit) == sum(limits[name] for name in parts.split(",")) + startup, entry
    assert sorted(names) == sorted(limits)


def test_the_cublas_probe_times_the_planners_blocks(bench):
    """At full scale on a GPU (a device object here), the cuBLAS probe times the blocks that
    ``plan_blocks`` gives InfoNCE at 65,536 and 2^20 (D = 512) and SigLIP at 65,536 (D = 768)."""
    from fastclip.kernels.blocks import BLOCK_BYTES, plan_blocks

    full = bench("harness").Bench(torch.device("cuda"), torch.bfloat16, None, costs.H200)
    shapes = bench("probes").block_shapes(full)
    cases = [("contrastive", 65536, 512), ("contrastive", 1 << 20, 512), ("siglip", 65536, 768)]
    for op, n, dim in cases:
        R, C = plan_blocks(n, n, 2, BLOCK_BYTES)
        assert f"{op} N={n} blocks ({n // R * (n // C)})" in shapes[(R, C, dim)], shapes


@pytest.fixture
def quick(bench, monkeypatch):
    """The benchmarks' runner, whose --tiny sizes on a CPU run every part in seconds."""
    monkeypatch.setenv("FASTCLIP_AUTOTUNE", "0")
    return bench("run")


def test_tiny_run_keeps_what_finished_when_a_part_runs_out_of_time(quick, tmp_path, monkeypatch):
    def endless(bench):
        bench.add("bandwidth", {"what": "first"})
        while True:
            pass

    part = quick.Part("bandwidth", endless, 0.5)
    monkeypatch.setattr(quick, "PARTS", (part, *quick.PARTS[1:]))
    out = tmp_path / "quick.json"
    quick.main(["--tiny", "--parts", "bandwidth,cublas", "--out", str(out), "--budget", "30"])
    results = json.loads(out.read_text())
    assert results["parts"]["bandwidth"]["status"] == "stopped at its limit"
    assert results["bandwidth"] == [{"what": "first", "part": "bandwidth"}]
    assert results["parts"]["cublas"]["status"] == "ok"
    assert not list(tmp_path.glob("*.partial"))


def test_merge_adds_parts_and_replaces_a_repeated_one(quick, tmp_path):
    out = tmp_path / "quick.json"
    quick.main(["--tiny", "--parts", "cublas", "--out", str(out)])
    first = json.loads(out.read_text())
    quick.main(["--tiny", "--parts", "bandwidth,cublas", "--out", str(out), "--merge"])
    merged = json.loads(out.read_text())
    assert merged["date"] == first["date"]  # the first process's facts
    assert merged["parts"].keys() == {"cublas", "bandwidth"}
    assert len(merged["cublas"]) == len(first["cublas"])  # replaced, not appended
    assert merged["bandwidth"] and all(row["part"] == "bandwidth" for row in merged["bandwidth"])


def test_facts_name_the_first_config_of_each_kernel_that_fits(quick, bench, monkeypatch):
    """As on a GPU with a Hopper's shared memory: the configs each kernel launches without
    autotuning, the first of its autotune list."""
    from fastclip.kernels import launch

    hopper = SimpleNamespace(get_device_properties=lambda index: {"max_shared_mem": 232448})
    monkeypatch.setattr(launch, "driver", SimpleNamespace(active=SimpleNamespace(utils=hopper)))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    configs = quick.launched_configs(torch.empty(0, dtype=torch.bfloat16))
    assert configs.keys() == quick.KERNELS.keys()
    first = bench("probes").BLOCK_CONFIGS["contrastive", "blocks"][0]
    expected = {"blocks": first.kwargs, "warps": first.num_warps, "stages": first.num_stages}
    assert configs["InfoNCE G"] == {**expected, "maxnreg": first.maxnreg}


def rehearse(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """benchmarks/gpu_quick.sh on this CPU: Triton's interpreter, tiny sizes, no GPU even where
    there is one, the package as installed (no pip install)."""
    out = tmp_path / "out"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # this Python first
    env = {**os.environ, "PATH": path, "QUICK_ARGS": "--tiny", "TRITON_INTERPRET": "1",
           "SKIP_INSTALL": "1", "CUDA_VISIBLE_DEVICES": "", "OUT": str(out), **env}  # fmt: skip
    script = ["bash", "benchmarks/gpu_quick.sh"]
    done = subprocess.run(script, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    return done, out


def test_a_failed_install_check_stops_the_run_with_one_line(tmp_path):
    """A Python that cannot import the run: summary.md says so, and nothing else runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python"
    python.write_text("#!/bin/sh\necho 'ModuleNotFoundError: no torch here' >&2\nexit 1\n")
    python.chmod(0o755)
    done, out = rehearse(tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert done.returncode == 1
    summary = (out / "summary.md").read_text()
    assert "- The install check failed (exit 1): ModuleNotFoundError: no torch here" in summary
    assert {path.name for path in returned_files(out)} == {"env.txt", "summary.md"}


def returned_files(out: Path) -> list[Path]:
    """Every file under ``out``, checked as the GPU machine returns them: at most 8, at most two
    folders deep, no temporary left."""
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(files) <= 8, files
    assert all(len(path.relative_to(out).parts) <= 3 for path in files), files
    assert not [path for path in files if path.name.endswith(".partial")], files
    return files


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One rehearsal of the whole script, shared by the tests below (about a minute)."""
    done, out = rehearse(tmp_path_factory.mktemp("rehearsal"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_rehearsal_reports_every_part(rehearsal, bench):
    names = [part.name for part in bench("run").PARTS]
    files = returned_files(rehearsal)
    assert {path.name for path in files} >= {"env.txt", "tests.log", "quick.json", "summary.md"}
    results = json.loads((rehearsal / "quick.json").read_text())
    assert {name: part["status"] for name, part in results["parts"].items()} == {
        name: "ok" for name in names
    }
    parts_line = next(
        line for line in (rehearsal / "summary.md").read_text().splitlines() if "Parts:" in line
    )
    assert all(f"{name}: ok" in parts_line for name in names), parts_line


def test_rehearsal_measures_every_part(rehearsal, bench):
    results = json.loads((rehearsal / "quick.json").read_text())
    implementations = registry.names("contrastive", triton=True)
    full = [row for row in results["losses"] if row["mode"] == "full"]
    assert {row["provider"] for row in full} == {"eager", *implementations}
    for row in full:
        assert row["ms"] > 0 and row["ok"], row
        if row["provider"] != "eager":  # every stage the cost model predicts, measured
            assert row["stages_ms"].keys() == row["predicted_stages_ms"].keys(), row
    evaluation = [row for row in results["losses"] if row["mode"] == "eval"]  # no gradients
    assert {row["provider"] for row in evaluation} == {"eager", implementations[0]}
    assert all(row["ok"] for row in results["confident"] if row["provider"] != "eager")
    assert len(results["cublas"]) % 4 == 0 and all("tflops" in r for r in results["cublas"])
    for part in ("bandwidth", "block_configs", "tma", "retrieval", "projection", "large"):
        assert results[part] and all("ms" in row for row in results[part]), part
    for row in evaluation + full + results["retrieval"] + results["projection"]:
        assert row["p20"] <= row["ms"] <= row["p80"] and "tflops" in row, row
    probes = bench("probes")
    for (op, impl), listed in probes.BLOCK_CONFIGS.items():  # every config of each G kernel
        rows = [r for r in results["block_configs"] if (r["op"], r["stage"]) == (op, f"G ({impl})")]
        assert len(rows) == len(listed), (op, impl)
    forward = [r for r in results["block_configs"] if r["stage"] == "forward (persistent)"]
    assert len(forward) == len(probes.kp._FORWARD_CONFIGS)

    summary = (rehearsal / "summary.md").read_text()
    assert "## InfoNCE (CLIP)" in summary and "## auto's table" in summary
    assert "| 64 | 32 | float16 | full | blocks |" in summary
    picks = {c["pick"] for c in bench("tuning").choices(results)}
    assert picks <= set(implementations) and None not in picks


def test_a_process_past_its_limit_is_stopped_and_the_next_one_runs(tmp_path):
    """A 5 s process limit stops InfoNCE's part (or the process's start, on a slow machine);
    the next process still runs, and both parts have a status in the JSON and the summary."""
    done, out = rehearse(
        tmp_path,
        QUICK_PROCESSES="contrastive:5 bandwidth:30",
        STARTUP_S="0",
        TESTS_LIMIT_S="0",
        WARM_PARTS="",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    returned_files(out)
    status = {
        name: part["status"]
        for name, part in json.loads((out / "quick.json").read_text())["parts"].items()
    }
    assert status["bandwidth"] == "ok"
    assert "stopped at its 5 s limit" in status["contrastive"], status
    assert "contrastive: exit 124 (limit 5 s)" in (out / "summary.md").read_text()


def test_processes_past_the_budget_are_skipped_and_reported(tmp_path):
    """A 20 s budget leaves the processes less than the start they need (20 s here)."""
    start = time.monotonic()
    done, out = rehearse(
        tmp_path,
        BUDGET_S="20",
        STARTUP_S="20",
        QUICK_PROCESSES="cublas:14 bandwidth,projection:14",
        TESTS_LIMIT_S="0",
        WARM_PARTS="",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.monotonic() - start < 20
    parts = json.loads((out / "quick.json").read_text())["parts"]
    skipped = "skipped: the run's budget was spent before its process"
    assert parts == {name: {"status": skipped} for name in ("cublas", "bandwidth", "projection")}
    assert "bandwidth: skipped" in (out / "summary.md").read_text()
