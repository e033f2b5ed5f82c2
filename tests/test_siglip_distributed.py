"""SigLipLoss across processes (gloo on the CPU) against the single-process float64 reference.

Every rank r holds n_local rows of one global batch of N = world_size * n_local. Its loss l_r is
its images against all N texts (its own block with positives, the other ranks' blocks negatives
only) divided by n_local, so with L the global loss (all pairs divided by N), mean_r l_r = L and
sum_r l_r = W L. What each rank must get, whatever the dist_impl:

  loss: l_r, as the per-rank float64 reference gives it.
  d image of rank r: d l_r / d x_r = W dL/dX[slice r] (only l_r sees these images).
  d text of rank r: the exchanges send every other rank's gradient of these texts back to their
    owner, so d(sum_q l_q)/dY_r = W dL/dY[slice r].
  d logit_scale, d logit_bias: each rank's own, d l_r / d(s, b); they sum to W dL/d(s, b).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from dist_helpers import global_batch, grads, results_of, run_on_ranks
from helpers import assert_close

from fastclip import SigLipLoss
from fastclip.reference import siglip_loss_reference

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.filterwarnings("ignore:torch.distributed.nn.functional:FutureWarning"),
]

N_LOCAL, DIM, SCALE, BIAS = 8, 16, 7.0, -2.0
DIST_IMPLS = ["bidir", "shift", "reduce", "gather"]
MODES = list(itertools.product(DIST_IMPLS, ["torch", "triton"]))
NAMES = ("d_image", "d_text", "d_scale", "d_bias")


def _run_mode(rank, world_size, mode, image, text):
    """One rank, one (dist_impl, backend), on this rank's slice: its loss and every gradient."""
    dist_impl, backend = mode
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    leaves = [image[rows].float(), text[rows].float(), torch.tensor(SCALE), torch.tensor(BIAS)]
    leaves = [t.requires_grad_() for t in leaves]
    loss_fn = SigLipLoss(rank=rank, world_size=world_size, dist_impl=dist_impl, backend=backend)
    loss = loss_fn(*leaves)
    loss.backward()
    return {"loss": loss.detach(), **{name: t.grad for name, t in zip(NAMES, leaves, strict=True)}}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world(request, tmp_path_factory):
    """(world_size, image, text, per-rank results): one spawn per world size for every mode."""
    world_size = request.param
    image, text = global_batch(world_size, N_LOCAL, DIM)
    out_dir = tmp_path_factory.mktemp(f"siglip-world{world_size}")
    results = run_on_ranks(_run_mode, MODES, world_size, (image, text), out_dir)
    return world_size, image, text, results


def _params():
    return [torch.tensor(v, dtype=torch.float64) for v in (SCALE, BIAS)]


def _rank_reference(image, text, rank):
    """l_r and its gradients with respect to rank r's images, all texts, scale and bias."""
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    return grads(
        lambda x, y, s, b: siglip_loss_reference(x, y, s, b, offset=rank * N_LOCAL),
        image[rows],
        text,
        *_params(),
    )


@pytest.mark.parametrize(
    "dist_impl, backend",
    MODES,
    ids=[f"{d}-{b}" for d, b in MODES],
)
def test_matches_single_process_reference(world, dist_impl, backend):
    world_size, image, text, results = world
    results = results_of(results, (dist_impl, backend))
    loss, (d_image, d_text, d_scale, d_bias) = grads(siglip_loss_reference, image, text, *_params())
    fp32 = torch.float32
    for rank, got in enumerate(results):
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        what = f"rank {rank}"
        local_loss, (local_image, _, local_scale, local_bias) = _rank_reference(image, text, rank)
        assert_close(got["loss"], local_loss, fp32, f"{what} loss")
        assert_close(got["d_image"], local_image, fp32, f"{what} d_image (own loss)")
        assert_close(got["d_image"], world_size * d_image[rows], fp32, f"{what} d_image")
        assert_close(got["d_text"], world_size * d_text[rows], fp32, f"{what} d_text")
        assert_close(got["d_scale"], local_scale, fp32, f"{what} d_scale")
        assert_close(got["d_bias"], local_bias, fp32, f"{what} d_bias")
    mean_loss = torch.stack([got["loss"] for got in results]).mean()
    assert_close(mean_loss, loss, fp32, "mean loss over ranks")
    for name, expected in (("d_scale", d_scale), ("d_bias", d_bias)):
        total = torch.stack([got[name] for got in results]).sum()
        assert_close(total, world_size * expected, fp32, f"sum of {name} over ranks")
