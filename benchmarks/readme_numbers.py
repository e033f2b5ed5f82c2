"""The README's numbers, as a user gets them: each command run over several seeds, every printed
metric's median and range, with the wall and CPU time of each run and the machine they ran on.

    python benchmarks/readme_numbers.py --out benchmarks/results/<date>-cpu-readme
    python benchmarks/readme_numbers.py --parts demo --seeds 0 1 2 --out ...

Parts (each run is a fresh process through the real entry point, one after another):

    train     ``fastclip train --seed S``: the main job (tiny CLIP on shapes, 1,500 steps);
              its final evaluation, read from the run's metrics.jsonl
    finetune  ``fastclip finetune --compare --seed S --data-seed S``: a fresh tiny CLIP
              pretrained on digits, then every method at k = 1, 4, 16
    demo      ``python -m fastclip.demo --n 16384 --dim 512 --dtype float32 --seed S``: the fused
              loss's PyTorch path against eager PyTorch (the headline table's CPU row)

Writes into ``--out``: ``runs.jsonl`` (one record per run, appended as each ends, so that a run
cut short keeps what finished) and ``readme_numbers.md`` (the tables, rewritten after every run).
The run directories and logs go to ``--scratch``. CPU time is user + system time of the run's
process and its children; on a machine shared with other work the wall time varies more than it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SEEDS = (0, 1, 2)
DEMO = ("--n", "16384", "--dim", "512", "--dtype", "float32")  # the headline table's CPU row
SMOKE = {  # tiny settings, to try the script itself in a minute
    "train": ("--steps", "2", "--samples", "64", "--batch-size", "16"),
    "finetune": ("--pretrain-steps", "1", "--shots", "1"),
    "demo": ("--n", "256", "--dim", "16", "--repeats", "1"),
}
DEMO_ROW = re.compile(r"^(fastclip|eager PyTorch)\s+(\S+)\s+(\S+)\s+(\S+)\s*$")
TABLE_ROW = re.compile(r"^\| (\S[^|]*?) \|((?: [\d.]+% \|)+)\s*$")


def machine() -> dict:
    """The CPU's model name and cores, the libraries, the date."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


