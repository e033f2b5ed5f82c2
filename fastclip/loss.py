"""The CLIP contrastive (InfoNCE) loss: public function, autograd wiring and open_clip drop-in."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from fastclip.kernels.launch import TileConfig

from fastclip import backends
from fastclip.backends import check_backend, check_config, choose
from fastclip.checks import (
    check_features,
    check_index,
    check_inputs,
    check_offset,
    check_rank,
    promote_features,
)
from fastclip.distributed import gather_features


class _ContrastiveLoss(torch.autograd.Function):
    """L = sum_i wx_i softplus(m_i) + sum_j wy_j softplus(m'_j), by either backend: m_i is row
    i's log-sum-exp of its other logits relative to its positive (m'_j the same for column j),
    so the loss of a confident row, log(1 + sum_{j != i} exp(S_ij - S_ii)), is never a
    difference of two nearly equal numbers and never negative."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, offset: int, both_directions: bool, route: dict):
        stats = backends.contrastive_forward(x, y, scale, offset, both_directions, **route)
        pdot, row, col = stats
        loss = F.softplus(row).mean()
        if both_directions:
            loss = 0.5 * (loss + F.softplus(col[offset : offset + x.shape[0]]).mean())
        ctx.save_for_backward(x, y, scale, bias, pdot, row, col)
        ctx.offset, ctx.both_directions, ctx.route = offset, both_directions, route
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, y, scale, bias, pdot, row, col = ctx.saved_tensors
        need_dx, need_dy, need_ds, need_db = ctx.needs_input_grad[:4]
        n_x, off = x.shape[0], ctx.offset
        # Every row (and every column with a positive) weighs dL_out / n_x, halved for two
        # directions: relative weights of 1 and that common factor.
        weight = grad_loss.to(row.dtype) * ((0.5 if ctx.both_directions else 1.0) / n_x)
        w_x = torch.ones(n_x, dtype=row.dtype, device=x.device)
        w_y = None
        if ctx.both_directions:
            w_y = torch.zeros(y.shape[0], dtype=row.dtype, device=y.device)
            w_y[off : off + n_x] = 1.0
        dx, dy, dscale = backends.contrastive_backward(
            x, y, scale, (pdot, row, col), w_x, w_y, weight, off, need_dx, need_dy, **ctx.route
        )
        dscale = dscale.to(scale.dtype).reshape(scale.shape) if need_ds else None
        # The bias shifts every logit of a softmax alike: the loss does not depend on it.
        dbias = torch.zeros_like(bias) if need_db else None
        return dx, dy, dscale, dbias, None, None, None


