"""The losses' implementations, each named once with the matmul passes it executes.

One row per implementation: whether it runs Triton kernels, and its passes over the
N_x x N_y x D product (2 N_x N_y D FLOPs each), for a forward and for a forward and backward.
``fastclip.backends`` routes by these names, ``fastclip.costs`` models them (a test holds its
FLOPs to these counts, another counts what the kernels and GEMMs execute), and the tests and
benchmarks iterate them.

| op          | implementation | Triton | forward | forward+backward | the passes                  |
|-------------|----------------|--------|--------:|-----------------:|-----------------------------|
| contrastive | blocks         | yes    |       1 |                4 | S; S again, G y, G^T x      |
| contrastive | blocks-mm      | yes    |       1 |                4 | S; S by cuBLAS, G y, G^T x  |
| contrastive | persistent     | yes    |       1 |                4 | as blocks, one-wave sweeps  |
| contrastive | fused          | yes    |       1 |                5 | S; S and a product, twice   |
| contrastive | torch          | no     |       1 |                4 | as blocks, in PyTorch       |
| siglip      | blocks         | yes    |       3 |                3 | S, G y, G^T x (the forward) |
| siglip      | blocks-mm      | yes    |       3 |                3 | the same, S by cuBLAS       |
| siglip      | persistent     | yes    |       3 |                3 | as blocks, one-wave sweeps  |
| siglip      | fused          | yes    |       4 |                4 | S and a product, twice      |
| siglip      | torch          | no     |       3 |                3 | as blocks, in PyTorch       |

SigLIP's gradients need no statistic of a whole row, so its forward computes them when they are
wanted (its forward alone, without gradients, is 1 pass). The floor, a forward and backward that
never stores S: InfoNCE 4 (S twice, two products), SigLIP 3. Eager PyTorch stores S: 1 and 3.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Passes:
    """Matmul passes over the N_x x N_y x D product."""

    forward: int  # a forward whose inputs require grad
    step: int  # a forward and its backward


@dataclass(frozen=True)
class Design:
    """One implementation of a loss."""

    name: str
    triton: bool
    passes: Passes


LOSSES = {
    "contrastive": (
        Design("blocks", True, Passes(1, 4)),
        Design("blocks-mm", True, Passes(1, 4)),
        Design("persistent", True, Passes(1, 4)),
        Design("fused", True, Passes(1, 5)),
        Design("torch", False, Passes(1, 4)),
    ),
    "siglip": (
        Design("blocks", True, Passes(3, 3)),
        Design("blocks-mm", True, Passes(3, 3)),
        Design("persistent", True, Passes(3, 3)),
        Design("fused", True, Passes(4, 4)),
        Design("torch", False, Passes(3, 3)),
    ),
}
FLOOR = {"contrastive": 4, "siglip": 3}  # passes of a forward+backward that never stores S
EAGER = Passes(1, 3)  # the eager formula (and torch.compile of it): S computed once, stored


def designs(op: str, triton: bool | None = None) -> dict[str, Design]:
    """name -> Design of ``op``'s implementations (only the Triton ones, or only the others,
    where ``triton`` says)."""
    return {d.name: d for d in LOSSES[op] if triton is None or d.triton == triton}


def names(op: str, triton: bool | None = None) -> tuple[str, ...]:
    """The names of ``op``'s implementations, as ``backend=`` takes them."""
    return tuple(designs(op, triton))
