"""The SigLIP sigmoid loss: public function, autograd wiring and open_clip drop-in."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed.nn as dist_nn
from torch import nn

from fastclip import backends
from fastclip.backends import check_backend, check_config, choose
from fastclip.checks import check_index, check_inputs, check_offset, check_rank, promote_features
from fastclip.distributed import neighbour_exchange, neighbour_exchange_bidir

if TYPE_CHECKING:
    from fastclip.kernels.launch import TileConfig

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


class _SigLipLoss(torch.autograd.Function):
    """The gradients come out of the forward's sweeps; the backward only scales them.
    ``needs``: which of (x, y, scale, bias) want a gradient, known before the forward runs."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, offset: int | None, needs: tuple, route: dict):
        need_dx, need_dy, need_ds, need_db = needs
        loss, dx, dy, dscale, dbias = backends.siglip_forward(
            x, y, scale, bias, offset, need_dx, need_dy, need_ds or need_db, **route
        )
        ctx.save_for_backward(dx, dy, dscale, dbias)
        ctx.needs = needs
        ctx.params_like = [None if t is None else (t.dtype, t.shape) for t in (scale, bias)]
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dy, dscale, dbias = ctx.saved_tensors
        need_dx, need_dy, need_ds, need_db = ctx.needs
        grads = [dx * grad_loss if need_dx else None, dy * grad_loss if need_dy else None]
        for d, need, like in zip((dscale, dbias), (need_ds, need_db), ctx.params_like, strict=True):
            grads.append((d * grad_loss).to(like[0]).reshape(like[1]) if need else None)
        return *grads, None, None, None


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
        text_features: (n_txt, D) on the same device; n_img + offset <= n_txt unless
            ``negatives_only``. Two dtypes follow torch's type promotion, as in ``clip_loss``.
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
        0-dim loss, float32 (float64 for float64 features), never negative, 16-bit features
        included (where open_clip's ``SigLipLoss`` returns their dtype; see ``clip_loss``: the
        loss is computed in fp32, and rounding it would only lose digits). When gradients are
        wanted (grad mode on and an input requiring grad), they are computed with the loss.
    """
    scale, bias = check_inputs(image_features, text_features, logit_scale, logit_bias)
    image_features, text_features = promote_features(image_features, text_features)
    if not negatives_only:
        check_offset(offset, image_features.shape[0], text_features.shape[0])
    if block_bytes is not None:
        block_bytes = check_index("block_bytes", block_bytes)
    check_config(config)
    method = choose("siglip", backend, image_features, text_features.shape[0])
    route = {"method": method, "block_bytes": block_bytes, "config": config}
    pairs = None if negatives_only else offset
    inputs = (image_features, text_features, scale, bias)
    grad = torch.is_grad_enabled()
    needs = tuple(grad and t is not None and t.requires_grad for t in inputs)
    if any(needs):
        return _SigLipLoss.apply(*inputs, pairs, needs, route)
    return backends.siglip_forward(*inputs, pairs, False, False, False, **route)[0]


class SigLipLoss(nn.Module):
    """Drop-in for open_clip's ``SigLipLoss``: same constructor, call and values, fused.

    Across ``world_size`` ranks each rank adds, to the loss of its own (n, D) block, the
    negatives-only losses of its images against every other rank's texts. ``dist_impl`` picks how
    the texts travel, as in open_clip: "bidir" (default: to both neighbours at once, ring style),
    "shift" (one neighbour at a time), "reduce" (one all-reduce per rank) or "gather" (one
    all-gather). All four give the same loss and gradients.

    ``get_logits`` and ``get_ground_truth`` build the logits and the +-1 labels that open_clip's
    loss sums the log-sigmoids of (for logging, or a subclass's own loss); ``forward`` never does.

    Args:
        cache_labels: accepted for compatibility (open_clip caches nothing either); the fused
            loss builds no label matrix.
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
        # open_clip's (unused) label cache, kept for code that reads it
        self.prev_num_logits = 0
        self.labels: dict[torch.device, torch.Tensor] = {}

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

    def get_ground_truth(
        self,
        device: torch.device,
        dtype: torch.dtype,
        num_logits: int,
        negative_only: bool = False,
    ) -> torch.Tensor:
        """(num_logits, num_logits) labels z_ij: +1 on the diagonal (the pairs), -1 elsewhere;
        -1 everywhere for ``negative_only`` (a block of another rank's texts)."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = labels + 2 * torch.eye(num_logits, device=device, dtype=dtype)
        return labels

    def get_logits(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """logit_scale * image_features @ text_features.T (+ logit_bias): (n_img, n_txt)."""
        image_features, text_features = promote_features(image_features, text_features)
        logits = logit_scale * image_features @ text_features.T
        if logit_bias is not None:  # in place, as open_clip: the logits keep their dtype
            logits += logit_bias
        return logits

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
