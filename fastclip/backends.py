"""Which code computes each public function: one table, and how ``backend=`` picks from it
(the losses' implementations are named, with the passes they execute, in ``fastclip.registry``).

| public function                          | op          | implementations                   |
|------------------------------------------|-------------|-----------------------------------|
| clip_loss, infonce, ClipLoss             | contrastive | blocks, blocks-mm, fused, torch   |
| siglip_loss, SigLipLoss                  | siglip      | blocks, blocks-mm, fused, torch   |
| similarity, topk_similarity              | similarity  | triton, torch                     |
| normalized_linear, NormalizedLinear      | projection  | triton, torch                     |

- "blocks": the Triton forward, then the bounded-block backward: a Triton kernel forms G block
  by block and cuBLAS multiplies (``fastclip.kernels.blocks``); "blocks-mm": the same with cuBLAS
  computing each block's dots for an elementwise G kernel; "fused": the Triton row sweeps that
  accumulate the gradients in fp32 workspaces; "triton" (similarity, projection): their kernels.
- "torch": the PyTorch path (``fastclip.chunked`` for the losses; the callers' eager code for
  similarity and projection), on any device and in float64 too.

``backend`` takes "auto", "triton", "torch" or an implementation's name. "auto" is the fastest
Triton implementation on CUDA for 16/32-bit features, the PyTorch path elsewhere; "triton" the
fastest Triton implementation (on CUDA, or on the CPU under Triton's interpreter). Fastest means:
as measured on a GPU for the nearest (dtype, D, N bucket) in ``tuning.json`` (written by
``benchmarks/gpu_quick.sh``), else as ``fastclip.costs`` predicts.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from fastclip import chunked, costs, registry

try:
    from fastclip.kernels import contrastive as kc
    from fastclip.kernels import projection as kproj
    from fastclip.kernels import siglip as ks
    from fastclip.kernels import similarity as ksim
    from fastclip.kernels.tiles import interpreting
except ImportError:  # no Triton on this platform: the PyTorch path serves everything
    kc = kproj = ks = ksim = interpreting = None

TUNING = Path(__file__).with_name("tuning.json")


@dataclass(frozen=True)
class Implementation:
    """One way to compute an op. For the losses, ``make(block_bytes)`` returns its functions
    under the op's names (``contrastive_forward``/``contrastive_backward``, ``siglip_forward``),
    bound to the bounded-block buffer size where they have one. Similarity and projection have
    one Triton implementation, their kernel module, and a PyTorch path in their callers: the
    choice is all they need (``make`` None)."""

    name: str
    triton: bool
    make: Callable[[int | None], object] | None = None

    def ops(self, block_bytes: int | None = None) -> object:
        return self.make(block_bytes)


def _contrastive(module, backward: str, buffered: str, **options) -> Callable:
    """``module``'s contrastive_forward and its ``backward`` function, looked up at each call
    (so that patches reach them); ``buffered`` names the ones that take the block size."""

    def make(block_bytes):
        def bind(fn, stage, **kw):
            if stage in buffered:
                kw["block_bytes"] = block_bytes
            return functools.partial(fn, **kw)

        return SimpleNamespace(
            contrastive_forward=bind(module.contrastive_forward, "forward"),
            contrastive_backward=bind(getattr(module, backward), "backward", **options),
        )

    return make


def _siglip(module, **options) -> Callable:
    """``module``'s siglip_forward, looked up at each call."""
    return lambda block_bytes: SimpleNamespace(
        siglip_forward=functools.partial(module.siglip_forward, block_bytes=block_bytes, **options)
    )


def _table() -> dict[str, dict[str, Implementation]]:
    torch_contrastive = _contrastive(chunked, "contrastive_backward", "forward backward")
    table = {
        "contrastive": {"torch": Implementation("torch", False, torch_contrastive)},
        "siglip": {"torch": Implementation("torch", False, _siglip(chunked))},
        "similarity": {"torch": Implementation("torch", False)},
        "projection": {"torch": Implementation("torch", False)},
    }
    if kc is None:
        return table
    contrastive = {
        "blocks": _contrastive(kc, "blocked_backward", "backward"),
        "blocks-mm": _contrastive(kc, "blocked_backward", "backward", dots_by_gemm=True),
        "fused": _contrastive(kc, "fused_backward", ""),
    }
    for name in registry.names("contrastive", triton=True):
        table["contrastive"][name] = Implementation(name, True, contrastive[name])
    for name in registry.names("siglip", triton=True):
        table["siglip"][name] = Implementation(name, True, _siglip(ks, method=name))
    table["similarity"]["triton"] = Implementation("triton", True)
    table["projection"]["triton"] = Implementation("triton", True)
    return table


IMPLEMENTATIONS = _table()


def backends(op: str) -> tuple[str, ...]:
    """The values ``backend=`` takes for ``op``: auto, triton, torch and its implementations
    (named even where Triton is missing, which ``choose`` then reports)."""
    losses = registry.names(op, triton=True) if op in registry.LOSSES else ()
    return ("auto", "triton", "torch", *losses)


def check_backend(backend: object, op: str) -> str:
    if backend not in backends(op):
        raise ValueError(f"backend must be one of {backends(op)}, got {backend!r}")
    return backend


@functools.cache
def _measured() -> dict:
    """tuning.json: {op: {dtype: {D: {N bucket: implementation}}}} measured on a GPU."""
    return json.loads(TUNING.read_text()) if TUNING.exists() else {}


def fastest(op: str, dtype: torch.dtype, D: int, n: int) -> str:
    """The Triton implementation of ``op`` to use for an (n, D) batch: measured, else modeled."""
    names = [name for name, impl in IMPLEMENTATIONS[op].items() if impl.triton]
    if len(names) == 1:
        return names[0]
    by_d = _measured().get(op, {}).get(str(dtype).removeprefix("torch."), {})
    if by_d:
        by_n = by_d[min(by_d, key=lambda d: abs(int(d) - D))]
        nearest = min(by_n, key=lambda b: abs(math.log2(int(b)) - math.log2(max(n, 1))))
        if by_n[nearest] in names:
            return by_n[nearest]
    element = 4 if dtype == torch.float32 else 2
    return costs.fastest(op, tuple(names), n, D, element)


def choose(op: str, backend: str, features: torch.Tensor, n: int | None = None) -> Implementation:
    """The implementation of ``op`` that ``backend`` asks for, for these features (the rows'
    count n, default features.shape[0], picks among the Triton implementations)."""
    check_backend(backend, op)
    table = IMPLEMENTATIONS[op]
    if backend == "torch":
        return table["torch"]
    if backend == "auto":
        usable = kc is not None and features.is_cuda and features.dtype != torch.float64
        if not usable:
            return table["torch"]
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
        return table[fastest(op, features.dtype, features.shape[-1], n)]
    return table[backend]
