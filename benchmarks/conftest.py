"""``pytest benchmarks/ --benchmark-only``: the case files' grids (bench_*.py) through the
harness's measurement, their rows in the results format (``results.py``).

Every case adds its row to the session's results, which ``--benchmark-json`` writes beside
pytest-benchmark's own keys (``render.py`` and ``tuning.py`` read them) and the terminal shows
at the end. pytest-benchmark runs each case's measurement once: its own columns are that
measurement's time, while the case's times (median, p20, p80 of its runs) are in its row, also
its ``extra_info``. A provider that runs out of memory is recorded as such and skipped.
"""

from __future__ import annotations

import pytest
import torch
from harness import Bench, facts, settle
from render import markdown
from results import Results

from fastclip import costs

RESULTS = pytest.StashKey[Results]()


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py too (the default pattern is test_*.py); a file named on the command line
    is collected by pytest itself."""
    is_bench = file_path.name.startswith("bench_") and file_path.suffix == ".py"
    if is_bench and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench(pytestconfig) -> Bench:
    """The session's device and results: bf16 features on a GPU, fp32 on a CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = Results(None, facts(device))
    pytestconfig.stash[RESULTS] = results
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return Bench(device, dtype, results, costs.device_constants(gpu))


@pytest.fixture(autouse=True)
def free_memory():
    """Return every case's memory to the device, so the next one starts from the same state."""
    yield
    settle(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    if RESULTS in config.stash:
        output_json.update(config.stash[RESULTS].data)


def pytest_terminal_summary(terminalreporter, config):
    if RESULTS in config.stash:
        terminalreporter.write_sep("-", "fastclip benchmarks")
        terminalreporter.write_line(markdown(config.stash[RESULTS].data))
