"""Benchmark plumbing: bench_*.py collected, out-of-memory records in the JSON output, memory
freed between cases.

A provider that runs out of memory has no time to report, and pytest-benchmark saves only cases
that were timed. Such a case is therefore skipped with the reason "out of memory" and appended to
a list that ``pytest_benchmark_update_json`` writes under the top-level key ``"oom"`` of the
``--benchmark-json`` file, next to ``"benchmarks"``; ``render.py`` shows those cells as OOM.
"""

from __future__ import annotations

import gc

import pytest
import torch

OOM_KEY = pytest.StashKey[list]()


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py too (the default pattern is test_*.py); a file named on the command line
    is collected by pytest itself."""
    is_bench = file_path.name.startswith("bench_") and file_path.suffix == ".py"
    if is_bench and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def oom_log(request) -> list[dict]:
    """The session's out-of-memory records: append one ``extra_info``-style dict per case."""
    return request.config.stash.setdefault(OOM_KEY, [])


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["oom"] = config.stash.get(OOM_KEY, [])


@pytest.fixture(autouse=True)
def free_memory():
    """Return every case's memory to the device, so the next one starts from the same state."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
