"""The training losses that ``--loss`` names: how each is built for a process, and the CLIPConfig
fields a new model trained with it starts from."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from fastclip.loss import ClipLoss
from fastclip.siglip import SigLipLoss


class Loss(NamedTuple):
    """A training loss: how to build it for (rank, world size), and the CLIPConfig fields a new
    model trained with it starts from."""

    build: Callable[[int, int], torch.nn.Module]
    model_fields: dict


LOSSES = {
    "clip": Loss(
        lambda rank, world: ClipLoss(
            local_loss=True, gather_with_grad=True, rank=rank, world_size=world
        ),
        {},
    ),
    "siglip": Loss(  # SigLIP's initial t' = log 10 and b = -10
        lambda rank, world: SigLipLoss(rank=rank, world_size=world),
        dict(logit_scale_init=math.log(10), logit_bias_init=-10.0),
    ),
}
