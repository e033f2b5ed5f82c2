"""fastclip: fast, memory-lean CLIP training with fused Triton kernels."""

import importlib

from fastclip.checkpoint import export_hf, export_open_clip, load_pretrained, save_pretrained
from fastclip.loss import ClipLoss, clip_loss, infonce
from fastclip.model import CLIP, PRESETS, CLIPConfig
from fastclip.projection import NormalizedLinear, normalized_linear
from fastclip.siglip import SigLipLoss, siglip_loss
from fastclip.similarity import similarity, topk_similarity
from fastclip.transforms import ImageTransform, preprocess

__version__ = "0.1.0"


# The tokenizer needs the `tokenizers` package, and so does open_clip's factory: imported on
# first use, so that the losses and kernels import wherever torch and triton do.
_LAZY = {
    "Tokenizer": "fastclip.tokenizer",
    "create_model": "fastclip.factory",
    "create_model_and_transforms": "fastclip.factory",
    "get_tokenizer": "fastclip.factory",
    "list_pretrained": "fastclip.factory",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
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
    "create_model",
    "create_model_and_transforms",
    "export_hf",
    "export_open_clip",
    "get_tokenizer",
    "infonce",
    "list_pretrained",
    "load_pretrained",
    "normalized_linear",
    "preprocess",
    "save_pretrained",
    "siglip_loss",
    "similarity",
    "topk_similarity",
    "__version__",
]
