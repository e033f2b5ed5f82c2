"""open_clip's factory: model names, pretrained tags resolved to Hub repositories (a cache built
on disk, offline), the transforms' normalization, the tokenizer, and what the README lists."""

import re
from pathlib import Path

import pytest
import torch
from helpers import require

require("tokenizers", "huggingface_hub")
from hub_helpers import cache_repo, tiny, use_cache, write_open_clip

import fastclip
from fastclip import factory, save_pretrained
from fastclip.factory import INCEPTION, PRETRAINED, Weights
from fastclip.model import PRESETS
from fastclip.transforms import CLIP_MEAN, CLIP_STD, preprocess

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    return use_cache(tmp_path / "hub", monkeypatch)


@pytest.fixture(scope="module")
def tokenizer():
    return fastclip.Tokenizer.train(["a photo of a red circle", "a blue square"] * 10, 600)


def test_every_tag_names_a_preset_and_a_repository():
    assert set(PRETRAINED) <= set(PRESETS)
    for name, tag in fastclip.list_pretrained():
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", PRETRAINED[name][tag].repo), (name, tag)


def test_the_readme_lists_every_tag_and_its_repository():
    rows = set(re.findall(r"^\| `([\w-]+)` \| `(\w+)` \| `([\w./-]+)` \|", README, flags=re.M))
    expected = {(n, t, PRETRAINED[n][t].repo) for n, t in fastclip.list_pretrained()}
    assert rows == expected


def test_a_tag_loads_its_repository_with_its_normalization(cache, monkeypatch, tokenizer):
    model = tiny(tokenizer)
    save_pretrained(model, cache.parent / "export", tokenizer)
    cache_repo(cache, "test-org/tiny-clip", cache.parent / "export")
    weights = Weights("test-org/tiny-clip", mean=INCEPTION, std=INCEPTION)
    monkeypatch.setitem(PRETRAINED, "tiny", {"test": weights})
    loaded, train, evaluate = fastclip.create_model_and_transforms("tiny", pretrained="test")
    assert torch.equal(loaded.visual_proj.weight, model.visual_proj.weight)
    assert loaded.config.activation == "gelu"  # the tag's
    assert (train.mean, train.std, evaluate.mean, evaluate.std) == (INCEPTION,) * 4
    assert train.train and not evaluate.train and train.size == evaluate.size == 32
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    torch.testing.assert_close(
        evaluate(image), preprocess(image, 32, mean=INCEPTION, std=INCEPTION)
    )
    assert train(image).shape == (3, 32, 32)
    quick = fastclip.create_model("tiny-quickgelu", pretrained="test")
    assert quick.config.activation == "quick_gelu"


def test_hf_hub_names_and_paths(cache, tokenizer):
    model = tiny(tokenizer)
    write_open_clip(model, cache.parent / "export", tokenizer)
    cache_repo(cache, "laion/tiny-clip", cache.parent / "export")
    for source in ("hf-hub:laion/tiny-clip", str(cache.parent / "export")):
        name, pretrained = (source, None) if source.startswith("hf-hub:") else ("tiny", source)
        loaded, _, evaluate = fastclip.create_model_and_transforms(name, pretrained=pretrained)
        assert torch.equal(loaded.text_proj.weight, model.text_proj.weight)
        assert (evaluate.mean, evaluate.std) == ((0.5,) * 3, (0.5,) * 3)  # its preprocess_cfg
    texts = ["a photo of a red circle"]
    assert torch.equal(fastclip.get_tokenizer("hf-hub:laion/tiny-clip")(texts), tokenizer(texts))
    _, _, plain = fastclip.create_model_and_transforms("tiny", image_mean=(0.1, 0.2, 0.3))
    assert (plain.mean, plain.std) == ((0.1, 0.2, 0.3), CLIP_STD)


def test_pretrained_models_share_openai_s_tokenizer(cache, tokenizer):
    tokenizer.save_pretrained(cache.parent / "tokenizer")
    cache_repo(cache, factory.TOKENIZER_REPO, cache.parent / "tokenizer")
    for name in ("ViT-B-32", "RN50", "ViT-L-14-quickgelu"):
        assert torch.equal(fastclip.get_tokenizer(name)("a red circle"), tokenizer("a red circle"))
    with pytest.raises(ValueError, match="Tokenizer.train"):
        fastclip.get_tokenizer("tiny")


def test_new_models_and_errors(cache, tokenizer):
    model, train, _ = fastclip.create_model_and_transforms("tiny", force_quick_gelu=True)
    assert model.config.activation == "quick_gelu" and train.mean == CLIP_MEAN
    save_pretrained(tiny(tokenizer), cache.parent / "tiny")
    with pytest.raises(ValueError, match=r"not a ViT-B-32: embed_dim 64 \(not 512\)"):
        fastclip.create_model("ViT-B-32", pretrained=cache.parent / "tiny")
    with pytest.raises(ValueError, match=r"model_name must be one of .*ViT-B-32"):
        fastclip.create_model("ViT-B-99")
    with pytest.raises(ValueError, match=r"tag of ViT-B-32 \(openai, .*laion2b_s34b_b79k"):
        fastclip.create_model("ViT-B-32", pretrained="laion9b")
    with pytest.raises(ValueError, match="pretrained must be None"):
        fastclip.create_model("hf-hub:laion/tiny-clip", pretrained="openai")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        fastclip.create_model("ViT-B-32", pretrained="openai")  # not in this cache
