"""Feature gathering across processes for the contrastive losses (torch.distributed)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's (n, D) features in rank order: (world_size * n, D) each.

    With ``gather_with_grad`` the all-gather is differentiable (its backward sums the gradients of
    all ranks). Without it the gathered copies are constants, except that for the global loss
    (``local_loss=False``) this rank's own slice is the local tensor, so its gradient still flows.
    Every rank must pass the same shapes.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"world_size={world_size} needs torch.distributed to be initialized "
            "(torch.distributed.init_process_group) before the loss is called"
        )
    if gather_with_grad:
        import torch.distributed.nn as dist_nn

        return (
            torch.cat(dist_nn.all_gather(image_features), dim=0),
            torch.cat(dist_nn.all_gather(text_features), dim=0),
        )
    gathered = []
    for features in (image_features, text_features):
        parts = [torch.empty_like(features) for _ in range(world_size)]
        dist.all_gather(parts, features.detach().contiguous())
        if not local_loss:
            parts[rank] = features
        gathered.append(torch.cat(parts, dim=0))
    return gathered[0], gathered[1]
