"""The route from each public function to the code that computes it.

| public function                     | route: here and chunked. | Triton: kernels.                |
|-------------------------------------|--------------------------|---------------------------------|
| clip_loss, infonce, ClipLoss        | contrastive_forward      | contrastive.contrastive_forward |
|                                     | contrastive_backward     | contrastive.contrastive_backward|
|                                     |                          | fused.contrastive_backward      |
| siglip_loss, SigLipLoss             | siglip_forward           | siglip.siglip_forward           |
|                                     |                          | fused.siglip_forward            |
| similarity                          | similarity               | similarity.similarity           |
| topk_similarity                     | topk                     | similarity.topk                 |
| normalized_linear, NormalizedLinear | normalized_linear        | projection.normalized_linear    |

Each route function calls ``fastclip.chunked``'s function of its name for the "torch"
implementation, ``kernels.fused``'s for "fused", and the Triton launcher beside it otherwise
(with ``method=`` "blocks" or "blocks-mm" for the losses).

The losses' implementations, with the passes each executes, are named once in
``fastclip.registry``: "blocks" (the Triton forward, then the bounded-block backward: a Triton
kernel forms G block by block and cuBLAS multiplies, ``fastclip.kernels.blocks``), "blocks-mm"
(the same with cuBLAS computing each block's dots), "fused" (Triton row sweeps that accumulate the
gradients in fp32 workspaces) and "torch" (``fastclip.chunked``, on any device and in float64
too). Similarity and the projection have one Triton implementation, "triton", and "torch".

Every public function takes, and passes down to its launcher as keywords:
- ``backend``: "auto", "triton", "torch" or an implementation's name; ``choose`` turns it into
  the implementation (``method`` from here on down). "auto" is the fastest Triton implementation
  on CUDA for 16/32-bit features, the PyTorch path elsewhere; "triton" the fastest Triton
  implementation (on CUDA, or on the CPU under Triton's interpreter). Fastest means: as measured
  on a GPU for the nearest (dtype, D, N bucket) in ``tuning.json`` (written by
  ``benchmarks/gpu_quick.sh``), else as ``fastclip.costs`` predicts.
- ``block_bytes`` (the losses): the bound of the bounded buffer, the same on every path: the G
  blocks ("blocks", "blocks-mm"), the fp32 workspaces ("fused"), the score blocks ("torch").
- ``config``: fixed Triton tiles (``fastclip.kernels.launch.TileConfig``) for every kernel the
  op launches; None autotunes. The PyTorch path has no tiles and ignores it.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

from fastclip import chunked, costs, registry

try:
    from fastclip.kernels import contrastive as kc
    from fastclip.kernels import fused as kfused
    from fastclip.kernels import projection as kproj
    from fastclip.kernels import siglip as ks
    from fastclip.kernels import similarity as ksim
    from fastclip.kernels.launch import TileConfig, interpreting
except ImportError:  # no Triton on this platform: the PyTorch path serves everything
    kc = kfused = kproj = ks = ksim = interpreting = TileConfig = None

TUNING = Path(__file__).with_name("tuning.json")
# Each op's implementations, as ``backend=`` names them: the losses' from the registry.
OPS = ("contrastive", "siglip", "similarity", "projection")


def implementations(op: str, triton: bool | None = None) -> tuple[str, ...]:
    """The names of ``op``'s implementations (only the Triton ones, or only the others, where
    ``triton`` says)."""
    if op in registry.LOSSES:
        return registry.names(op, triton)
    return tuple(name for name, t in (("triton", True), ("torch", False)) if triton in (None, t))


def backends(op: str) -> tuple[str, ...]:
    """The values ``backend=`` takes for ``op``: auto, triton, torch and its implementations
    (named even where Triton is missing, which ``choose`` then reports)."""
    losses = registry.names(op, triton=True) if op in registry.LOSSES else ()
    return ("auto", "triton", "torch", *losses)


def check_backend(backend: object, op: str) -> str:
    if backend not in backends(op):
        raise ValueError(f"backend must be one of {backends(op)}, got {backend!r}")
    return backend


def check_config(config: object) -> None:
    """``config`` is a TileConfig or None."""
    if config is not None and (TileConfig is None or not isinstance(config, TileConfig)):
        raise TypeError(
            f"config must be a fastclip.kernels.launch.TileConfig or None, got "
            f"{type(config).__name__}"
        )


@functools.cache
def _measured() -> dict:
    """tuning.json: {op: {dtype: {D: {N bucket: implementation}}}} measured on a GPU."""
    return json.loads(TUNING.read_text()) if TUNING.exists() else {}


def fastest(op: str, dtype: torch.dtype, D: int, n: int) -> str:
    """The Triton implementation of ``op`` to use for an (n, D) batch: measured, else modeled."""
    names = implementations(op, triton=True)
    if len(names) == 1:
        return names[0]
    by_d = _measured().get(op, {}).get(str(dtype).removeprefix("torch."), {})
    if by_d:
        by_n = by_d[min(by_d, key=lambda d: abs(int(d) - D))]
        nearest = min(by_n, key=lambda b: abs(math.log2(int(b)) - math.log2(max(n, 1))))
        if by_n[nearest] in names:
            return by_n[nearest]
    element = 4 if dtype == torch.float32 else 2
    return costs.fastest(op, names, n, D, element)


def choose(op: str, backend: str, features: torch.Tensor, n: int | None = None) -> str:
    """The implementation of ``op`` that ``backend`` asks for, for these features (the rows'
    count n, default features.shape[0], picks among the Triton implementations)."""
    check_backend(backend, op)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        usable = kc is not None and features.is_cuda and features.dtype != torch.float64
        if not usable:
            return "torch"
    elif kc is None:
        raise ValueError(f"backend={backend!r} needs the triton package, which is not installed")
    elif not (features.is_cuda or interpreting()):
        raise ValueError(
            f"backend={backend!r} needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
            f"imported, to run Triton's interpreter on the CPU); the features are on "
            f"{features.device}"
        )
    elif features.dtype == torch.float64:
        raise TypeError(f"backend={backend!r} supports float32, float16 and bfloat16 features")
    if backend in ("auto", "triton"):
        n = features.shape[0] if n is None else n
        return fastest(op, features.dtype, features.shape[-1], n)
    return backend


# ----------------------------------------------------------------------------------------------
# The route: one function per launcher stage, by implementation (``method``)
# ----------------------------------------------------------------------------------------------


def contrastive_forward(x, y, scale, offset, both_directions, *, method, block_bytes, config):
    """The statistics (pdot, m, m') of InfoNCE: the same Triton sweep for every Triton method."""
    if method == "torch":
        return chunked.contrastive_forward(
            x, y, scale, offset, both_directions, block_bytes=block_bytes
        )
    return kc.contrastive_forward(x, y, scale, offset, both_directions, config=config)


def contrastive_backward(*args, method, block_bytes, config):
    """(dx, dy, dscale) of InfoNCE from the forward's statistics (args: see
    ``fastclip.kernels.contrastive.contrastive_backward``)."""
    if method == "torch":
        return chunked.contrastive_backward(*args, block_bytes=block_bytes)
    if method == "fused":
        return kfused.contrastive_backward(*args, block_bytes=block_bytes, config=config)
    return kc.contrastive_backward(*args, method=method, block_bytes=block_bytes, config=config)


def siglip_forward(*args, method, block_bytes, config):
    """(loss, dx, dy, dscale, dbias) of SigLIP (args: see
    ``fastclip.kernels.siglip.siglip_forward``)."""
    if method == "torch":
        return chunked.siglip_forward(*args, block_bytes=block_bytes)
    if method == "fused":
        return kfused.siglip_forward(*args, block_bytes=block_bytes, config=config)
    return ks.siglip_forward(*args, method=method, block_bytes=block_bytes, config=config)


def similarity(a, b, scale, bias, normalize, out_dtype, eps, *, method, config):
    """(n_a, n_b) scores, differentiable."""
    if method == "torch":
        return chunked.similarity(a, b, scale, bias, normalize, out_dtype, eps)
    return ksim.similarity(a, b, scale, bias, normalize, out_dtype, eps, config=config)


def topk(queries, keys, k, scale, normalize, eps, chunk, *, method, config):
    """The k best keys of every query: values and int64 indices. The kernel keeps at most
    ``MAX_TOPK`` scores per query; a larger k takes the PyTorch path."""
    if method == "torch" or k > ksim.MAX_TOPK:
        return chunked.topk(queries, keys, k, scale, normalize, eps, chunk)
    return ksim.topk(queries, keys, k, scale, normalize, eps, config=config)


def normalized_linear(x, weight, bias, eps, *, method, config):
    """normalize(x W^T + b) of x (n_rows, n_in), differentiable."""
    if method == "torch":
        return chunked.normalized_linear(x, weight, bias, eps)
    return kproj.normalized_linear(x, weight, bias, eps, config=config)
