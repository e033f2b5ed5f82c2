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


def _send_receive(
    sends: list[tuple[torch.Tensor, int]], sources: list[int], like: torch.Tensor
) -> list[torch.Tensor]:
    """Post every send and every receive (tensors shaped like ``like``) at once, then wait.

    Receives from one peer match its sends in order, so callers order them to pair up.
    """
    received = [torch.empty_like(like) for _ in sources]
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, buf, peer) for buf, peer in zip(received, sources, strict=True)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _Exchange(torch.autograd.Function):
    """Send to one rank, receive from another; the gradient travels the opposite way."""

    @staticmethod
    def forward(ctx, from_rank: int, to_rank: int, tensor: torch.Tensor) -> torch.Tensor:
        ctx.from_rank, ctx.to_rank = from_rank, to_rank
        return _send_receive([(tensor, to_rank)], [from_rank], tensor)[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None, _Exchange.apply(ctx.to_rank, ctx.from_rank, grad)


class _ExchangeBoth(torch.autograd.Function):
    """Send one tensor to each neighbour and receive one from each, with autograd."""

    @staticmethod
    def forward(ctx, left: int, right: int, to_left: torch.Tensor, to_right: torch.Tensor):
        ctx.left, ctx.right = left, right
        # The right neighbour sends to its left first: receive from the right first.
        from_right, from_left = _send_receive(
            [(to_left, left), (to_right, right)], [right, left], to_left
        )
        return from_right, from_left

    @staticmethod
    def backward(ctx, grad_from_right: torch.Tensor, grad_from_left: torch.Tensor):
        # What came from the right returns its gradient to the right, and so on: the same
        # exchange with the neighbours swapped yields the gradients of to_left and to_right.
        grads = _ExchangeBoth.apply(ctx.right, ctx.left, grad_from_right, grad_from_left)
        return None, None, *grads


def neighbour_exchange(from_rank: int, to_rank: int, tensor: torch.Tensor) -> torch.Tensor:
    """Send ``tensor`` to ``to_rank`` and return the same-shaped tensor ``from_rank`` sent here;
    differentiable (the gradient goes back to ``from_rank``)."""
    return _Exchange.apply(from_rank, to_rank, tensor)


def neighbour_exchange_bidir(
    left: int, right: int, to_left: torch.Tensor, to_right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Send ``to_left`` left and ``to_right`` right; return (from the right, from the left).
    Differentiable. ``left`` and ``right`` must differ."""
    return _ExchangeBoth.apply(left, right, to_left, to_right)
