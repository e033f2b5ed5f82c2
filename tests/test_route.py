"""The route from each public function to its kernels (``fastclip.backends``): ``config=`` reaches
every kernel launch of every op, each implementation name means one design everywhere, and a bad
``config`` is refused before anything runs."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE

import fastclip.kernels.contrastive as kc
import fastclip.kernels.fused as kfused
import fastclip.kernels.launch as kt
import fastclip.kernels.persistent as kpersistent
import fastclip.kernels.persistent_siglip as kpsiglip
import fastclip.kernels.projection as kproj
import fastclip.kernels.projection_backward as kprojb
import fastclip.kernels.siglip as ks
import fastclip.kernels.similarity as ksim
from fastclip import (
    backends,
    clip_loss,
    normalized_linear,
    registry,
    siglip_loss,
    similarity,
    topk_similarity,
)

TRITON_LOSSES = registry.names("contrastive", triton=True)
SMALL = kt.TileConfig(block_m=16, block_n=16, block_k=16, block_d=16, num_stages=1)


def features(n: int, dim: int = 24, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen).to(DEVICE).requires_grad_()


def run_loss(loss, backend, config):
    x, y = features(40), features(40, seed=1)
    if backend == "persistent":  # 16-bit rows TMA can read, or the bounded blocks run
        x, y = (t.detach().half().requires_grad_() for t in (x, y))
    scale = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    loss(x, y, scale, -1.0, backend=backend, config=config).backward()
    with torch.no_grad():  # SigLIP's loss alone is a sweep of its own
        loss(x, y, scale, -1.0, backend=backend, config=config)


# Every op's calls with ``config``: forward and, where it has one, backward.
OPS = {
    **{f"clip-{b}": lambda c, b=b: run_loss(clip_loss, b, c) for b in TRITON_LOSSES},
    **{f"siglip-{b}": lambda c, b=b: run_loss(siglip_loss, b, c) for b in TRITON_LOSSES},
    "similarity": lambda c: (
        similarity(features(40), features(30), 2.0, normalize=True, backend="triton", config=c)
        .sum()
        .backward()
    ),
    "topk": lambda c: topk_similarity(
        features(20), features(50), 5, normalize=True, backend="triton", config=c
    ),
    "projection": lambda c: (
        normalized_linear(
            features(40, 32), features(24, 32), features(1, 24)[0], backend="triton", config=c
        )
        .sum()
        .backward()
    ),
}


@pytest.fixture
def no_default_tiles(monkeypatch):
    """A launch that was not given the config fails: the defaults it would fall back on (the
    interpreter's tiles, the first fitting autotune config, top-k's own) are poisoned."""

    class Poisoned:
        def __getattr__(self, name):
            raise AssertionError("a kernel launched without the config it was given")

    def poisoned(*args, **kwargs):
        raise AssertionError("a kernel launched without the config it was given")

    monkeypatch.setattr(kt, "INTERPRETER_CONFIG", Poisoned())
    monkeypatch.setattr(ksim, "INTERPRETER_CONFIG", Poisoned())
    monkeypatch.setattr(kt, "first_fitting", poisoned)
    monkeypatch.setattr(kt, "autotuning", lambda: True)  # and would autotune: poisoned below
    monkeypatch.setattr(ksim, "topk_config", poisoned)
    for module in (kc, kfused, kpersistent, kpsiglip, ks, ksim, kproj, kprojb):
        for name in dir(module):
            if name.endswith("_tuned"):
                monkeypatch.setattr(getattr(module, name), "run", poisoned)


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_config_reaches_every_launch(no_default_tiles, op):
    op(SMALL)


@pytest.mark.parametrize("op", [OPS["clip-blocks"], OPS["similarity"]], ids=["clip", "similarity"])
def test_without_config_the_defaults_launch(no_default_tiles, op):
    """The control of the test above: the poisoned defaults are the ones a launch falls back on."""
    with pytest.raises(AssertionError, match="without the config"):
        op(None)


def test_one_spelling_of_the_implementations():
    """backend=, the registry, the cost model and both loss kernels' ``method`` name the same
    designs."""
    for op in registry.LOSSES:
        assert set(backends.implementations(op, triton=True)) == {*kc.METHODS, "fused"}
        assert set(backends.implementations(op, triton=True)) == {*ks.METHODS, "fused"}
        assert set(backends.backends(op)) == {"auto", "triton", *registry.names(op)}
    for op in ("similarity", "projection"):
        assert backends.implementations(op) == ("triton", "torch")


@pytest.mark.parametrize("method", ["block", "torch", "fused"])
def test_kernel_methods_are_checked(method):
    x = torch.randn(8, 16, device=DEVICE)
    scale = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match="method must be one of"):
        ks.siglip_forward(x, x, scale, None, 0, True, True, True, method=method)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: clip_loss(features(4), features(4), 1.0, config=c),
        lambda c: siglip_loss(features(4), features(4), 1.0, 0.0, config=c),
        lambda c: similarity(features(4), features(4), config=c),
        lambda c: topk_similarity(features(4), features(4), 2, config=c),
        lambda c: normalized_linear(features(4), features(3, 24), config=c),
    ],
    ids=["clip", "siglip", "similarity", "topk", "projection"],
)
@pytest.mark.parametrize("config", [{"block_m": 16}, "SMALL", (16, 16)])
def test_bad_config_names_the_argument(call, config):
    with pytest.raises(TypeError, match="config must be a fastclip.kernels.launch.TileConfig"):
        call(config)
