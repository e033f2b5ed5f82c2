"""Running test cases on several gloo ranks (spawned CPU processes) and float64 gradients."""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

JOIN_TIMEOUT_S = 240


def _worker(rank, world_size, port, run_case, cases, inputs, out_dir):
    """One rank: ``run_case(rank, world_size, case, *inputs)`` for every case; the results, or
    the tracebacks of the cases that raised, saved as {case: result}."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    results = {}
    try:
        for case in cases:
            try:
                results[case] = run_case(rank, world_size, case, *inputs)
            except Exception:
                # Reported by the parent's test of this case. A failure every rank shares keeps
                # them in step; one that desynchronizes them ends in gloo's timeout.
                results[case] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_ranks(run_case, cases, world_size: int, inputs: tuple, out_dir: Path) -> list[dict]:
    """Spawn ``world_size`` ranks that run every case; per rank, {case: result or traceback}.

    ``run_case`` must be a module-level function (the children import it). A crashed child
    raises here with its traceback; ranks still running after JOIN_TIMEOUT_S fail the test.
    """
    # The children run Triton's interpreter on the CPU; it must be on before they import triton.
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
        context = mp.spawn(
            _worker,
            args=(world_size, _free_port(), run_case, cases, inputs, str(out_dir)),
            nprocs=world_size,
            join=False,
        )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=5):  # raises ProcessRaisedException on a child's error
            if time.monotonic() > deadline:
                pytest.fail(f"{world_size} ranks did not finish in {JOIN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


def results_of(per_rank: list[dict], case) -> list:
    """Every rank's result for ``case``; fails the test with the traceback of a rank that
    raised."""
    results = [results[case] for results in per_rank]
    for rank, result in enumerate(results):
        if isinstance(result, str):
            pytest.fail(f"rank {rank} raised:\n{result}")
    return results


def global_batch(world_size: int, n_local: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (images, texts) of world_size * n_local rows, row norms spread over [0.5, 2]."""
    gen = torch.Generator().manual_seed(world_size)
    n = world_size * n_local
    image = F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=-1)
    norms = torch.empty(2, n, 1, dtype=torch.float64).uniform_(0.5, 2.0, generator=gen)
    return image * norms[0], text * norms[1]


def grads(fn, *tensors):
    """The float64 value of fn(*leaves) and its gradients with respect to every leaf."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    value = fn(*leaves)
    value.backward()
    return value.detach(), [t.grad for t in leaves]