def infonce(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
    *,
    offset: int = 0,
    both_directions: bool = True,
    backend: str = "auto",
    block_bytes: int | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """The general fused InfoNCE: ``clip_loss`` with a one-directional option.

    ``both_directions=False`` returns only the image->text cross-entropy, mean over the n_img
    rows; that is the form each rank computes in open_clip's distributed local loss (called once
    with the images as rows and once with the texts as rows). Other arguments: see ``clip_loss``.
    """
    scale, bias = check_inputs(image_features, text_features, logit_scale, logit_bias)
    image_features, text_features = promote_features(image_features, text_features)
    check_offset(offset, image_features.shape[0], text_features.shape[0])
    if block_bytes is not None:
        block_bytes = check_index("block_bytes", block_bytes)
    check_config(config)
    method = choose("contrastive", backend, image_features, text_features.shape[0])
    route = {"method": method, "block_bytes": block_bytes, "config": config}
    return _ContrastiveLoss.apply(
        image_features, text_features, scale, bias, offset, both_directions, route
    )


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
    *,
    offset: int = 0,
    backend: str = "auto",
    block_bytes: int | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss, fused: the N x N score matrix is never stored.

    S = logit_scale * image_features @ text_features.T (+ logit_bias); image i's positive is text
    i + offset. The loss is the mean of the image->text cross-entropy over the n_img rows and the
    text->image cross-entropy over the n_img columns that hold a positive (texts beyond those act
    as extra negatives for the images). For a square batch and offset 0 this is exactly
    ``(F.cross_entropy(S, arange(N)) + F.cross_entropy(S.T, arange(N))) / 2``.

    Args:
        image_features: (n_img, D) float32, float16 or bfloat16 (float64 on the torch backend).
            Need not be normalized; any strides.
        text_features: (n_txt, D) on the same device, n_img + offset <= n_txt. Two dtypes
            follow torch's type promotion: both compute in ``torch.promote_types`` of the two
            (a bf16 tower and an fp32 one: fp32), each gradient in its tensor's own dtype.
        logit_scale: the already-exponentiated scale, a one-element tensor (may require grad) or
            a number. A number or a CPU tensor must be finite; one on a GPU is
            not read back (a non-finite one gives a NaN loss, as eager PyTorch does).
        logit_bias: optional one-element tensor or number added to every logit. Its gradient is
            exactly zero: a constant shift cancels in every softmax.
        offset: column of image 0's positive text.
        backend: "auto" (the fastest Triton implementation on CUDA, PyTorch otherwise),
            "triton", "torch" (blocked PyTorch, any device, float64 too), or an implementation:
            "blocks", "blocks-mm", "fused" (``fastclip.backends`` says what each is).
        block_bytes: bound of the backward's buffer in bytes: G blocks, fp32 workspaces or score
            blocks, by implementation (default 256 MiB on CUDA, 16 MiB elsewhere); extra memory
            is O(N D) plus this at any N.
        config: fixed Triton tiles for every kernel launched (a
            ``fastclip.kernels.launch.TileConfig``); None autotunes. The route from here to the
            kernels: ``fastclip.backends``.

    Returns:
        0-dim loss, float32 (float64 for float64 features), never negative. Gradients flow to
        both feature tensors (in their dtype) and to logit_scale. 16-bit features give an
        fp32 loss too, where open_clip's eager ``ClipLoss`` returns their dtype: the loss is
        computed in fp32 and rounding it to bf16 would keep 3 significant digits of it, for
        nothing. Under autocast open_clip's cross-entropy returns fp32 as well.
    """
    return infonce(
        image_features,
        text_features,
        logit_scale,
        logit_bias,
        offset=offset,
        backend=backend,
        block_bytes=block_bytes,
        config=config,
    )


class ClipLoss(nn.Module):
    """Drop-in for open_clip's ``ClipLoss``: same constructor, methods, call and values, fused.

    Args:
        local_loss: each rank scores only its own rows against all gathered columns (labels
            offset by rank * local batch) instead of the full global matrix.
        gather_with_grad: all-gather with autograd, so gradients reach the other ranks' features.
        cache_labels: ``get_ground_truth`` keeps its labels per device; the fused loss itself
            builds no label tensor.
        rank, world_size: this process's place in the torch.distributed group.
        use_horovod: must be False: fastclip gathers with torch.distributed only.
        backend, block_bytes, config: see ``clip_loss``.

    ``get_logits`` and ``get_ground_truth`` build the logits and labels that open_clip's loss
    is the cross-entropy of (for logging, or a subclass's own loss); ``forward`` never does.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        backend: str = "auto",
        block_bytes: int | None = None,
        config: TileConfig | None = None,
    ) -> None:
        super().__init__()
        check_backend(backend, "contrastive")
        if block_bytes is not None:
            check_index("block_bytes", block_bytes)
        check_config(config)
        check_rank(rank, world_size)
        check_no_horovod(use_horovod)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend
        self.block_bytes = block_bytes
        self.config = config
        # get_ground_truth's cache, as open_clip keeps it
        self.prev_num_logits = 0
        self.labels: dict[torch.device, torch.Tensor] = {}

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """(n, D) local features of this rank -> the contrastive loss (0-dim)."""
        kw = {"backend": self.backend, "block_bytes": self.block_bytes, "config": self.config}
        if self.world_size == 1:
            loss = infonce(image_features, text_features, logit_scale, logit_bias, **kw)
        else:
            all_images, all_texts = self._gather(image_features, text_features)
            if self.local_loss:
                kw.update(offset=self.rank * image_features.shape[0], both_directions=False)
                loss = 0.5 * (
                    infonce(image_features, all_texts, logit_scale, logit_bias, **kw)
                    + infonce(text_features, all_images, logit_scale, logit_bias, **kw)
                )
            else:
                loss = infonce(all_images, all_texts, logit_scale, logit_bias, **kw)
        return {"contrastive_loss": loss} if output_dict else loss

    def get_ground_truth(self, device: torch.device, num_logits: int) -> torch.Tensor:
        """The class of each of the ``num_logits`` rows: arange(num_logits), offset by
        rank * num_logits for the local loss across ranks; cached per device with
        ``cache_labels`` (recomputed when num_logits changes)."""
        if self.prev_num_logits == num_logits and device in self.labels:
            return self.labels[device]
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + num_logits * self.rank
        if self.cache_labels:
            self.labels[device] = labels
            self.prev_num_logits = num_logits
        return labels

    def get_logits(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image, logits_per_text), the matrices ``forward`` never builds: this
        rank's rows against every rank's columns (the local loss across ranks, or one rank),
        else the global matrix and its transpose, with the bias added once (open_clip 3.3 adds
        it to that matrix twice, through the transpose: it cancels in the loss either way)."""
        image_features, text_features = promote_features(image_features, text_features)
        if self.world_size > 1:
            all_images, all_texts = self._gather(image_features, text_features)
        else:
            all_images, all_texts = image_features, text_features
        if self.world_size > 1 and not self.local_loss:
            logits_per_image = logit_scale * all_images @ all_texts.T
            if logit_bias is not None:
                logits_per_image += logit_bias
            return logits_per_image, logits_per_image.T
        logits_per_image = logit_scale * image_features @ all_texts.T
        logits_per_text = logit_scale * text_features @ all_images.T
        if logit_bias is not None:  # in place, as open_clip: the logits keep their dtype
            logits_per_image += logit_bias
            logits_per_text += logit_bias
        return logits_per_image, logits_per_text

    def _gather(self, image_features, text_features) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's features, in rank order (``fastclip.distributed.gather_features``)."""
        check_features(image_features, text_features)
        return gather_features(
            image_features,
            text_features,
            self.local_loss,
            self.gather_with_grad,
            self.rank,
            self.world_size,
        )

    def extra_repr(self) -> str:
        return (
            f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
            f"rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}"
        )


def check_no_horovod(use_horovod: object) -> None:
    """open_clip's ``use_horovod``: accepted as False, refused as True."""
    if use_horovod:
        raise ValueError(
            "use_horovod=True is not supported: fastclip gathers features with torch.distributed "
            "(launch with torchrun and init_process_group instead of horovodrun)"
        )
