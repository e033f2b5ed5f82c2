"""A pytest plugin that keeps only the tests that need a CUDA device (those marked with the
test helpers' ``needs_cuda``, or ``pytest.mark.cuda``): the GPU scripts' test step.

    PYTHONPATH=benchmarks python -m pytest tests/test_contrastive.py -p cuda_only
"""

from __future__ import annotations

REASON = "needs a CUDA device"  # tests/helpers.py's needs_cuda


def needs_cuda(item) -> bool:
    skips = item.iter_markers("skipif")
    return item.get_closest_marker("cuda") is not None or any(
        mark.kwargs.get("reason") == REASON for mark in skips
    )


def pytest_collection_modifyitems(config, items):
    kept = [item for item in items if needs_cuda(item)]
    config.hook.pytest_deselected(items=[item for item in items if not needs_cuda(item)])
    items[:] = kept
