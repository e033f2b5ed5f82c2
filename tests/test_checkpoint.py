"""Checkpoints: fastclip's layout, Hugging Face CLIPModel parity and export, OpenAI / open_clip
state dicts (ViT and ResNet), open_clip's Hub layout written and read back, and clear errors for
bad files."""

import ast
import json
import os
import re
from dataclasses import replace

import pytest
import torch
from helpers import require
from open_clip_code import OPEN_CLIP_INSTALL, open_clip_files
from safetensors.torch import load_file, save_file

require("tokenizers", "transformers")
import transformers

import fastclip.files
from fastclip.checkpoint import (
    export_hf,
    export_open_clip,
    load_pretrained,
    save_pretrained,
    to_openai_state_dict,
)
from fastclip.checkpoint.open_clip import OPEN_CLIP_CONFIG, open_clip_config
from fastclip.model import CLIP, PRESETS
from fastclip.tokenizer import Tokenizer

VOCAB, SOT, EOT, CONTEXT = 99, 97, 98, 16
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
RESNET = dict(vision_layers=(1, 2, 1, 1), vision_width=16, vision_heads=4, proj_bias=True)


def hf_model(legacy_eos: bool = False, act: str = "quick_gelu"):
    """A small random transformers.CLIPModel (non-power-of-two widths, 3 vision heads)."""
    torch.manual_seed(0)
    text = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CONTEXT,
        hidden_act=act,
        bos_token_id=0 if legacy_eos else SOT,
        eos_token_id=2 if legacy_eos else EOT,
        pad_token_id=1 if legacy_eos else EOT,
    )
    vision = dict(
        hidden_size=48,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=3,
        image_size=30,
        patch_size=6,
        hidden_act=act,
    )
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # HF zero-initializes nothing we could miss, but make biases non-zero
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model


def batch(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 30, 30, generator=g)
    tokens = torch.full((n, CONTEXT), EOT)  # Hugging Face pads with eot
    for i, length in enumerate([4, CONTEXT - 2, 9][:n]):
        tokens[i, 0] = SOT
        tokens[i, 1 : length + 1] = torch.randint(3, SOT, (length,), generator=g)
    return images, tokens


def hf_features(model, images, tokens):
    with torch.no_grad():
        image = model.get_image_features(pixel_values=images)
        text = model.get_text_features(input_ids=tokens)
    return [getattr(f, "pooler_output", f) for f in (image, text)]  # outputs differ by version


def our_features(model, images, tokens, normalize=False):
    with torch.no_grad():
        return model.encode_image(images, normalize), model.encode_text(tokens, normalize)


