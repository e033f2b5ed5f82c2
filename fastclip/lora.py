"""Low-rank adapters (LoRA, Hu et al. 2021) for CLIP's towers: each chosen linear layer learns
rank · (in + out) numbers instead of in · out, with the pretrained weights frozen.

    y = x W^T + b + (alpha / rank) · dropout(x) A^T B^T      A: (rank, in), B: (out, rank)

B starts at zero, so a model fresh from ``apply_lora`` computes exactly what it computed before.

    apply_lora(model, rank=8)                    # q/k/v, out, fc and proj of every block
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    ...                                          # train: only A and B change
    save_lora(model, "adapter.safetensors")      # A and B only; the settings in the metadata
    load_lora(base_model, "adapter.safetensors") # the adapter on another copy of the base model
    remove_lora(model)                           # W <- W + (alpha / rank) B A, plain nn.Linear
    save_pretrained(model, "merged")             # an ordinary checkpoint
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastclip.checks import check_number
from fastclip.files import read_weights, require_match, write_weights

DEFAULT_TARGETS = ("attn.qkv", "attn.out", "mlp.fc", "mlp.proj")  # every Block's linear layers
DEFAULT_TOWERS = ("visual", "text")  # CLIP's towers; the projection heads stay as they are
ADAPTERS = ("lora_A", "lora_B")  # the trained tensors of each LoRALinear
SETTINGS = ("rank", "alpha", "dropout", "targets", "towers")  # save_lora's metadata, as JSON


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / rank) · dropout(x) A^T B^T, with W and b frozen.

    Takes over ``base``'s ``weight`` (out, in) and ``bias`` (out,) — the same tensors, so the
    state-dict keys stay those of the layer it replaces — and adds ``lora_A`` (rank, in),
    initialized as nn.Linear initializes its weight, and ``lora_B`` (out, rank), zero, on the
    base's device and in its dtype.

    ``merge()`` adds (alpha / rank) B A into W (computed in at least fp32) and forward then skips
    the low-rank path (A and B get no gradient while merged); ``unmerge()`` subtracts it again.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        if type(base) is not nn.Linear:
            raise TypeError(
                f"base must be a plain nn.Linear (a subclass's own forward would be lost), "
                f"got {type(base).__name__}"
            )
        _check_settings(rank, alpha, dropout)
        weight = base.weight
        super().__init__(
            base.in_features, base.out_features, base.bias is not None, "meta", weight.dtype
        )  # no memory, no initialization: the base's tensors come next
        self.weight, self.bias = base.weight, base.bias  # shared, not copied
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        like = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False
        self.train(base.training)  # dropout follows the mode the model is in

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged:
            return y
        h = F.linear(F.dropout(x, self.dropout, self.training), self.lora_A)  # (..., rank)
        return y + self.scale * F.linear(h, self.lora_B)  # (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """W += (alpha / rank) B A; a no-op if already merged."""
        if not self.merged:
            self._add_update(1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= (alpha / rank) B A; a no-op if not merged."""
        if self.merged:
            self._add_update(-1.0)
            self.merged = False

    def _add_update(self, sign: float) -> None:
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        update = self.lora_B.to(dtype) @ self.lora_A.to(dtype)  # (out, in)
        self.weight.copy_(torch.add(self.weight.to(dtype), update, alpha=sign * self.scale))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, "
            f"dropout={self.dropout}, merged={self.merged}"
        )


def apply_lora(
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    towers: Sequence[str] = DEFAULT_TOWERS,
) -> list[str]:
    """Replace linear layers by LoRALinear, in place, and freeze everything else.

    Args:
        model: any module; for CLIP the towers are ``visual`` and ``text``.
        rank, alpha, dropout: the adapters' rank, scale numerator (scale = alpha / rank) and the
            dropout on their input.
        targets: name suffixes, matched at a dot ("proj" matches "mlp.proj", not "c_proj"). The
            ResNet's attention pool is ("q_proj", "k_proj", "v_proj").
        towers: top-level submodules to search; the heads (``visual_proj``, ``text_proj``) lie
            outside them.

    Every parameter but the adapters gets ``requires_grad=False``. Buffers still update in
    train mode (BatchNorm's running statistics): keep such modules in eval mode to freeze them.

    Returns:
        The qualified names of the replaced layers. ValueError if none matched, for bad settings,
        or if the model already has LoRA layers.
    """
    _check_settings(rank, alpha, dropout)
    targets, towers = _names(targets, "targets"), _names(towers, "towers")
    if _lora_layers(model):
        raise ValueError(
            "the model already has LoRA layers: remove_lora(model) first, or load_lora into it"
        )
    linears = _targeted(model, targets, towers)
    model.requires_grad_(False)
    for name, linear in linears.items():
        _replace(model, name, LoRALinear(linear, rank, alpha, dropout))
    model._lora_settings = dict(
        rank=int(rank), alpha=float(alpha), dropout=float(dropout), targets=targets, towers=towers
    )
    return list(linears)


