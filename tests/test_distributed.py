"""ClipLoss across processes (gloo on the CPU) against the single-process float64 reference.

Every rank holds n_local rows of one global batch. With N = world_size * n_local, L the global loss
and l_r rank r's local loss (its n_local rows against all N columns, both directions, mean over its
rows), mean_r l_r = L. What each rank's ClipLoss must give:

  loss:  non-local: L on every rank.  local: l_r (so the mean over ranks is L).
  d features of rank r:
    gather_with_grad: the all-gather's backward sums every rank's gradient into the owner's slice,
      so rank r gets d(sum_q loss_q)/dX_r = world_size * dL/dX[slice r] in both modes (non-local:
      sum_q L = W L; local: sum_q l_q = W L).
    non-local without it: only rank r's own slice is live in its copy of L: dL/dX[slice r].
    local without it: the gathered copies are constants: d l_r / d x_r with the others detached.
  d logit_scale: each rank's scale is its own, never gathered: dL/ds (non-local) or dl_r/ds
    (local, so the sum over ranks is W dL/ds), whatever gather_with_grad is. DDP averages this
    gradient over ranks, which gives dL/ds in every mode.
  d logit_bias: exactly 0.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from dist_helpers import global_batch, grads, results_of, run_on_ranks
from helpers import assert_close

from fastclip import ClipLoss
from fastclip.reference import clip_loss_reference

pytestmark = pytest.mark.distributed

N_LOCAL, DIM, SCALE, BIAS = 8, 16, 7.0, -2.0
MODES = list(itertools.product([False, True], [False, True], ["torch", "triton"]))


def _run_mode(rank, world_size, mode, image, text):
    """One rank, one mode, on this rank's slice: its loss and every gradient."""
    local_loss, gather_with_grad, backend = mode
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    x = image[rows].float().requires_grad_()
    y = text[rows].float().requires_grad_()
    scale = torch.tensor(SCALE, requires_grad=True)
    bias = torch.tensor(BIAS, requires_grad=True)
    loss_fn = ClipLoss(
        local_loss, gather_with_grad, rank=rank, world_size=world_size, backend=backend
    )
    loss = loss_fn(x, y, scale, bias)
    loss.backward()
    result = {"loss": loss.detach(), "d_image": x.grad, "d_text": y.grad}
    result.update(d_scale=scale.grad, d_bias=bias.grad)
    return result


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world(request, tmp_path_factory):
    """(world_size, image, text, per-rank results): one spawn per world size for every mode."""
    world_size = request.param
    image, text = global_batch(world_size, N_LOCAL, DIM)
    out_dir = tmp_path_factory.mktemp(f"world{world_size}")
    results = run_on_ranks(_run_mode, MODES, world_size, (image, text), out_dir)
    return world_size, image, text, results


def _global_reference(image, text):
    return grads(
        lambda x, y, s, b: clip_loss_reference(x, y, s, b),
        image,
        text,
        torch.tensor(SCALE, dtype=torch.float64),
        torch.tensor(BIAS, dtype=torch.float64),
    )


def _local_reference(image, text, rank):
    """Rank r's local loss, its own rows live and the gathered copies constants."""
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    offset = rank * N_LOCAL

    def local_loss(x, y, s, b):
        kw = {"offset": offset, "both_directions": False}
        return 0.5 * (
            clip_loss_reference(x, text, s, b, **kw) + clip_loss_reference(y, image, s, b, **kw)
        )

    scale, bias = (torch.tensor(v, dtype=torch.float64) for v in (SCALE, BIAS))
    return grads(local_loss, image[rows], text[rows], scale, bias)


@pytest.mark.parametrize(
    "local_loss, gather_with_grad, backend",
    MODES,
    ids=[f"{'local' if m[0] else 'global'}-{'grad' if m[1] else 'nograd'}-{m[2]}" for m in MODES],
)
def test_matches_single_process_reference(world, local_loss, gather_with_grad, backend):
    world_size, image, text, results = world
    loss, (d_image, d_text, d_scale, _) = _global_reference(image, text)
    results = results_of(results, (local_loss, gather_with_grad, backend))
    fp32 = torch.float32
    for rank, got in enumerate(results):
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        what = f"rank {rank}"
        local = _local_reference(image, text, rank)
        if local_loss:
            assert_close(got["loss"], local[0], fp32, f"{what} local loss")
            assert_close(got["d_scale"], local[1][2], fp32, f"{what} d_scale")
        else:
            assert_close(got["loss"], loss, fp32, f"{what} loss")
            assert_close(got["d_scale"], d_scale, fp32, f"{what} d_scale")
        if gather_with_grad:
            expected = world_size * d_image[rows], world_size * d_text[rows]
        elif local_loss:
            expected = local[1][0], local[1][1]
        else:
            expected = d_image[rows], d_text[rows]
        assert_close(got["d_image"], expected[0], fp32, f"{what} d_image")
        assert_close(got["d_text"], expected[1], fp32, f"{what} d_text")
        assert torch.equal(got["d_bias"], torch.zeros(())), f"{what} d_bias"
    # Across ranks: the mean of the losses is the global loss, the sum of d_scale W times its
    # gradient.
    mean_loss = torch.stack([got["loss"] for got in results]).mean()
    assert_close(mean_loss, loss, fp32, "mean loss over ranks")
    total_d_scale = torch.stack([got["d_scale"] for got in results]).sum()
    assert_close(total_d_scale, world_size * d_scale, fp32, "sum of d_scale over ranks")
