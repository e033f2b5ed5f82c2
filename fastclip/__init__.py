"""fastclip: fast, memory-lean CLIP training with fused Triton kernels."""

from fastclip.loss import ClipLoss, clip_loss, infonce
from fastclip.projection import NormalizedLinear, normalized_linear
from fastclip.siglip import SigLipLoss, siglip_loss
from fastclip.similarity import similarity, topk_similarity

__version__ = "0.1.0"
__all__ = [
    "ClipLoss",
    "NormalizedLinear",
    "SigLipLoss",
    "clip_loss",
    "infonce",
    "normalized_linear",
    "siglip_loss",
    "similarity",
    "topk_similarity",
    "__version__",
]
