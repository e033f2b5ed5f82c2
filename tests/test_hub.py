"""Hub repository names: models and tokenizers load by name from a Hugging Face cache built on
disk, offline, in fastclip's, Hugging Face's and open_clip's layouts, at pinned revisions."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import require
from safetensors.torch import load_file

require("tokenizers", "huggingface_hub")
from hub_helpers import TEXT_HEADS, VISION_HEADS, cache_repo, tiny, use_cache, write_open_clip

from fastclip import CLIP, Tokenizer, export_hf, load_pretrained, save_pretrained
from fastclip.cli import eval_command
from fastclip.files import write_json, write_weights
from fastclip.finetune import load_checkpoint


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    captions = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square")]
    return Tokenizer.train(captions * 10, vocab_size=600, context_length=16)


WRITERS = {
    "fastclip": lambda model, d, tok: save_pretrained(model, d, tok),
    "hugging_face": lambda model, d, tok: export_hf(model, d, tok),
    "open_clip": lambda model, d, tok: write_open_clip(model, d, False, tok),
}


def features(model: CLIP, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def assert_same_model(loaded: CLIP, model: CLIP, tokens: torch.Tensor) -> None:
    for ours, theirs in zip(features(loaded, tokens), features(model, tokens), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", list(WRITERS))
@pytest.mark.parametrize("spelling", ["", "hf-hub:"])
def test_model_and_tokenizer_load_by_name_offline(tmp_path, monkeypatch, tokenizer, layout,
                                                  spelling):  # fmt: skip
    cache = use_cache(tmp_path / "hub", monkeypatch)
    model = tiny(tokenizer)
    WRITERS[layout](model, tmp_path / "export", tokenizer)
    cache_repo(cache, "test-org/tiny-clip", tmp_path / "export")
    monkeypatch.chdir(tmp_path)  # no local folder of that name

    loaded = load_pretrained(f"{spelling}test-org/tiny-clip")
    reloaded_tokenizer = Tokenizer.from_pretrained(f"{spelling}test-org/tiny-clip")
    texts = ["a red circle", "a blue square"]
    assert torch.equal(reloaded_tokenizer(texts), tokenizer(texts))
    assert (loaded.config.vision_heads, loaded.config.text_heads) == (VISION_HEADS, TEXT_HEADS)
    assert_same_model(loaded, model, tokenizer(texts))


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_config_sets_what_shapes_cannot(tmp_path, monkeypatch, tokenizer, quick_gelu):
    """Without open_clip_config.json, OpenAI-layout weights would load with QuickGELU and a head
    per 64 channels: the config's activation and heads must win."""
    cache = use_cache(tmp_path / "hub", monkeypatch)
    model = tiny(tokenizer, activation="quick_gelu" if quick_gelu else "gelu")
    write_open_clip(model, tmp_path / "export", quick_gelu)
    cache_repo(cache, "laion/tiny-clip", tmp_path / "export")
    loaded = load_pretrained("hf-hub:laion/tiny-clip")
    assert loaded.config.activation == model.config.activation
    assert_same_model(loaded, model, tokenizer(["a green circle"]))
    # A local copy of the repository reads the same way.
    assert_same_model(load_pretrained(tmp_path / "export"), model, tokenizer(["a red square"]))


def test_revisions_are_pinned(tmp_path, monkeypatch, tokenizer):
    cache = use_cache(tmp_path / "hub", monkeypatch)
    old, new = tiny(tokenizer, seed=1), tiny(tokenizer, seed=2)
    save_pretrained(old, tmp_path / "old", tokenizer)
    save_pretrained(new, tmp_path / "new", tokenizer)
    commit = cache_repo(cache, "test-org/tiny-clip", tmp_path / "old", refs=("v1",))
    cache_repo(cache, "test-org/tiny-clip", tmp_path / "new", refs=("main",))
    tokens = tokenizer(["a blue circle"])
    assert_same_model(load_pretrained("test-org/tiny-clip"), new, tokens)
    for revision in ("v1", commit):
        assert_same_model(load_pretrained("test-org/tiny-clip", revision=revision), old, tokens)
    assert (
        Tokenizer.from_pretrained("test-org/tiny-clip", revision="v1").vocab_size
        == tokenizer.vocab_size
    )
    with pytest.raises(FileNotFoundError, match="revision 'v2'.*HF_HUB_OFFLINE"):
        load_pretrained("test-org/tiny-clip", revision="v2")


