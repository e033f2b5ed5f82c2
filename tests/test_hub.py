"""Hub repository names: models and tokenizers load by name from a Hugging Face cache built on
disk, offline, in fastclip's, Hugging Face's and open_clip's layouts, at pinned revisions."""

import contextlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest
import torch
from helpers import require
from safetensors.torch import load_file

require("tokenizers", "huggingface_hub")
from hub_helpers import TEXT_HEADS, VISION_HEADS, cache_repo, tiny, use_cache, write_open_clip

from fastclip import CLIP, Tokenizer, create_model, export_hf, load_pretrained, save_pretrained
from fastclip.cli import eval_command
from fastclip.files import write_json, write_weights
from fastclip.finetune import load_checkpoint
from fastclip.hub import looks_like_path, repo_id


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    captions = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square")]
    return Tokenizer.train(captions * 10, vocab_size=600, context_length=16)


WRITERS = {
    "fastclip": lambda model, d, tok: save_pretrained(model, d, tok),
    "hugging_face": lambda model, d, tok: export_hf(model, d, tok),
    "open_clip": lambda model, d, tok: write_open_clip(model, d, tok),
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
    write_open_clip(model, tmp_path / "export")
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
    offline = "cannot load test-org/absent: HF_HUB_OFFLINE is set, and the Hugging Face cache"
    with pytest.raises(FileNotFoundError) as error:
        load_pretrained("test-org/absent")
    assert str(error.value) == (
        f"{offline} ({cache}) does not hold it (looked for open_clip_config.json or "
        "config.json); download it once online"
    )
    looked_for = re.escape(f"{offline} ({cache}) does not hold it (looked for tokenizer.json or ")
    with pytest.raises(FileNotFoundError, match=looked_for + "vocab.json"):
        Tokenizer.from_pretrained("test-org/absent")
    with pytest.raises(ValueError, match="hf-hub:org/name"):
        load_pretrained("hf-hub:no-slash")
    with pytest.raises(ValueError, match="revision applies to Hub repositories"):
        load_pretrained(tmp_path, revision="main")
    # Offline, the cache is all there is to know: it, not the repository, lacks the weights.
    config = json.dumps({"architectures": ["CLIPModel"]}).encode()
    cache_repo(cache, "test-org/no-weights", {"config.json": config})
    with pytest.raises(FileNotFoundError, match=r"cache \(.*\) holds config.json but none of"):
        load_pretrained("test-org/no-weights")
    bad = {"model_cfg": {"vision_cfg": {"timm_model_name": "convnext"}}}
    cache_repo(cache, "test-org/timm-tower", {"open_clip_config.json": json.dumps(bad).encode(),
                                              "open_clip_model.safetensors": b""})  # fmt: skip
    with pytest.raises(ValueError, match=r"does not support model_cfg.vision_cfg.*timm_model_name"):
        load_pretrained("hf-hub:test-org/timm-tower")


# (name, the repository it names or None for a local path), run where runs/ is a directory.
NAMES = [
    ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32"),
    ("timm/vit_base_patch32_clip_224.laion2b_e16", "timm/vit_base_patch32_clip_224.laion2b_e16"),
    ("hf-hub:runs/shape", "runs/shape"),  # the way to the Hub's runs/shape
    ("runs/shape", None),  # runs/ exists here
    ("./shape", None),
    ("../shape", None),
    ("./org/name", None),
    ("~/shape", None),
    ("/shape", None),
    ("runs/shape/step-000100", None),  # two separators
    ("org/model.safetensors", None),  # a weights file
    ("org/-name", None),  # not a Hub id: a part starts with "-"
    ("org--x/name", None),
    ("laion2b_s34b_b79k", None),  # a word: a tag, not a path
]


@pytest.mark.parametrize("name, repo", NAMES, ids=[name for name, _ in NAMES])
def test_which_names_are_paths(tmp_path, monkeypatch, name, repo):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert repo_id(name) == repo
    assert looks_like_path(name) == (repo is None and name != "laion2b_s34b_b79k")


def test_paths_that_do_not_exist_never_reach_the_hub(tmp_path, monkeypatch):
    """A path is never sent to the Hub: offline, the Hub's error would name HF_HUB_OFFLINE."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    hint = "(a path, as runs/ exists here; hf-hub:runs/shape names the Hub's)"
    calls = [
        (lambda: load_pretrained("runs/shape"), f"source 'runs/shape': no such directory: "
         f"{tmp_path}/runs/shape {hint}"),
        (lambda: Tokenizer.from_pretrained("./shape"), f"directory './shape': no such directory: "
         f"{tmp_path}/shape"),
        (lambda: load_pretrained("~/shape"), f"source '~/shape': no such directory: "
         f"{tmp_path}/home/shape"),
        (lambda: load_pretrained("org/model.safetensors"), "source 'org/model.safetensors': no "
         f"such file: {tmp_path}/org/model.safetensors"),
        (lambda: create_model("tiny", pretrained="runs/shape"), "pretrained 'runs/shape': no "
         f"such directory: {tmp_path}/runs/shape {hint}"),
        (lambda: load_checkpoint("../shape"), f"path '../shape': no such directory: "
         f"{tmp_path.parent}/shape"),
    ]  # fmt: skip
    for call, message in calls:
        with pytest.raises(FileNotFoundError) as error:
            call()
        assert str(error.value) == message


NAMES_BY_NAME = """
import json, time
from fastclip import Tokenizer, load_pretrained
results = {}
for name, call in [
    ("model", lambda: load_pretrained("test-org/absent")),
    ("tokenizer", lambda: Tokenizer.from_pretrained("test-org/absent")),
    ("cached", lambda: load_pretrained("test-org/cached").config.vision_heads),
]:
    start = time.perf_counter()
    try:
        outcome = call()
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    results[name] = (time.perf_counter() - start, outcome)
print(json.dumps(results))
"""


class Hub(http.server.BaseHTTPRequestHandler):
    """A Hub on this machine answering every request with one status (and error code)."""

    status, error_code = 503, None

    def do_HEAD(self):  # noqa: N802 (the handler's name)
        self.send_response(self.status)
        if self.error_code:
            self.send_header("X-Error-Code", self.error_code)
        self.end_headers()

    def log_message(self, *args):
        pass


class EmptyHub(Hub):
    status, error_code = 404, "EntryNotFound"  # the repository holds none of the files


@contextlib.contextmanager
def hub_endpoint(kind: str):
    """An endpoint on this machine: a closed port, a port that never answers (the connection is
    queued, never accepted), or a server answering 503 ("busy") or 404 ("empty")."""
    if kind in ("busy", "empty"):
        server = http.server.HTTPServer(("127.0.0.1", 0), EmptyHub if kind == "empty" else Hub)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
        return
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        if kind == "closed":
            listener.close()
        else:
            listener.listen(8)
        yield f"http://127.0.0.1:{port}"


def load_by_name(tmp_path, tokenizer, kind: str) -> tuple[dict, str, str]:
    """What a fresh process gets for names, with HF_ENDPOINT at ``hub_endpoint(kind)`` and not
    HF_HUB_OFFLINE: ({call: (seconds, outcome)}, the endpoint, the cache) for an absent repository
    and for one the cache holds."""
    save_pretrained(tiny(tokenizer), tmp_path / "export", tokenizer)
    cache = tmp_path / "hf" / "hub"
    cache_repo(cache, "test-org/cached", tmp_path / "export")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.pop("TRANSFORMERS_OFFLINE", None)
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="1")
    with hub_endpoint(kind) as endpoint:
        env["HF_ENDPOINT"] = endpoint
        run = subprocess.run([sys.executable, "-c", NAMES_BY_NAME], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Retrying" not in run.stderr, run.stderr
    return json.loads(run.stdout), endpoint, str(cache)


# Seconds a name may take without a Hub: HF_HUB_ETAG_TIMEOUT (1 here), plus the 3 s at most that
# huggingface_hub's first request in a process spends fetching its agent registry, plus slack.
# huggingface_hub alone retries for about a minute.
BOUND = 8
REASONS = {
    "closed": r"is unreachable \(ConnectError: .*refused.*\)",
    "silent": r"is unreachable \(\w*Timeout\w*: .*\)",
    "busy": "answered HTTP 503",
}
LOOKED_FOR = {
    "model": ["open_clip_config.json", "config.json"],
    "tokenizer": ["tokenizer.json", "vocab.json"],
}


@pytest.mark.parametrize("kind", list(REASONS))
def test_an_unreachable_hub_fails_in_seconds(tmp_path, tokenizer, kind):
    """Without HF_HUB_OFFLINE and without a Hub, a name fails within seconds (one request, no
    retries, HF_HUB_ETAG_TIMEOUT bounding it) saying so, and the cache still serves."""
    results, endpoint, cache = load_by_name(tmp_path, tokenizer, kind)
    for call, files in LOOKED_FOR.items():
        seconds, message = results[call]
        assert seconds < BOUND, (call, seconds)
        pattern = (
            re.escape(f"FileNotFoundError: cannot load test-org/absent: the Hugging Face Hub "
                      f"({endpoint}) ") + REASONS[kind] + re.escape(
                f", and the Hugging Face cache ({cache}) does not hold it (looked for "
                f"{' or '.join(files)})")
        )  # fmt: skip
        assert re.fullmatch(pattern, message), message
    seconds, heads = results["cached"]
    assert heads == VISION_HEADS and seconds < BOUND, results["cached"]


def test_a_hub_that_answers_has_the_last_word(tmp_path, tokenizer):
    """A reachable Hub lacking the files: the message says the repository lacks them, even where
    the cache holds an older copy (the Hub, not the cache, says what the main branch holds)."""
    results, _, _ = load_by_name(tmp_path, tokenizer, "empty")
    for call, files in LOOKED_FOR.items():
        assert results[call][1] == f"FileNotFoundError: test-org/absent holds none of {files}"
    assert results["cached"][1] == (
        f"FileNotFoundError: test-org/cached holds none of {LOOKED_FOR['model']}"
    )


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
