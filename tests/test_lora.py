"""LoRA: the layer against its formula in float64, training that moves only the adapters,
merge / unmerge / remove, adapter files, layer selection and clear errors."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from fastclip import CLIP, ClipLoss, NormalizedLinear, load_pretrained, save_pretrained
from fastclip.lora import (
    DEFAULT_TARGETS,
    LoRALinear,
    apply_lora,
    load_lora,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_lora,
    unmerge_lora,
)

RESNET = dict(vision_layers=(1, 2, 1, 1), vision_width=16, vision_heads=4, proj_bias=True)
SOT, EOT, CONTEXT = 1022, 1023, 32
# Merged and unmerged forwards differ by fp32 rounding of W + scale · B A only.
RTOL, ATOL = 1e-5, 1e-6


def tiny(seed: int = 0, **overrides) -> CLIP:
    torch.manual_seed(seed)
    return CLIP("tiny", **overrides).eval()


def batch(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = torch.randint(1, SOT, (n, CONTEXT), generator=g)
    tokens[:, 0] = SOT
    tokens[torch.arange(n), torch.randint(2, CONTEXT, (n,), generator=g)] = EOT
    return images, tokens


@torch.no_grad()
def features(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Image and text features of one batch, stacked: (2, B, embed_dim)."""
    image_features, text_features, *_ = model(*batch(seed=seed))
    return torch.stack([image_features, text_features])


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B (and a fresh A), so that merging changes the weights."""
    g = torch.Generator().manual_seed(seed)
    for p in lora_parameters(model):
        p.copy_(0.05 * torch.randn(p.shape, generator=g))


def is_adapter(key: str) -> bool:
    return key.endswith((".lora_A", ".lora_B"))


@pytest.mark.parametrize("bias", [True, False])
def test_layer_matches_formula_in_float64(bias):
    base = nn.Linear(7, 5, bias=bias, dtype=torch.float64)
    layer = LoRALinear(base, rank=3, alpha=6.0, dropout=0.5).eval()
    assert layer.weight is base.weight and layer.bias is base.bias  # shared, frozen
    assert not layer.weight.requires_grad
    assert set(layer.state_dict()) == set(base.state_dict()) | {"lora_A", "lora_B"}
    assert layer.lora_A.shape == (3, 7) and layer.lora_B.shape == (5, 3)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = base(x) + 2.0 * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(layer.train()(x), expected)  # dropout acts in train mode only
    layer.eval().merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_starts_identical_and_trains_only_adapters():
    base = tiny()
    model = copy.deepcopy(base)
    apply_lora(model, dropout=0.1)
    assert torch.equal(features(model), features(base))  # B = 0
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not is_adapter(k)}
    assert frozen.keys() == base.state_dict().keys()
    adapters = {id(p) for p in lora_parameters(model)}
    assert {id(p) for p in model.parameters() if p.requires_grad} == adapters
    # An optimizer over all parameters, with weight decay: frozen ones must still not move.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(3):
        optimizer.zero_grad()
        ClipLoss()(*model(*batch(seed=step))).backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == (id(p) in adapters), name
        optimizer.step()
    model.eval()
    assert (features(model) - features(base)).abs().max() > 1e-3
    state = model.state_dict()
    changed = [k for k, v in frozen.items() if not torch.equal(state[k], v)]
    assert not changed, f"{len(changed)} frozen tensors changed, e.g. {changed[:3]}"


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("overrides", [{}, RESNET], ids=["vit", "resnet"])
def test_merge_unmerge_remove(tmp_path, merge, overrides):
    base = tiny(**overrides)
    model = copy.deepcopy(base)
    names = apply_lora(model)
    randomize_adapters(model)
    expected = features(model)
    assert (expected - features(base)).abs().max() > 1e-3
    weights = {n: model.get_submodule(n).weight.clone() for n in names}
    merge_lora(model)
    merge_lora(model)  # a no-op the second time
    assert all(model.get_submodule(n).merged for n in names)
    assert all(not torch.equal(model.get_submodule(n).weight, w) for n, w in weights.items())
    torch.testing.assert_close(features(model), expected, rtol=RTOL, atol=ATOL)
    unmerge_lora(model)
    for n, w in weights.items():
        torch.testing.assert_close(model.get_submodule(n).weight, w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(features(model), expected, rtol=RTOL, atol=ATOL)

    assert remove_lora(model, merge=merge) is model
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    assert model.state_dict().keys() == base.state_dict().keys()
    reference = expected if merge else features(base)
    torch.testing.assert_close(features(model), reference, rtol=RTOL, atol=ATOL)
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    # Not bitwise: CPU convolutions take another path when the weights require grad.
    torch.testing.assert_close(features(loaded), features(model), rtol=RTOL, atol=ATOL)


def test_save_load_round_trip(tmp_path):
    base = tiny()
    model = copy.deepcopy(base)
    names = apply_lora(model, rank=4, alpha=8.0, dropout=0.05)
    randomize_adapters(model)
    expected = features(model)
    path = tmp_path / "adapter.safetensors"
    save_lora(model, path)
    with safe_open(path, framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert (
        keys
        == set(lora_state_dict(model))
        == {f"{n}.{k}" for n in names for k in ("lora_A", "lora_B")}
    )
    assert {
        k: json.loads(metadata[k]) for k in ("rank", "alpha", "dropout", "targets", "towers")
    } == {
        "rank": 4,
        "alpha": 8.0,
        "dropout": 0.05,
        "targets": list(DEFAULT_TARGETS),
        "towers": ["visual", "text"],
    }
    fresh = copy.deepcopy(base)
    assert load_lora(fresh, path) == names
    torch.testing.assert_close(features(fresh), expected, rtol=0, atol=0)
    assert {(m.rank, m.alpha, m.dropout) for m in fresh.modules() if isinstance(m, LoRALinear)} == {
        (4, 8.0, 0.05)
    }
    # Into a model that has (merged) LoRA layers already: they stay merged, with the new weights.
    merged = copy.deepcopy(base)
    apply_lora(merged, rank=4, alpha=8.0)
    merge_lora(merged)
    load_lora(merged, path)
    assert all(m.merged for m in merged.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(features(merged), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "overrides, kwargs, expected",
    [
        ({}, dict(targets=("attn.qkv",), towers=("text",)), ["text.{i}.attn.qkv"]),
        ({}, dict(targets=("proj",), towers=("visual",)), ["visual.{i}.mlp.proj"]),
        ({}, {}, [f"{t}.{{i}}.{s}" for t in ("visual", "text") for s in DEFAULT_TARGETS]),
        (RESNET, {}, [f"text.{{i}}.{s}" for s in DEFAULT_TARGETS]),
        (RESNET, dict(targets=("q_proj", "k_proj", "v_proj"), towers=("visual",)), None),
    ],
    ids=["text-qkv", "dot-boundary", "default", "resnet-default", "resnet-attnpool"],
)
def test_selection_and_trainable_count(overrides, kwargs, expected):
    model = tiny(**overrides)
    names = apply_lora(model, rank=3, **kwargs)
    if expected is None:
        expected = [f"visual.attnpool.{p}_proj" for p in "qkv"]
    else:  # one name per block (tiny: 2 blocks per tower)
        expected = [p.format(i=f"transformer.blocks.{i}") for p in expected for i in range(2)]
    assert sorted(names) == sorted(expected)
    replaced = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert sorted(replaced) == sorted(names)
    assert type(model.visual_proj) is NormalizedLinear and type(model.text_proj) is NormalizedLinear
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = [model.get_submodule(n) for n in names]
    assert trainable == sum(3 * (m.in_features + m.out_features) for m in layers)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank"),
        (dict(rank=2.0), "rank"),
        (dict(alpha=0.0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(targets=("nope",)), r"targets \('nope',\)"),
        (dict(targets="attn.qkv"), "targets"),
        (dict(towers=("vision",)), "vision"),
        (dict(towers=("visual_proj",), targets=("visual_proj",)), "plain nn.Linear"),
    ],
)
def test_apply_errors(kwargs, match):
    model = tiny()
    with pytest.raises(ValueError, match=match):
        apply_lora(model, **kwargs)
    assert all(p.requires_grad for p in model.parameters())  # nothing changed


def test_errors_resnet_without_blocks_twice_and_without_lora():
    with pytest.raises(ValueError, match=r"no nn.Linear in towers \('visual',\)"):
        apply_lora(tiny(**RESNET), towers=("visual",))
    with pytest.raises(ValueError, match="attnpool.q_proj"):  # "proj" is no suffix of "q_proj"
        apply_lora(tiny(**RESNET), targets=("proj",), towers=("visual",))
    model = tiny()
    apply_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)
    with pytest.raises(TypeError, match="NormalizedLinear"):
        LoRALinear(model.text_proj, rank=2, alpha=2.0)
    for fn in (merge_lora, unmerge_lora, remove_lora, lora_state_dict):
        with pytest.raises(ValueError, match="no LoRA layers"):
            fn(tiny())


def test_load_errors(tmp_path):
    model = tiny()
    save_pretrained(model, tmp_path / "full")
    with pytest.raises(ValueError, match="not a LoRA file"):
        load_lora(tiny(), tmp_path / "full" / "model.safetensors")
    (tmp_path / "junk.safetensors").write_text("not tensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_lora(tiny(), tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_lora(tiny(), tmp_path / "absent.safetensors")

    apply_lora(model, rank=2)
    path = tmp_path / "adapter.safetensors"
    save_lora(model, path)
    for overrides, match in [
        (dict(mlp_ratio=2.0), r"wrong shape \(8\)"),  # mlp.fc and mlp.proj of 4 blocks
        (dict(text_layers=3), r"missing \(8\): text.transformer.blocks.2"),
        (RESNET, "unexpected"),  # the ViT's visual adapters
    ]:
        other = tiny(**overrides)
        state = copy.deepcopy(other.state_dict())
        with pytest.raises(ValueError, match=match):
            load_lora(other, path)
        # Rolled back: no LoRA layers, trainable again, the same weights.
        assert not any(isinstance(m, LoRALinear) for m in other.modules())
        assert all(p.requires_grad for p in other.parameters())
        assert other.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())
    other = tiny()
    apply_lora(other, rank=4)
    with pytest.raises(ValueError, match=r"\(rank, alpha\) \[\(4, 16.0\)\]"):
        load_lora(other, path)
