"""ClipLoss and SigLipLoss across processes (gloo on the CPU) against the single-process float64
reference, in every mode of each.

Every rank r holds n_local rows of one global batch of N = world_size * n_local. With L the global
loss and l_r rank r's local loss (its n_local rows against all N columns), mean_r l_r = L.

ClipLoss (l_r: both directions, mean over its rows). What each rank must give:

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

SigLipLoss (l_r: its images against all N texts, its own block with positives, the other ranks'
blocks negatives only, divided by n_local), whatever the dist_impl:

  loss: l_r, as the per-rank float64 reference gives it.
  d image of rank r: d l_r / d x_r = W dL/dX[slice r] (only l_r sees these images).
  d text of rank r: the exchanges send every other rank's gradient of these texts back to their
    owner, so d(sum_q l_q)/dY_r = W dL/dY[slice r].
  d logit_scale, d logit_bias: each rank's own, d l_r / d(s, b); they sum to W dL/d(s, b).

Both: the mean of the losses over ranks is L, the sums of d_scale and d_bias W times L's.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from dist_helpers import global_batch, grads, results_of, run_on_ranks
from helpers import assert_close

from fastclip import ClipLoss, SigLipLoss
from fastclip.reference import clip_loss_reference, siglip_loss_reference

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.filterwarnings("ignore:torch.distributed.nn.functional:FutureWarning"),
]

N_LOCAL, DIM, SCALE, BIAS = 8, 16, 7.0, -2.0
BACKENDS = ["torch", "triton"]
# (loss, *options, backend): ClipLoss's (local_loss, gather_with_grad), SigLipLoss's dist_impl.
MODES = [("clip", *m) for m in itertools.product([False, True], [False, True], BACKENDS)]
MODES += [
    ("siglip", *m) for m in itertools.product(["bidir", "shift", "reduce", "gather"], BACKENDS)
]
NAMES = ("d_image", "d_text", "d_scale", "d_bias")


def mode_id(mode) -> str:
    if mode[0] == "clip":
        _, local_loss, gather_with_grad, backend = mode
        local = "local" if local_loss else "global"
        return f"clip-{local}-{'grad' if gather_with_grad else 'nograd'}-{backend}"
    return "-".join(mode)


def _run_mode(rank, world_size, mode, image, text):
    """One rank, one mode, on this rank's slice: its loss and every gradient."""
    loss, *options, backend = mode
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    leaves = [image[rows].float(), text[rows].float(), torch.tensor(SCALE), torch.tensor(BIAS)]
    leaves = [t.requires_grad_() for t in leaves]
    kw = {"rank": rank, "world_size": world_size, "backend": backend}
    if loss == "clip":
        loss_fn = ClipLoss(*options, **kw)
    else:
        loss_fn = SigLipLoss(dist_impl=options[0], **kw)
    value = loss_fn(*leaves)
    value.backward()
    return {"loss": value.detach(), **{name: t.grad for name, t in zip(NAMES, leaves, strict=True)}}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world(request, tmp_path_factory):
    """(world_size, image, text, per-rank results): one spawn per world size for every mode."""
    world_size = request.param
    image, text = global_batch(world_size, N_LOCAL, DIM)
    out_dir = tmp_path_factory.mktemp(f"world{world_size}")
    results = run_on_ranks(_run_mode, MODES, world_size, (image, text), out_dir)
    return world_size, image, text, results


def _params():
    return [torch.tensor(v, dtype=torch.float64) for v in (SCALE, BIAS)]


def _clip_local_reference(image, text, rank):
    """ClipLoss's l_r, its own rows live and the gathered copies constants."""
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    kw = {"offset": rank * N_LOCAL, "both_directions": False}

    def local_loss(x, y, s, b):
        return 0.5 * (
            clip_loss_reference(x, text, s, b, **kw) + clip_loss_reference(y, image, s, b, **kw)
        )

    return grads(local_loss, image[rows], text[rows], *_params())


def _siglip_rank_reference(image, text, rank):
    """SigLipLoss's l_r and its gradients with respect to rank r's images, all texts, scale and
    bias."""
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    return grads(
        lambda x, y, s, b: siglip_loss_reference(x, y, s, b, offset=rank * N_LOCAL),
        image[rows],
        text,
        *_params(),
    )


def clip_expected(mode, world_size, image, text, rank, loss, d_global):
    """[(quantity, expected, what)] of rank r's ClipLoss in ``mode``."""
    _, local_loss, gather_with_grad, _ = mode
    d_image, d_text, d_scale, _ = d_global
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    local = _clip_local_reference(image, text, rank)
    if local_loss:
        expected = [("loss", local[0], "local loss"), ("d_scale", local[1][2], "d_scale")]
    else:
        expected = [("loss", loss, "loss"), ("d_scale", d_scale, "d_scale")]
    if gather_with_grad:
        features = world_size * d_image[rows], world_size * d_text[rows]
    elif local_loss:
        features = local[1][0], local[1][1]
    else:
        features = d_image[rows], d_text[rows]
    return expected + [("d_image", features[0], "d_image"), ("d_text", features[1], "d_text")]


def siglip_expected(mode, world_size, image, text, rank, loss, d_global):
    """[(quantity, expected, what)] of rank r's SigLipLoss, whatever the dist_impl."""
    d_image, d_text, _, _ = d_global
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    local_loss, (local_image, _, local_scale, local_bias) = _siglip_rank_reference(
        image, text, rank
    )
    return [
        ("loss", local_loss, "loss"),
        ("d_image", local_image, "d_image (own loss)"),
        ("d_image", world_size * d_image[rows], "d_image"),
        ("d_text", world_size * d_text[rows], "d_text"),
        ("d_scale", local_scale, "d_scale"),
        ("d_bias", local_bias, "d_bias"),
    ]


# loss -> (the global float64 reference, what each rank must give)
LOSSES = {
    "clip": (clip_loss_reference, clip_expected),
    "siglip": (siglip_loss_reference, siglip_expected),
}


@pytest.mark.parametrize("mode", MODES, ids=[mode_id(m) for m in MODES])
def test_matches_single_process_reference(world, mode):
    world_size, image, text, results = world
    results = results_of(results, mode)
    reference, expected_of = LOSSES[mode[0]]
    loss, d_global = grads(reference, image, text, *_params())
    fp32 = torch.float32
    for rank, got in enumerate(results):
        for name, expected, what in expected_of(
            mode, world_size, image, text, rank, loss, d_global
        ):
            assert_close(got[name], expected, fp32, f"rank {rank} {what}")
        if mode[0] == "clip":
            assert torch.equal(got["d_bias"], torch.zeros(())), f"rank {rank} d_bias"
    # Across ranks: the mean of the losses is the global loss, the sums of d_scale and d_bias W
    # times its gradients.
    mean_loss = torch.stack([got["loss"] for got in results]).mean()
    assert_close(mean_loss, loss, fp32, "mean loss over ranks")
    for name, expected in (("d_scale", d_global[2]), ("d_bias", d_global[3])):
        total = torch.stack([got[name] for got in results]).sum()
        assert_close(total, world_size * expected, fp32, f"sum of {name} over ranks")