def test_sharded_weights_by_name(tmp_path, monkeypatch, tokenizer):
    cache = use_cache(tmp_path / "hub", monkeypatch)
    model = tiny(tokenizer)
    export = export_hf(model, tmp_path / "export")
    weights = load_file(export / "model.safetensors")
    (export / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}  # fmt: skip
    for shard, keys in shards.items():
        write_weights(export / shard, {k: weights[k] for k in keys})
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    write_json(export / "model.safetensors.index.json", index)
    cache_repo(cache, "test-org/sharded", export)
    assert_same_model(load_pretrained("test-org/sharded"), model, tokenizer(["a red circle"]))


def test_errors(tmp_path, monkeypatch, tokenizer):
    cache = use_cache(tmp_path / "hub", monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"not a local path.*cache.*HF_HUB_OFFLINE"):
        load_pretrained("test-org/absent")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        Tokenizer.from_pretrained("test-org/absent")
    with pytest.raises(ValueError, match="hf-hub:org/name"):
        load_pretrained("hf-hub:no-slash")
    with pytest.raises(ValueError, match="revision applies to Hub repositories"):
        load_pretrained(tmp_path, revision="main")
    config = json.dumps({"architectures": ["CLIPModel"]}).encode()
    cache_repo(cache, "test-org/no-weights", {"config.json": config})
    with pytest.raises(FileNotFoundError, match=r"holds config.json but none of"):
        load_pretrained("test-org/no-weights")
    bad = {"model_cfg": {"vision_cfg": {"timm_model_name": "convnext"}}}
    cache_repo(cache, "test-org/timm-tower", {"open_clip_config.json": json.dumps(bad).encode(),
                                              "open_clip_model.safetensors": b""})  # fmt: skip
    with pytest.raises(ValueError, match=r"does not support model_cfg.vision_cfg.*timm_model_name"):
        load_pretrained("hf-hub:test-org/timm-tower")


def test_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install "fastclip-triton\[hub\]"'):
        load_pretrained("test-org/tiny-clip")


def test_a_fresh_process_reads_hf_home_offline(tmp_path, tokenizer):
    """What a user does: HF_HOME and HF_HUB_OFFLINE in the environment, a name in the call."""
    model = tiny(tokenizer)
    export_hf(model, tmp_path / "export", tokenizer)
    cache_repo(tmp_path / "hf" / "hub", "openai/clip-tiny", tmp_path / "export")
    script = (
        "import torch, fastclip\n"
        "model = fastclip.load_pretrained('openai/clip-tiny')\n"
        "tokens = fastclip.Tokenizer.from_pretrained('openai/clip-tiny')(['a red circle'])\n"
        "torch.save(model.encode_text(tokens).detach(), 'text.pt')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=True)
    with torch.no_grad():
        expected = model.encode_text(tokenizer(["a red circle"]))
    torch.testing.assert_close(torch.load(tmp_path / "text.pt"), expected)


def test_commands_take_repository_names(tmp_path, monkeypatch, tokenizer):
    cache = use_cache(tmp_path / "hub", monkeypatch)
    save_pretrained(tiny(tokenizer), tmp_path / "export", tokenizer)
    cache_repo(cache, "test-org/tiny-clip", tmp_path / "export")
    monkeypatch.chdir(tmp_path)
    assert "zeroshot_top1" in eval_command(["test-org/tiny-clip"])
    assert load_checkpoint("test-org/tiny-clip").config.vision_heads == VISION_HEADS