def _targeted(
    model: nn.Module, targets: tuple[str, ...], towers: tuple[str, ...]
) -> dict[str, nn.Linear]:
    """The plain nn.Linear layers of ``towers`` whose names end in one of ``targets``, by name;
    ValueError if a tower is unknown, if none matches or if a match is a subclass."""
    children = dict(model.named_children())
    unknown = [t for t in towers if t not in children]
    if unknown:
        raise ValueError(f"towers {unknown} are not submodules of the model: {sorted(children)}")
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.partition(".")[0] in towers
    }
    names = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(
            f"no nn.Linear in towers {towers} matches targets {targets}; the towers' linear "
            f"layers are e.g. {list(linears)[:6]}"
        )
    subclasses = [
        f"{n} ({type(linears[n]).__name__})" for n in names if type(linears[n]) is not nn.Linear
    ]
    if subclasses:
        raise ValueError(
            f"targets {targets} match layers that are not plain nn.Linear: {subclasses}"
        )
    return {n: linears[n] for n in names}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (lora_A, lora_B of every LoRALinear): what the optimizer trains."""
    return [getattr(layer, key) for _, layer in _lora_layers(model) for key in ADAPTERS]


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (see LoRALinear.merge): inference at base cost."""
    for _, layer in _lora_layers(model, "merge_lora"):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora: the base weights again, to floating-point rounding."""
    for _, layer in _lora_layers(model, "unmerge_lora"):
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Turn every LoRALinear back into a plain nn.Linear, in place: with the adapters merged into
    its weight if ``merge``, the base weight otherwise. Parameters keep ``requires_grad=False``
    (``model.requires_grad_(True)`` to train them). Returns the model."""
    for name, layer in _lora_layers(model, "remove_lora"):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        bias, dtype = layer.bias is not None, layer.weight.dtype
        linear = nn.Linear(layer.in_features, layer.out_features, bias, "meta", dtype)
        linear.weight, linear.bias = layer.weight, layer.bias
        linear.train(layer.training)
        _replace(model, name, linear)
    model.__dict__.pop("_lora_settings", None)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters, under the model's state-dict keys (``<layer>.lora_A``/``.lora_B``)."""
    return {
        f"{name}.{key}": getattr(layer, key).detach()
        for name, layer in _lora_layers(model, "lora_state_dict")
        for key in ADAPTERS
    }


def save_lora(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapters to a .safetensors file (atomically), with apply_lora's settings (rank,
    alpha, dropout, targets, towers) as JSON strings in its metadata."""
    settings = getattr(model, "_lora_settings", None)
    if settings is None:
        raise ValueError("save_lora needs a model whose LoRA layers apply_lora or load_lora added")
    metadata = {k: json.dumps(settings[k]) for k in SETTINGS}
    write_weights(path, lora_state_dict(model), metadata)


def load_lora(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load save_lora's file into ``model``: apply_lora with the saved settings first if the model
    has no LoRA layers (undone if loading then fails), else into its layers, which must have the
    saved rank and alpha. Merged layers stay merged, with the new adapters.

    Returns:
        The names of the LoRA layers. ValueError for a file that is not save_lora's and for
        missing, unexpected or mis-shaped adapters.
    """
    state, metadata = read_weights(path, "LoRA")
    if not any(k.rpartition(".")[2] in ADAPTERS for k in state) or set(SETTINGS) - set(metadata):
        raise ValueError(
            f"{path} is not a LoRA file from save_lora: it needs lora_A/lora_B tensors (has e.g. "
            f"{sorted(state)[:4]}) and {SETTINGS} in its metadata (has {sorted(metadata)})"
        )
    settings = {k: json.loads(metadata[k]) for k in SETTINGS}
    settings["targets"], settings["towers"] = tuple(settings["targets"]), tuple(settings["towers"])
    layers, flags = _lora_layers(model), {n: p.requires_grad for n, p in model.named_parameters()}
    if layers:
        found = sorted({(layer.rank, layer.alpha) for _, layer in layers})
        if found != [(settings["rank"], settings["alpha"])]:
            raise ValueError(
                f"the model's LoRA layers have (rank, alpha) {found}, {path} "
                f"({settings['rank']}, {settings['alpha']})"
            )
    else:
        try:
            apply_lora(model, **settings)
        except ValueError as e:
            raise ValueError(f"the LoRA settings of {path} do not fit the model: {e}") from e
    try:
        _load_adapters(model, state, path)
    except ValueError:
        if not layers:  # undo apply_lora: base weights untouched, requires_grad as it was
            remove_lora(model, merge=False)
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
        raise
    return [name for name, _ in _lora_layers(model)]


def _load_adapters(
    model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike
) -> None:
    require_match(lora_state_dict(model), state, f"{path} does not match the model's LoRA layers")
    with torch.no_grad():
        for name, layer in _lora_layers(model):
            merged = layer.merged
            layer.unmerge()
            for key in ADAPTERS:
                getattr(layer, key).copy_(state[f"{name}.{key}"])
            if merged:
                layer.merge()


def _lora_layers(model: nn.Module, caller: str | None = None) -> list[tuple[str, LoRALinear]]:
    """(name, layer) of every LoRALinear; with ``caller``, ValueError if there is none."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if caller and not layers:
        raise ValueError(f"{caller}: the model has no LoRA layers (apply_lora adds them)")
    return layers


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _check_settings(rank: object, alpha: object, dropout: object) -> None:
    check_number("rank", rank, 1, integer=True)
    check_number("alpha", alpha, 0, open_low=True)
    check_number("dropout", dropout, 0, 1, open_high=True)


def _names(value: object, argument: str) -> tuple[str, ...]:
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or not value
        or not all(isinstance(v, str) and v for v in value)
    ):
        raise ValueError(f"{argument} must be a non-empty sequence of names, got {value!r}")
    return tuple(value)