def assert_features_match(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        assert b.abs().max() > 0.1  # real features, not zeros
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    model = hf_model()
    model.save_pretrained(directory)
    return model, directory


def test_hugging_face_parity(hf_dir):
    model, directory = hf_dir
    ours = load_pretrained(directory)
    assert ours.config.vision_heads == 3 and ours.config.activation == "quick_gelu"
    assert not ours.training
    images, tokens = batch()
    assert_features_match(our_features(ours, images, tokens), hf_features(model, images, tokens))
    normalized = our_features(ours, images, tokens, normalize=True)
    with torch.no_grad():
        out = model(input_ids=tokens, pixel_values=images)
    assert_features_match(normalized, (out.image_embeds, out.text_embeds))
    torch.testing.assert_close(ours.logit_scale.exp(), model.logit_scale.exp())


@pytest.mark.parametrize("legacy_eos, act", [(True, "quick_gelu"), (False, "gelu")])
def test_hugging_face_variants(tmp_path, legacy_eos, act):
    """Old configs (eos_token_id=2: read the text at the highest id) and exact GELU."""
    model = hf_model(legacy_eos, act)
    model.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.config.eot_token_id == (VOCAB - 1 if legacy_eos else EOT)
    images, tokens = batch()
    assert_features_match(our_features(ours, images, tokens), hf_features(model, images, tokens))


def test_export_to_hugging_face_and_back(hf_dir, tmp_path):
    _, directory = hf_dir
    ours = load_pretrained(directory)
    export_hf(ours, tmp_path / "export")
    reloaded, info = transformers.CLIPModel.from_pretrained(
        tmp_path / "export", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    images, tokens = batch(seed=1)
    assert_features_match(
        hf_features(reloaded.eval(), images, tokens), our_features(ours, images, tokens)
    )
    again = load_pretrained(tmp_path / "export")
    assert again.config == ours.config
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_sharded_hugging_face_directory(hf_dir, tmp_path):
    model, _ = hf_dir
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    images, tokens = batch()
    assert_features_match(
        our_features(load_pretrained(tmp_path), images, tokens), hf_features(model, images, tokens)
    )


def test_export_refuses_what_hugging_face_lacks(tmp_path):
    with pytest.raises(ValueError, match="ResNet"):
        export_hf(CLIP("tiny", **RESNET), tmp_path)


def openai_from_hf(state):
    """Hugging Face CLIPModel weights under OpenAI's names, converted independently here."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        new = key.replace("vision_model.", "visual.").replace("text_model.", "")
        new = re.sub(r"encoder\.layers\.(\d+)\.", r"transformer.resblocks.\1.", new)
        for a, b in [
            ("embeddings.class_embedding", "class_embedding"),
            ("embeddings.patch_embedding", "conv1"),
            ("embeddings.position_embedding.weight", "positional_embedding"),
            ("embeddings.token_embedding", "token_embedding"),
            ("pre_layrnorm", "ln_pre"),
            ("post_layernorm", "ln_post"),
            ("final_layer_norm", "ln_final"),
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
            ("self_attn.out_proj", "attn.out_proj"),
        ]:
            new = new.replace(a, b)
        if key == "visual_projection.weight":
            new, value = "visual.proj", value.T
        elif key == "text_projection.weight":
            new, value = "text_projection", value.T
        elif ".q_proj." in key:
            parts = [state[key.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
            kind = key.rsplit(".", 1)[1]
            new, value = (
                new.replace(f"self_attn.q_proj.{kind}", f"attn.in_proj_{kind}"),
                torch.cat(parts),
            )
        elif ".k_proj." in key or ".v_proj." in key:
            continue
        out[new] = value.contiguous()
    return out


def test_openai_state_dict_loads_and_exports(hf_dir, tmp_path):
    model, _ = hf_dir
    openai = openai_from_hf(model.state_dict())
    openai["input_resolution"] = torch.tensor(30)  # extras found in OpenAI's files
    ours = load_pretrained(openai, vision_heads=3, text_heads=4, eot_token_id=EOT, sot_token_id=SOT)
    c = ours.config
    assert (c.vision_width, c.vision_layers, c.patch_size, c.image_size) == (48, 2, 6, 30)
    assert (c.text_width, c.text_layers, c.context_length, c.vocab_size, c.embed_dim) == (
        32,
        2,
        16,
        99,
        24,
    )
    images, tokens = batch()
    assert_features_match(our_features(ours, images, tokens), hf_features(model, images, tokens))
    exported = to_openai_state_dict(ours)
    del openai["input_resolution"]
    assert exported.keys() == openai.keys()
    for key, value in openai.items():
        assert torch.equal(exported[key], value), key
    # The same weights as a file, and as open_clip's training checkpoint through torch.load.
    save_file(openai, tmp_path / "open_clip_model.safetensors")
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in openai.items()}},
        tmp_path / "epoch_3.pt",
    )
    for source in (tmp_path, tmp_path / "epoch_3.pt"):
        again = load_pretrained(source, vision_heads=3, text_heads=4, eot_token_id=EOT)
        assert_features_match(
            our_features(again, images, tokens), hf_features(model, images, tokens)
        )


def test_resnet_through_the_openai_layout():
    torch.manual_seed(0)
    model = CLIP("tiny", **RESNET, image_size=64).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics and scales
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(std=0.1)
                module.running_var.uniform_(0.5, 2)
                module.weight.normal_(1, 0.1)
    state = to_openai_state_dict(model)
    assert (
        "visual.attnpool.c_proj.weight" in state and "visual.layer1.0.downsample.0.weight" in state
    )
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    ours = load_pretrained(
        state,
        **{
            k: model.config.to_dict()[k]
            for k in ("vision_heads", "text_heads", "activation", "sot_token_id", "eot_token_id")
        },
    )
    assert replace(ours.config, patch_size=8) == model.config  # a ResNet has no patch size
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours.encode_image(images), model.encode_image(images))


# Models open_clip's layout holds: heads not width / 64, QuickGELU, a ResNet, a logit bias, an MLP
# ratio and a pad id other than open_clip's defaults.
OPEN_CLIP_MODELS = {
    "vit": dict(vision_heads=4, text_heads=4),
    "quick_gelu": dict(activation="quick_gelu"),
    "resnet": RESNET,
    "siglip-like": dict(logit_bias_init=-10.0, mlp_ratio=2.0, pad_token_id=1023),
}


@pytest.mark.parametrize("fields", OPEN_CLIP_MODELS.values(), ids=OPEN_CLIP_MODELS)
def test_open_clip_layout_round_trip(tmp_path, fields):
    torch.manual_seed(0)
    model = CLIP("tiny", **fields).eval()
    export_open_clip(model, tmp_path, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert sorted(p.name for p in tmp_path.iterdir()) == [OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS]
    saved = json.loads((tmp_path / OPEN_CLIP_CONFIG).read_text())
    assert (
        saved["preprocess_cfg"]["mean"] == [0.5] * 3
        and saved["preprocess_cfg"]["std"] == [0.25] * 3
    )
    again = load_pretrained(tmp_path)
    assert replace(again.config, patch_size=8) == model.config  # a ResNet has no patch size
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 1022, (2, 32))
    tokens[:, 9] = model.config.eot_token_id
    expected = our_features(model, images, tokens)
    torch.testing.assert_close(our_features(again, images, tokens), expected, rtol=0, atol=0)


def test_open_clip_layout_refuses_what_open_clip_lacks(tmp_path):
    refusals = {
        "layer_norm_eps 1e-06": dict(layer_norm_eps=1e-6),
        "a ViT's projection bias": dict(proj_bias=True),
        "a ResNet without its attention pool's projection bias": {**RESNET, "proj_bias": False},
        r"sot and eot ids 1, 2 \(open_clip reads the text at its highest id": dict(
            sot_token_id=1, eot_token_id=2
        ),
    }
    for message, fields in refusals.items():
        with pytest.raises(ValueError, match=f"open_clip's layout cannot hold {message}"):
            export_open_clip(CLIP("tiny", **fields), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


OPEN_CLIP = open_clip_files()  # not imported: it needs torchvision
needs_open_clip = pytest.mark.skipif(
    OPEN_CLIP is None, reason=f"needs open_clip_torch's files: {OPEN_CLIP_INSTALL}"
)


def open_clip_source(module: str) -> ast.Module:
    """One of open_clip's modules, parsed (not imported)."""
    return ast.parse((OPEN_CLIP / module).read_text())


def open_clip_class(module: str, name: str) -> ast.ClassDef:
    return next(n for n in open_clip_source(module).body if getattr(n, "name", None) == name)


def open_clip_fields(module: str, dataclass: str) -> set[str]:
    """The fields of one of open_clip's dataclasses."""
    body = open_clip_class(module, dataclass).body
    return {s.target.id for s in body if isinstance(s, ast.AnnAssign)}


def open_clip_arguments(module: str, cls: str) -> set[str]:
    """The parameters of one of open_clip's classes' __init__."""
    init = next(s for s in open_clip_class(module, cls).body if getattr(s, "name", 0) == "__init__")
    return {a.arg for a in init.args.args[1:]}


@needs_open_clip
@pytest.mark.parametrize("name", ["RN50", "ViT-B-32", "ViT-B-16", "ViT-L-14"])
@pytest.mark.parametrize("suffix", ["", "-quickgelu"])
def test_open_clip_config_is_open_clip_s_own(name, suffix):
    """The model_cfg written for a preset is open_clip's model_configs/<name>.json."""
    activation = "quick_gelu" if suffix else "gelu"
    written = open_clip_config(replace(PRESETS[name], activation=activation))["model_cfg"]
    configs = OPEN_CLIP / "model_configs"
    assert written == json.loads((configs / f"{name}{suffix}.json").read_text())


@needs_open_clip
@pytest.mark.parametrize("fields", OPEN_CLIP_MODELS.values(), ids=OPEN_CLIP_MODELS)
def test_open_clip_reads_every_key_written(fields):
    """File names as open_clip's constants spell them; every key a field open_clip's factory
    passes on (CLIP's arguments, CLIPVisionCfg, CLIPTextCfg, PreprocessCfg)."""
    constants = {
        node.targets[0].id: node.value.value
        for node in open_clip_source("constants.py").body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
    }
    assert (constants["HF_CONFIG_NAME"], constants["HF_SAFE_WEIGHTS_NAME"]) == (
        OPEN_CLIP_CONFIG,
        OPEN_CLIP_WEIGHTS,
    )
    config = open_clip_config(CLIP("tiny", **fields).config)
    assert set(config) == {"model_cfg", "preprocess_cfg"}
    model_cfg = config["model_cfg"]
    towers = {"vision_cfg": "CLIPVisionCfg", "text_cfg": "CLIPTextCfg"}
    assert set(model_cfg) <= open_clip_arguments("model.py", "CLIP")
    for tower, cls in towers.items():
        assert set(model_cfg[tower]) <= open_clip_fields("model.py", cls), tower
    assert set(config["preprocess_cfg"]) <= open_clip_fields("transform.py", "PreprocessCfg")


@pytest.mark.parametrize("preset", [dict(), RESNET, dict(logit_bias_init=-10.0)])
def test_save_and_load_round_trip(tmp_path, preset):
    torch.manual_seed(0)
    model = CLIP("tiny", **preset)
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["fastclip"]["embed_dim"] == 64
    again = load_pretrained(tmp_path)
    assert again.config == model.config
    assert again.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


@pytest.mark.parametrize("preset", [dict(), RESNET, dict(logit_bias_init=-10.0, proj_bias=True)])
def test_fastclip_weights_without_their_config(tmp_path, preset):
    """A state dict, or a model.safetensors alone: the config comes from the weights' shapes,
    the heads and activation from the overrides (assumed, with a warning, if not given)."""
    torch.manual_seed(0)
    model = CLIP("tiny", **preset).eval()
    save_pretrained(model, tmp_path / "checkpoint")
    bare = tmp_path / "model.safetensors"
    bare.write_bytes((tmp_path / "checkpoint" / "model.safetensors").read_bytes())
    unseen = {k: getattr(model.config, k) for k in ("vision_heads", "text_heads", "activation")}
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 1022, (2, 32))
    tokens[:, 9] = model.config.eot_token_id
    expected = model.encode_image(images), model.encode_text(tokens)
    for source in (model.state_dict(), bare):
        again = load_pretrained(source, **unseen)
        assert replace(again.config, patch_size=8) == replace(model.config, patch_size=8)
        torch.testing.assert_close(
            (again.encode_image(images), again.encode_text(tokens)), expected
        )
    with pytest.warns(UserWarning, match="vision_heads, text_heads, activation assumed"):
        guessed = load_pretrained(bare)
    assert guessed.config.text_heads == 1  # width 64 / 64: the tiny preset's 2 do not show


def test_files_get_the_mode_the_umask_gives(tmp_path):
    """Checkpoint files are as readable as any new file (0666 less the umask), not 0600."""
    umask = os.umask(0o022)
    try:
        save_pretrained(CLIP("tiny"), tmp_path, Tokenizer.train(["a red circle"] * 4, 600))
    finally:
        os.umask(umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(modes)


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = CLIP("tiny")
    save_pretrained(model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(fastclip.files, "save_file", crash)
    with torch.no_grad():
        model.logit_scale.add_(1)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_bad_checkpoints(tmp_path):
    model = CLIP("tiny")
    good = tmp_path / "good"
    save_pretrained(model, good)
    state = load_file(good / "model.safetensors")

    def saved(name, tensors, config=True):
        directory = tmp_path / name
        directory.mkdir()
        save_file(tensors, directory / "model.safetensors")
        if config:
            (directory / "config.json").write_text((good / "config.json").read_text())
        return directory

    missing = {k: v for k, v in state.items() if k != "text.ln_final.weight"}
    with pytest.raises(ValueError, match=r"missing \(1\): text\.ln_final\.weight"):
        load_pretrained(saved("missing", missing))
    with pytest.raises(ValueError, match=r"unexpected \(1\): extra\.weight"):
        load_pretrained(saved("unexpected", {**state, "extra.weight": torch.zeros(1)}))
    wrong = {**state, "text_proj.weight": torch.zeros(64, 65)}
    with pytest.raises(ValueError, match=r"text_proj\.weight: file \(64, 65\), model \(64, 64\)"):
        load_pretrained(saved("shape", wrong))
    text = tmp_path / "notes.txt"
    text.write_text("hello, not weights\n")
    with pytest.raises(ValueError, match=r"notes.txt is not a weights file.*b'hello, n'"):
        load_pretrained(text)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((good / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.safetensors is not a readable safetensors"):
        load_pretrained(truncated)
    with pytest.raises(ValueError, match="unrecognized checkpoint layout"):
        load_pretrained({"foo.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="holds none of"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"source '.*absent.bin': no such file: /"):
        load_pretrained(tmp_path / "absent.bin")
    (good / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_pretrained(good)


def test_tokenizer_and_model_from_one_directory(tmp_path):
    """A tokenizer trained here, saved beside a Hugging Face model: ids and features agree
    between transformers (CLIPTokenizer + CLIPModel) and fastclip (Tokenizer + CLIP)."""
    captions = [
        f"a {c} {s} {r} a {d} {t}"
        for c in ("red", "blue", "green")
        for d in ("pink", "tan")
        for s in ("circle", "square")
        for t in ("star", "cube")
        for r in ("above", "left of")
    ]
    tok = Tokenizer.train(captions * 4, vocab_size=560, pad="eot", context_length=CONTEXT)
    torch.manual_seed(0)
    fields = tok.model_fields()
    text = dict(
        vocab_size=fields["vocab_size"],
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=tok.sot_id,
        eos_token_id=tok.eot_id,
        pad_token_id=tok.pad_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=30,
        patch_size=10,
    )
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    hf = transformers.CLIPModel(config).eval()
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    texts = ["A red circle above a tan cube!", "green  square &amp; pink star", "x" * 40]
    hf_ids = transformers.CLIPTokenizer.from_pretrained(tmp_path)(
        texts, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt"
    )["input_ids"]
    ours, ours_tok = load_pretrained(tmp_path), Tokenizer.from_pretrained(tmp_path)
    assert ours.config.eot_token_id == tok.eot_id and ours_tok.pad_id == tok.eot_id
    ids = ours_tok(texts)
    assert torch.equal(ids[[0, 2]], hf_ids[[0, 2]])  # HF does not unescape "&amp;"
    with torch.no_grad():
        expected = hf.get_text_features(input_ids=ids)
        expected = getattr(expected, "pooler_output", expected)
        torch.testing.assert_close(ours.encode_text(ids, normalize=False), expected)
    save_pretrained(ours, tmp_path / "ours", ours_tok)
    again = Tokenizer.from_pretrained(tmp_path / "ours")
    assert (
        torch.equal(again(texts), ids) and load_pretrained(tmp_path / "ours").config == ours.config
    )


class Payload:
    """A pickled object that is not a tensor: torch.load(weights_only=True) must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_pickles_are_never_executed(tmp_path, capsys):
    torch.save({"state_dict": {"x": Payload()}}, tmp_path / "evil.bin")
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_pretrained(tmp_path / "evil.bin")
    assert "unpickled code ran" not in capsys.readouterr().out
