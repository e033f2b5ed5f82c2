"""The route from each public function to the code that computes it.

| public function                     | route: here and chunked. | Triton: kernels.                |
|-------------------------------------|--------------------------|---------------------------------|
| clip_loss, infonce, ClipLoss        | contrastive_forward      | contrastive.contrastive_forward |
|                                     | contrastive_backward     | contrastive.contrastive_backward|
|                                     |                          | fused.contrastive_backward      |
| siglip_loss, SigLipLoss             | siglip_forward           | siglip.siglip_forward           |
|                                     |                          | fused.siglip_forward            |
| similarity                          | similarity               | similarity.similarity_forward   |
| topk_similarity                     | topk                     | similarity.topk                 |
| normalized_linear, NormalizedLinear | normalized_linear        | projection.projection_forward   |
|                                     | (its backward)           | projection_backward.            |
|                                     |                          | projection_backward             |

Each route function runs the custom operator of its name, ``torch.ops.fastclip.<name>``, which calls
``fastclip.chunked``'s function of that name for the "torch" implementation, ``kernels.fused``'s for
"fused", and the Triton launcher beside it otherwise (with ``method=`` "blocks", "blocks-mm" or
"persistent" for the losses, whose kernels are in ``kernels.persistent`` and
``kernels.persistent_siglip``). The custom operators make every public
function one graph for ``torch.compile(fullgraph=True)``: each has a fake implementation (its
outputs' shapes and dtypes), so that compile never traces the blocked loops or the Triton launches.
Differentiable stages carry their own autograd (``similarity``; ``normalized_linear``, whose
backward is the operator ``normalized_linear_backward``); the losses' stages are differentiated
by the losses' ``torch.autograd.Function``s (``fastclip.loss``, ``fastclip.siglip``), which
compile traces as well. ``IMPLEMENTATIONS`` maps each operator to its eager implementation.

The losses' implementations, with the passes each executes, are named once in ``fastclip.registry``:
"blocks" (the Triton forward, then the bounded-block backward: a Triton kernel forms G block by
block and cuBLAS multiplies, ``fastclip.kernels.blocks``), "blocks-mm" (the same with cuBLAS
computing each block's dots), "persistent" (the same passes, the Triton sweeps run as one wave of
CTAs with a lean epilogue, for Hopper), "fused" (Triton row sweeps that accumulate the gradients in
fp32 workspaces) and "torch" (``fastclip.chunked``, on any device and in float64 too). Similarity
and the projection have one Triton implementation, "triton", and "torch".

Every public function takes, and passes down to its launcher as keywords:
- ``backend``: "auto", "triton", "torch" or an implementation's name; ``choose`` turns it into
  the implementation (``method`` from here on down). "auto" is the fastest Triton implementation
  on CUDA for 16/32-bit features, the PyTorch path elsewhere; "triton" the fastest Triton
  implementation (on CUDA, or on the CPU under Triton's interpreter). Fastest means: as measured
  on a GPU for the nearest (dtype, D, N bucket) in ``tuning.json`` (written by
  ``benchmarks/gpu_quick.sh``), else as ``fastclip.costs`` predicts among the designs a GPU
  has run (``MEASURED_ONLY`` are taken only where measured).
- ``block_bytes`` (the losses): the bound of the bounded buffer, the same on every path: the G
  blocks ("blocks", "blocks-mm", "persistent"), the fp32 workspaces ("fused"), the score blocks
  ("torch").
- ``config``: fixed Triton tiles (``fastclip.kernels.launch.TileConfig``) for every kernel the
  op launches; None autotunes. The PyTorch path has no tiles and ignores it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from fastclip import chunked, costs, registry

try:
    from fastclip.kernels import contrastive as kc
    from fastclip.kernels import fused as kfused
    from fastclip.kernels import projection as kproj
    from fastclip.kernels import projection_backward as kprojb
    from fastclip.kernels import siglip as ks
    from fastclip.kernels import similarity as ksim
    from fastclip.kernels.launch import TileConfig, interpreting
except ImportError:  # no Triton on this platform: the PyTorch path serves everything
    kc = kfused = kproj = kprojb = ks = ksim = interpreting = TileConfig = None

TUNING = Path(__file__).with_name("tuning.json")
# Designs no GPU has measured yet: "auto" takes them only where tuning.json says they won.
MEASURED_ONLY = ("persistent",)


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


@torch.compiler.assume_constant_result
def fastest(op: str, dtype: torch.dtype, D: int, n: int) -> str:
    """The Triton implementation of ``op`` to use for an (n, D) batch: measured, else modeled.
    torch.compile calls it while tracing and keeps its answer as a constant."""
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
    modeled = tuple(name for name in names if name not in MEASURED_ONLY)
    return costs.fastest(op, modeled, n, D, element)


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
#
# Each stage runs as a custom operator, ``torch.ops.fastclip.<stage>`` (defined below), so that
# torch.compile sees one opaque op with a fake implementation (shapes and dtypes) where the
# Python loops and Triton launches would break its graph. A custom op returns no None and takes
# no objects: a result not asked for comes back as an empty tensor, and a TileConfig travels as
# its fields (``_tiles``).


def contrastive_forward(x, y, scale, offset, both_directions, *, method, block_bytes, config):
    """The statistics (pdot, m, m') of InfoNCE: the same Triton sweep for every Triton method
    (m' None for one direction)."""
    pdot, row, col = torch.ops.fastclip.contrastive_forward(
        x, y, scale, offset, both_directions, method, block_bytes, _tiles(config)
    )
    return pdot, row, (col if both_directions else None)


def contrastive_backward(x, y, scale, stats, w_x, w_y, weight, offset, need_dx, need_dy, *,
                         method, block_bytes, config):  # fmt: skip
    """(dx, dy, dscale) of InfoNCE from the forward's statistics (dx, dy None unless needed;
    the arguments: see ``fastclip.kernels.contrastive.contrastive_backward``)."""
    pdot, row, col = stats
    dx, dy, dscale = torch.ops.fastclip.contrastive_backward(
        x, y, scale, pdot, row, col, w_x, w_y, weight, offset, need_dx, need_dy, method,
        block_bytes, _tiles(config),
    )  # fmt: skip
    return (dx if need_dx else None), (dy if need_dy else None), dscale


def siglip_forward(x, y, scale, bias, offset, need_dx, need_dy, need_dparams, *, method,
                   block_bytes, config):  # fmt: skip
    """(loss, dx, dy, dscale, dbias) of SigLIP, each gradient None unless requested (the
    arguments: see ``fastclip.kernels.siglip.siglip_forward``)."""
    loss, dx, dy, dscale, dbias = torch.ops.fastclip.siglip_forward(
        x, y, scale, bias, offset, need_dx, need_dy, need_dparams, method, block_bytes,
        _tiles(config),
    )  # fmt: skip
    if not need_dparams:
        dscale = dbias = None
    return loss, (dx if need_dx else None), (dy if need_dy else None), dscale, dbias


def similarity(a, b, scale, bias, normalize, out_dtype, eps, *, method, config):
    """(n_a, n_b) scores, differentiable."""
    return torch.ops.fastclip.similarity(
        a, b, scale, bias, normalize, out_dtype, eps, method, _tiles(config)
    )


def topk(queries, keys, k, scale, normalize, eps, chunk, *, method, config):
    """The k best keys of every query: values and int64 indices. The kernel keeps at most
    ``MAX_TOPK`` scores per query; a larger k takes the PyTorch path."""
    return torch.ops.fastclip.topk(
        queries, keys, k, scale, normalize, eps, chunk, method, _tiles(config)
    )


def normalized_linear(x, weight, bias, eps, *, method, config):
    """normalize(x W^T + b) of x (n_rows, n_in), differentiable. The PyTorch path is eager
    PyTorch, differentiated by autograd (compile traces it as it is); the Triton path is the
    custom operator."""
    if method == "torch":
        return F.normalize(F.linear(x, weight, bias), dim=-1, eps=eps)
    return torch.ops.fastclip.normalized_linear(x, weight, bias, eps, method, _tiles(config))[0]


def _tiles(config) -> list[int] | None:
    """A TileConfig as a custom op takes it: its fields in order, -1 for None."""
    if config is None:
        return None
    if not torch.compiler.is_compiling():  # a traced graph launches an equal one
        _GIVEN[config] = config
    return [-1 if v is None else v for v in (getattr(config, f.name) for f in _TILE_FIELDS)]


def _config(tiles: list[int] | None):
    """``_tiles``' inverse: the very TileConfig the caller gave (an equal one if none was)."""
    if tiles is None:
        return None
    config = TileConfig(*(None if v < 0 else v for v in tiles))
    return _GIVEN.get(config, config)


_TILE_FIELDS = dataclasses.fields(TileConfig) if TileConfig is not None else ()
# The TileConfigs given, by value (a few, from tests and benchmarks): a launch gets the object.
_GIVEN: dict[TileConfig, TileConfig] = {}

# ----------------------------------------------------------------------------------------------
# The custom operators: each stage's implementations, fake (shapes and dtypes alone) and autograd
# ----------------------------------------------------------------------------------------------

# Each custom op's eager implementation, by name: what ``torch.ops.fastclip.<name>`` runs.
IMPLEMENTATIONS: dict[str, Callable] = {}


def _op(name: str):
    """Register the decorated function as the custom operator fastclip::<name>, which computes
    new tensors only (it mutates none of its arguments)."""

    def register(implementation: Callable):
        IMPLEMENTATIONS[name] = implementation
        return torch.library.custom_op(f"fastclip::{name}", implementation, mutates_args=())

    return register


def _returned(like: torch.Tensor, *outputs: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """A custom op's outputs as its fake implementation describes them: new contiguous
    tensors, an empty one for None. A view (of one buffer of sums, say) is copied: outputs may
    not share memory, nor be laid out otherwise than the fake ones."""
    returned, buffers = [], set()
    for t in _as_tensors(like, *outputs):
        view = t.untyped_storage().data_ptr() in buffers or t.storage_offset()
        if t.numel() and (view or not t.is_contiguous()):
            t = t.clone(memory_format=torch.contiguous_format)
        buffers.add(t.untyped_storage().data_ptr())
        returned.append(t)
    return tuple(returned)


def _as_tensors(like: torch.Tensor, *outputs: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """None as an empty tensor, as the fake implementations return it too."""
    return tuple(like.new_empty(0) if t is None else t for t in outputs)


def _rows(like: torch.Tensor, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialized ``shape`` on like's device, in like's dtype unless given: what the fake
    implementations return."""
    return like.new_empty(shape, dtype=dtype or like.dtype)


@_op("contrastive_forward")
def _contrastive_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    offset: int,
    both_directions: bool,
    method: str,
    block_bytes: int | None,
    tiles: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if method == "torch":
        stats = chunked.contrastive_forward(
            x, y, scale, offset, both_directions, block_bytes=block_bytes
        )
    else:
        stats = kc.contrastive_forward(
            x, y, scale, offset, both_directions, method=method, config=_config(tiles)
        )
    return _returned(x, *stats)


@_contrastive_forward.register_fake
def _(x, y, scale, offset, both_directions, method, block_bytes, tiles):
    cdt = chunked.compute_dtype(x.dtype)
    col = _rows(x, y.shape[0], dtype=cdt) if both_directions else None
    return _as_tensors(x, _rows(x, x.shape[0], dtype=cdt), _rows(x, x.shape[0], dtype=cdt), col)


@_op("contrastive_backward")
def _contrastive_backward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    pdot: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor | None,
    w_x: torch.Tensor,
    w_y: torch.Tensor | None,
    weight: torch.Tensor,
    offset: int,
    need_dx: bool,
    need_dy: bool,
    method: str,
    block_bytes: int | None,
    tiles: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (x, y, scale, (pdot, row, col), w_x, w_y, weight, offset, need_dx, need_dy)
    if method == "torch":
        grads = chunked.contrastive_backward(*args, block_bytes=block_bytes)
    elif method == "fused":
        grads = kfused.contrastive_backward(*args, block_bytes=block_bytes, config=_config(tiles))
    else:
        grads = kc.contrastive_backward(
            *args, method=method, block_bytes=block_bytes, config=_config(tiles)
        )
    return _returned(x, *grads)


@_contrastive_backward.register_fake
def _(x, y, scale, pdot, row, col, w_x, w_y, weight, offset, need_dx, need_dy, method,
      block_bytes, tiles):  # fmt: skip
    dx = _rows(x, *x.shape) if need_dx else None
    dy = _rows(y, *y.shape) if need_dy else None
    return _as_tensors(x, dx, dy, _rows(x, dtype=chunked.compute_dtype(x.dtype)))


@_op("siglip_forward")
def _siglip_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    offset: int | None,
    need_dx: bool,
    need_dy: bool,
    need_dparams: bool,
    method: str,
    block_bytes: int | None,
    tiles: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (x, y, scale, bias, offset, need_dx, need_dy, need_dparams)
    if method == "torch":
        results = chunked.siglip_forward(*args, block_bytes=block_bytes)
    elif method == "fused":
        results = kfused.siglip_forward(*args, block_bytes=block_bytes, config=_config(tiles))
    else:
        results = ks.siglip_forward(
            *args, method=method, block_bytes=block_bytes, config=_config(tiles)
        )
    return _returned(x, *results)


@_siglip_forward.register_fake
def _(x, y, scale, bias, offset, need_dx, need_dy, need_dparams, method, block_bytes, tiles):
    cdt = chunked.compute_dtype(x.dtype)
    dx = _rows(x, *x.shape) if need_dx else None
    dy = _rows(y, *y.shape) if need_dy else None
    dscale, dbias = (_rows(x, dtype=cdt), _rows(x, dtype=cdt)) if need_dparams else (None, None)
    return _as_tensors(x, _rows(x, dtype=cdt), dx, dy, dscale, dbias)


@_op("similarity")
def _similarity(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    normalize: bool,
    out_dtype: torch.dtype,
    eps: float,
    method: str,
    tiles: list[int] | None,
) -> torch.Tensor:
    if method == "torch":
        return chunked.similarity(a, b, scale, bias, normalize, out_dtype, eps)
    inv_a = ksim.inverse_norms(a, eps) if normalize else None
    inv_b = ksim.inverse_norms(b, eps) if normalize else None
    config = _config(tiles)
    return ksim.similarity_forward(a, b, scale, bias, inv_a, inv_b, out_dtype, config=config)


@_similarity.register_fake
def _(a, b, scale, bias, normalize, out_dtype, eps, method, tiles):
    return _rows(a, a.shape[0], b.shape[0], dtype=out_dtype)


def _similarity_context(ctx, inputs, output):
    a, b, scale, bias, normalize, _, eps, _, _ = inputs
    ctx.save_for_backward(a, b, scale)
    ctx.normalize, ctx.eps, ctx.bias_like = normalize, eps, (bias.dtype, bias.shape)


def _similarity_backward(ctx, grad):
    """Two products of dS on torch's matmul, whichever implementation ran the forward."""
    a, b, scale = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    da, db, dscale, dbias = chunked.similarity_backward(
        grad, a, b, scale, ctx.normalize, ctx.eps, *needs
    )
    if dbias is not None:
        dbias = dbias.to(ctx.bias_like[0]).reshape(ctx.bias_like[1])
    return da, db, dscale, dbias, None, None, None, None, None


_similarity.register_autograd(_similarity_backward, setup_context=_similarity_context)


@_op("topk")
def _topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    scale: torch.Tensor,
    normalize: bool,
    eps: float,
    chunk: int | None,
    method: str,
    tiles: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "torch" or k > ksim.MAX_TOPK:
        found = chunked.topk(queries, keys, k, scale, normalize, eps, chunk)
    else:
        found = ksim.topk(queries, keys, k, scale, normalize, eps, config=_config(tiles))
    return _returned(queries, *found)


@_topk.register_fake
def _(queries, keys, k, scale, normalize, eps, chunk, method, tiles):
    n_q = queries.shape[0]
    return _rows(queries, n_q, k), _rows(queries, n_q, k, dtype=torch.int64)


@_op("normalized_linear")
def _normalized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    method: str,
    tiles: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = normalize(x W^T + b) and the rows' norms ||x W^T + b|| that the backward needs."""
    if method == "torch":
        return _returned(x, *chunked.normalized_linear(x, weight, bias, eps))
    return _returned(x, *kproj.projection_forward(x, weight, bias, eps, config=_config(tiles)))


@_normalized_linear.register_fake
def _(x, weight, bias, eps, method, tiles):
    n_rows = x.shape[0]
    norm = _rows(x, n_rows, dtype=chunked.compute_dtype(x.dtype))
    return _rows(x, n_rows, weight.shape[0]), norm


def _normalized_linear_context(ctx, inputs, output):
    x, weight, _, eps, method, tiles = inputs
    need_dx, need_dw = ctx.needs_input_grad[:2]
    y, norm = output
    ctx.save_for_backward(x if need_dw else None, weight if need_dx else None, y, norm)
    ctx.mark_non_differentiable(norm)
    ctx.eps, ctx.method, ctx.tiles = eps, method, tiles


def _normalized_linear_grad(ctx, grad, _):
    x, weight, y, norm = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    grads = torch.ops.fastclip.normalized_linear_backward(
        grad, y, norm, x, weight, ctx.eps, *needs, ctx.method, ctx.tiles
    )
    return *(g if need else None for g, need in zip(grads, needs, strict=True)), None, None, None


_normalized_linear.register_autograd(
    _normalized_linear_grad, setup_context=_normalized_linear_context
)


@_op("normalized_linear_backward")
def _normalized_linear_backward(
    grad: torch.Tensor,
    y: torch.Tensor,
    norm: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    method: str,
    tiles: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dL/dx, dL/dW, dL/db (empty where not needed) from dL/dy and the forward's y and norms."""
    args = (grad, y, norm, x, weight, eps, need_dx, need_dw, need_db)
    if method == "torch":
        return _returned(y, *chunked.normalized_linear_backward(*args))
    return _returned(y, *kprojb.projection_backward(*args, config=_config(tiles)))


@_normalized_linear_backward.register_fake
def _(grad, y, norm, x, weight, eps, need_dx, need_dw, need_db, method, tiles):
    n_rows, n_out = y.shape
    dx = _rows(y, n_rows, weight.shape[1]) if need_dx else None
    dw = _rows(y, n_out, x.shape[1]) if need_dw else None
    db = _rows(y, n_out) if need_db else None
    return _as_tensors(y, dx, dw, db)