def timed(command: list[str], log: Path) -> tuple[str, float, float]:
    """Run ``command`` to its end, its output into ``log``: (stdout, wall s, CPU s)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tic = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    log.write_text(f"$ {' '.join(command)}\n{result.stdout}\n--- stderr ---\n{result.stderr}")
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}: {tail[0]}")
    return result.stdout, wall, cpu


def run_train(seed: int, scratch: Path, extra: tuple[str, ...]) -> tuple[list[str], dict]:
    out = scratch / f"train-{seed}"
    command = ["-m", "fastclip.cli", "train", "--seed", str(seed), "--out", str(out)]
    command += ["--overwrite", *extra]

    def metrics(_: str) -> dict:  # the last evaluation record: the final evaluation
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        final = [r for r in records if "loss" not in r][-1]
        return {k: v for k, v in final.items() if k != "step"}

    return command, metrics


def run_finetune(seed: int, scratch: Path, extra: tuple[str, ...]) -> tuple[list[str], dict]:
    out = scratch / f"finetune-{seed}"
    command = ["-m", "fastclip.cli", "finetune", "--compare", "--seed", str(seed)]
    command += ["--data-seed", str(seed), "--out", str(out), *extra]

    def metrics(_: str) -> dict:  # "method/k=1": accuracy, from the table it wrote
        values, shots = {}, []
        for line in (out / "compare.md").read_text().splitlines():
            if line.startswith("| method"):
                shots = re.findall(r"k = (\d+)", line)
            elif match := TABLE_ROW.match(line):
                cells = re.findall(r"([\d.]+)%", match.group(2))
                for k, cell in zip(shots, cells, strict=True):
                    values[f"{match.group(1)}/k={k}"] = float(cell) / 100
        return values

    return command, metrics


def run_demo(seed: int, scratch: Path, extra: tuple[str, ...]) -> tuple[list[str], dict]:
    command = ["-m", "fastclip.demo", *(extra or DEMO), "--seed", str(seed)]

    def metrics(stdout: str) -> dict:  # "fastclip/ms": ..., per provider: loss, ms, peak MiB
        values = {}
        for line in stdout.splitlines():
            if match := DEMO_ROW.match(line):
                name, loss, ms, mib = match.groups()
                values |= {f"{name}/loss": float(loss), f"{name}/ms": float(ms)}
                values[f"{name}/peak MiB"] = float(mib)
        return values

    return command, metrics


PARTS = {"train": run_train, "finetune": run_finetune, "demo": run_demo}
TITLES = {
    "train": "`fastclip train` (the main job: `tiny` on shapes, 1,500 steps)",
    "finetune": "`fastclip finetune --compare` (pretraining on digits included)",
    "demo": "`fastclip-demo --n 16384 --dim 512 --dtype float32` (InfoNCE, PyTorch path)",
}


def spread(values: list[float], digits: int = 1, unit: str = "") -> str:
    """The median, and the range where the runs differ: '99.6% (99.1–99.8%)'."""
    median, low, high = (f"{x:.{digits}f}" for x in (statistics.median(values), *minmax(values)))
    return f"{median}{unit}" if low == high else f"{median}{unit} ({low}–{high}{unit})"


def minmax(values: list[float]) -> tuple[float, float]:
    return min(values), max(values)


def render(info: dict, records: list[dict]) -> str:
    """Every part's metrics as markdown: median (range) over its runs, the times below."""
    seeds = sorted({r["seed"] for r in records})
    lines = [
        "# The README's numbers",
        "",
        f"{info['cpu']}, {info['cores']} cores; torch {info['torch']}, Python {info['python']}; "
        f"{info['date']}. `python benchmarks/readme_numbers.py`: each command run once per "
        f"seed ({', '.join(map(str, seeds))}), one after another; every cell the median over "
        "the runs, with their range in brackets where they differ.",
    ]
    for part in PARTS:
        runs = sorted((r for r in records if r["part"] == part), key=lambda r: r["seed"])
        if not runs:
            continue
        seeds = ", ".join(str(r["seed"]) for r in runs)
        lines += ["", f"## {TITLES[part]}", "", f"{len(runs)} runs, seeds {seeds}.", ""]
        keys = [k for k in runs[0]["metrics"] if all(k in r["metrics"] for r in runs)]

        def cell(key: str, scale: float = 100, digits: int = 1, unit: str = "%") -> str:
            return spread([scale * r["metrics"][key] for r in runs], digits, unit)  # noqa: B023

        if part == "finetune":  # a row per method, a column per k
            rows = list(dict.fromkeys(k.split("/")[0] for k in keys))
            shots = list(dict.fromkeys(k.split("/")[1] for k in keys))
            lines += ["| method | " + " | ".join(k.replace("=", " = ") for k in shots) + " |"]
            lines += ["|---|" + "---:|" * len(shots)]
            lines += [
                f"| {r} | " + " | ".join(cell(f"{r}/{k}") for k in shots) + " |" for r in rows
            ]
        elif part == "demo":  # a row per provider
            lines += ["| | loss | forward+backward | peak memory |", "|---|---:|---:|---:|"]
            for name in dict.fromkeys(k.split("/")[0] for k in keys):
                loss = cell(f"{name}/loss", 1, 6, "")
                seconds = cell(f"{name}/ms", 1e-3, 1, " s")
                gib = cell(f"{name}/peak MiB", 1 / 1024, 2, " GiB")
                lines += [f"| {name} | {loss} | {seconds} | {gib} |"]
            if all(f"{name}/ms" in keys for name in ("fastclip", "eager PyTorch")):
                ratios = [
                    r["metrics"]["fastclip/ms"] / r["metrics"]["eager PyTorch/ms"] for r in runs
                ]
                lines += ["", f"fastclip's time over eager's, run by run: {spread(ratios, 2)}."]
        else:
            lines += ["| metric (final evaluation) | median (range) |", "|---|---:|"]
            lines += [f"| {k} | {cell(k)} |" for k in keys]
        wall = spread([r["wall_s"] / 60 for r in runs], 1, " min")
        cpu = spread([r["cpu_s"] for r in runs], 0, " CPU-s")
        load = statistics.median(r["load"] for r in runs)
        lines += ["", f"Per run: {wall} wall, {cpu} (median load average {load:.1f} at starts)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for runs.jsonl and readme_numbers.md")
    p.add_argument("--scratch", default="runs/readme_numbers", help="run directories and logs")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--smoke", action="store_true", help="tiny settings: try the script itself")
    args = p.parse_args(argv)
    out, scratch = Path(args.out), Path(args.scratch)
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    info, records = machine(), []
    runs = out / "runs.jsonl"
    if runs.exists():  # a run cut short: keep what finished, do the rest
        records = [json.loads(line) for line in runs.read_text().splitlines() if line.strip()]
    (out / "machine.json").write_text(json.dumps(info, indent=1) + "\n")
    for part in args.parts:
        for seed in args.seeds:
            if any(r["part"] == part and r["seed"] == seed for r in records):
                continue
            extra = SMOKE[part] if args.smoke else ()
            command, metrics = PARTS[part](seed, scratch, extra)
            load = os.getloadavg()[0]
            print(f"{part}, seed {seed}: {' '.join(command)}", flush=True)
            stdout, wall, cpu = timed([sys.executable, *command], scratch / f"{part}-{seed}.log")
            record = {"part": part, "seed": seed, "wall_s": wall, "cpu_s": cpu, "load": load}
            record["metrics"] = metrics(stdout)
            records.append(record)
            with runs.open("a") as f:
                f.write(json.dumps(record) + "\n")
            (out / "readme_numbers.md").write_text(render(info, records))
            print(f"  {wall:.0f} s wall, {cpu:.0f} CPU-s: {record['metrics']}", flush=True)
    print(render(info, records))


if __name__ == "__main__":
    main()
