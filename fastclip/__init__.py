"""fastclip: fast, memory-lean CLIP training with fused Triton kernels."""

from fastclip.checkpoint import export_hf, load_pretrained, save_pretrained
from fastclip.loss import ClipLoss, clip_loss, infonce
from fastclip.model import CLIP, PRESETS, CLIPConfig
from fastclip.projection import NormalizedLinear, normalized_linear
from fastclip.siglip import SigLipLoss, siglip_loss
from fastclip.similarity import similarity, topk_similarity
from fastclip.transforms import ImageTransform, preprocess

__version__ = "0.1.0"


def __getattr__(name: str):
    # The tokenizer needs the `tokenizers` package: imported on first use, so that the losses and
    # kernels import wherever torch and triton do.
    if name == "Tokenizer":
        from fastclip.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'fastclip' has no attribute {name!r}")


__all__ = [
    "CLIP",
    "CLIPConfig",
    "ClipLoss",
    "ImageTransform",
    "NormalizedLinear",
    "PRESETS",
    "SigLipLoss",
    "Tokenizer",
    "clip_loss",
    "export_hf",
    "infonce",
    "load_pretrained",
    "normalized_linear",
    "preprocess",
    "save_pretrained",
    "siglip_loss",
    "similarity",
    "topk_similarity",
    "__version__",
]
