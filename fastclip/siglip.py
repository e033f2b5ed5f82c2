"""The SigLIP sigmoid loss: public function, autograd wiring and open_clip drop-in."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed.nn as dist_nn
from torch import nn

from fastclip import backends
from fastclip.backends import check_backend, check_config, choose
from fastclip.checks import check_index, check_inputs, check_offset, check_rank
from fastclip.distributed import neighbour_exchange, neighbour_exchange_bidir

if TYPE_CHECKING:
    from fastclip.kernels.launch import TileConfig

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


class _SigLipLoss(torch.autograd.Function):
    """The gradients come out of the forward's sweeps; the backward only scales them."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, offset: int | None, route: dict):
        need_dx, need_dy, need_ds, need_db = ctx.needs_input_grad[:4]
        loss, dx, dy, dscale, dbias = backends.siglip_forward(
            x, y, scale, bias, offset, need_dx, need_dy, need_ds or need_db, **route
        )
        ctx.save_for_backward(dx, dy, dscale, dbias)
        ctx.param_like = (scale, bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dy, dscale, dbias = ctx.saved_tensors
        need_dx, need_dy, need_ds, need_db = ctx.needs_input_grad[:4]
        scale, bias = ctx.param_like
        grads = [
            dx * grad_loss if need_dx else None,
            dy * grad_loss if need_dy else None,
            (dscale * grad_loss).to(scale.dtype).reshape(scale.shape) if need_ds else None,
            (dbias * grad_loss).to(bias.dtype).reshape(bias.shape) if need_db else None,
        ]
        return *grads, None, None


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
    *,
    offset: int = 0,
    negatives_only: bool = False,
    backend: str = "auto",
    block_bytes: int | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """SigLIP's sigmoid loss, fused: the N x N score matrix is never stored.

    S = logit_scale * image_features @ text_features.T + logit_bias, and
    loss = -sum_ij log sigmoid(z_ij S_ij) / n_img with z_ij = +1 for image i and text i + offset
    and -1 for every other pair, exactly open_clip's ``SigLipLoss`` on one device.

    Args:
        image_features: (n_img, D) float32, float16 or bfloat16 (float64 on the torch backend);
            need not be normalized; any strides.
        text_features: (n_txt, D), same dtype and device; n_img + offset <= n_txt unless
            ``negatives_only``.
        logit_scale: the already-exponentiated scale: a one-element tensor (may require grad) or
            a number. A number or a CPU tensor must be finite; one on a GPU is
            not read back (a non-finite one gives a NaN loss, as eager PyTorch does).
        logit_bias: the learnable bias (one element or a number), or None for no bias.
        offset: column of image 0's positive text.
        negatives_only: every pair is a negative (a block of another rank's texts).
        backend: "auto" (the fastest Triton implementation on CUDA, PyTorch otherwise),
            "triton", "torch" (blocked PyTorch, any device, float64 too), or an implementation:
            "blocks", "blocks-mm", "fused" (``fastclip.backends`` says what each is).
        block_bytes: bound of the gradients' buffer in bytes: G blocks, fp32 workspaces or
            score blocks, by implementation (default 256 MiB on CUDA, 16 MiB elsewhere); extra
            memory is O(N D) plus this at any N.
        config: fixed Triton tiles for every kernel launched (a
            ``fastclip.kernels.launch.TileConfig``); None autotunes. The route from here to the
            kernels: ``fastclip.backends``.

    Returns:
        0-dim loss, float32 (float64 for float64 features), never negative. When gradients are
        wanted (grad mode on and an input requiring grad), they are computed with the loss.
    """
    scale, bias = check_inputs(image_features, text_features, logit_scale, logit_bias)
    if not negatives_only:
        check_offset(offset, image_features.shape[0], text_features.shape[0])
    if block_bytes is not None:
        block_bytes = check_index("block_bytes", block_bytes)
    check_config(config)
    method = choose("siglip", backend, image_features, text_features.shape[0])
    route = {"method": method, "block_bytes": block_bytes, "config": config}
    pairs = None if negatives_only else offset
    inputs = (image_features, text_features, scale, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _SigLipLoss.apply(*inputs, pairs, route)
    return backends.siglip_forward(*inputs, pairs, False, False, False, **route)[0]


class SigLipLoss(nn.Module):
    """Drop-in for open_clip's ``SigLipLoss``: same constructor, call and values, fused.

    Across ``world_size`` ranks each rank adds, to the loss of its own (n, D) block, the
    negatives-only losses of its images against every other rank's texts. ``dist_impl`` picks how
    the texts travel, as in open_clip: "bidir" (default: to both neighbours at once, ring style),
    "shift" (one neighbour at a time), "reduce" (one all-reduce per rank) or "gather" (one
    all-gather). All four give the same loss and gradients.

    Args:
        cache_labels: accepted for compatibility; the fused loss builds no label matrix.
        rank, world_size: this process's place in the torch.distributed group.
        dist_impl: see above; None means "bidir".
        backend, block_bytes, config: see ``siglip_loss``.
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        *,
        backend: str = "auto",
        block_bytes: int | None = None,
        config: TileConfig | None = None,
    ) -> None:
        super().__init__()
        check_rank(rank, world_size)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS}, got {dist_impl!r}")
        check_backend(backend, "siglip")
        if block_bytes is not None:
            check_index("block_bytes", block_bytes)
        check_config(config)
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.backend = backend
        self.block_bytes = block_bytes
        self.config = config

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """(n, D) local features of this rank -> the loss (0-dim)."""
        kw = {"backend": self.backend, "block_bytes": self.block_bytes, "config": self.config}
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, **kw)
        if self.world_size > 1:
            for texts, other in self._exchanged_texts(text_features):
                if other:
                    loss = loss + siglip_loss(
                        image_features,
                        texts,
                        logit_scale,
                        logit_bias,
                        negatives_only=True,
                        **kw,
                    )
                else:  # "reduce", own round: kept in the graph, whose backward joins its collective
                    loss = loss + 0.0 * texts.sum()
        return {"contrastive_loss": loss} if output_dict else loss

    def _exchanged_texts(self, text_features: torch.Tensor):
        """Yield (texts, True) for every other rank's text features, once each, differentiably,
        as ``dist_impl`` moves them; "reduce" also yields its own round's result with False."""
        rank, world = self.rank, self.world_size
        right, left = (rank + 1) % world, (rank - 1) % world
        if self.dist_impl == "bidir":
            to_left = to_right = text_features
            for _ in range((world - 1) // 2):
                to_left, to_right = neighbour_exchange_bidir(left, right, to_left, to_right)
                yield to_left, True  # from the right
                yield to_right, True  # from the left
            if (world - 1) % 2:
                yield neighbour_exchange(left, right, to_right), True
        elif self.dist_impl == "shift":
            to_right = text_features
            for _ in range(world - 1):
                to_right = neighbour_exchange(left, right, to_right)
                yield to_right, True
        elif self.dist_impl == "reduce":
            for i in range(world):
                yield dist_nn.all_reduce(text_features * (rank == i)), i != rank
        else:  # gather
            for i, texts in enumerate(dist_nn.all_gather(text_features)):
                if i != rank:
                    yield texts, True

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, "
            f"backend={self.backend!r}"
        )
