"""The demo's and the benchmarks' measurements say nothing on stderr of their own: the CPU peak
memory measure (torch's profiler) keeps its chatter to itself, and passes on everything else."""

import os
import subprocess
import sys

import torch

from fastclip.measure import PROFILER_CHATTER, peak_memory_bytes

CHATTER = (*PROFILER_CHATTER, "USDT", "CPUAllocator", "profiler")


def test_the_demo_prints_no_profiler_chatter():
    command = [sys.executable, "-m", "fastclip.demo", "--n", "8", "--dim", "4", "--repeats", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fastclip" in result.stdout and "eager PyTorch" in result.stdout
    noise = [line for line in result.stderr.splitlines() if any(c in line for c in CHATTER)]
    assert not noise, result.stderr[-3000:]


def test_peak_memory_passes_on_what_the_function_writes(capfd):
    before = torch.randn(256, 256)  # freed inside the profiler: its "unknown size" warning

    def fn():
        nonlocal before
        before = before * 2  # (256, 256) fp32 allocated, the old one freed
        os.write(2, b"from the function's C side\n")
        print("from the function's Python side", file=sys.stderr)

    peak = peak_memory_bytes(fn, torch.device("cpu"))
    assert peak >= 256 * 256 * 4
    err = capfd.readouterr().err
    assert "from the function's C side" in err and "Python side" in err, err
    assert not [line for line in err.splitlines() if any(c in line for c in CHATTER)], err
