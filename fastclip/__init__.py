"""fastclip: fast, memory-lean CLIP training with fused Triton kernels."""

from fastclip.loss import ClipLoss, clip_loss, infonce

__version__ = "0.1.0"
__all__ = ["ClipLoss", "clip_loss", "infonce", "__version__"]
