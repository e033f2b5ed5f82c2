"""CLIP's tokenizer against open_clip's own tokenizer module on OpenAI's vocabulary, and against
transformers' CLIPTokenizer on BPEs trained here (no downloads)."""

from __future__ import annotations

import html
import json
import random
import shutil

import pytest
import torch
from helpers import require

require("tokenizers", "ftfy", "regex", "hypothesis")
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip_code import CORPUS, load_open_clip_tokenizer, openai_tokenizer

from fastclip.tokenizer import Tokenizer

SOT, EOT = "<|startoftext|>", "<|endoftext|>"

WORDS = (
    "a the photo picture of dog cat bird sitting running on under red blue green big small old "
    "street beach park city car bike man woman child tree house river mountain night sunny day "
    "it's they're we'll i'm you've she'd don't can't café naïve über crème brûlée zoë"
).split()
MARKS = ["", "", ".", ",", "!", "?", ":", "...", " -", " (2)", " #1", " 100%", " $5"]
LONG = " ".join(["a photograph of a very small dog running"] * 20)  # ~160 tokens: truncated
# Texts transformers' CLIPTokenizer cleans as open_clip does. It runs no ftfy (fullwidth letters,
# curly quotes, mojibake...) and makes <|endoftext|> special: those are checked against open_clip.
TEXTS = [
    "A Photo of a DOG.",
    "hello, world! what's up?! :-)",
    "it's THEY'RE we'll I'M you've she'd",
    "in 2024 there were 3.14159 pies and 42 cats",
    "Café naïve ÜBER crème brûlée Zoë",
    "cafe\u0301 decomposed, nfc composes it",
    "🐶 dog 🎉 party 👍🏽 emoji",
    "  extra   spaces\n\nnew lines\tand\ttabs \u00a0nbsp  ",
    "",
    "!!!",
    "half width and 日本語 text",
    LONG,
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    rng = random.Random(0)
    texts = []
    for _ in range(400):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        texts.append(" ".join(words) + rng.choice(MARKS))
    return texts


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory) -> dict:
    """A directory saved by save_pretrained for each pad convention."""
    dirs = {}
    for pad in ("openai", "eot"):
        dirs[pad] = tmp_path_factory.mktemp(pad)
        Tokenizer.train(corpus, 700, min_frequency=1, pad=pad).save_pretrained(dirs[pad])
    return dirs


@pytest.fixture(scope="module")
def tok(saved) -> Tokenizer:
    return Tokenizer.from_pretrained(saved["eot"])


def hf_ids(directory, texts, n: int = 77) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(directory)
    out = hf(texts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
    return out.input_ids


def test_train_lays_out_vocab_like_openai(saved, corpus):
    tok = Tokenizer.train(corpus, 600, min_frequency=1)
    assert (tok.vocab_size, tok.sot_id, tok.eot_id, tok.pad_id) == (600, 598, 599, 0)
    vocab = json.loads((saved["openai"] / "vocab.json").read_text("utf-8"))
    assert [t for t, i in vocab.items() if i in (0, 255, 256)] == ["!", "Ń", "!</w>"]
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert (vocab[SOT], vocab[EOT]) == (len(vocab) - 2, len(vocab) - 1)


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_matches_transformers(tok, saved, text):
    ours, theirs = tok(text), hf_ids(saved["eot"], [text])
    assert ours.shape == (1, 77) and ours.dtype == torch.long
    assert torch.equal(ours, theirs), f"{text!r}:\n{ours.tolist()}\n{theirs.tolist()}"


@pytest.fixture(scope="module")
def open_clip() -> tuple:
    """open_clip's SimpleTokenizer (OpenAI's vocabulary) and fastclip's on the same files."""
    simple = load_open_clip_tokenizer().SimpleTokenizer()
    return simple, openai_tokenizer(simple)


def assert_same_rows(ours: torch.Tensor, theirs: torch.Tensor, texts: list[str]) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.long
    differ = (ours != theirs).any(-1).nonzero().flatten().tolist()
    shown = "\n".join(
        f"  [{i}] {texts[i]!r}:\n    ours   {ours[i].tolist()}\n    theirs {theirs[i].tolist()}"
        for i in differ[:3]
    )
    assert not differ, f"{len(differ)} of {len(texts)} texts differ from open_clip's:\n{shown}"


@pytest.mark.parametrize("category", CORPUS)
def test_matches_open_clip(open_clip, category):
    simple, ours = open_clip
    texts = CORPUS[category]
    assert_same_rows(ours(texts), simple(texts), texts)


@pytest.mark.parametrize("n", [2, 3, 16, 76, 77])
def test_truncates_as_open_clip(open_clip, n):
    """Long rows keep sot, the first n - 2 tokens and eot, typed sot and eot counting as tokens."""
    simple, ours = open_clip
    texts = CORPUS["long"] + CORPUS["special"] + CORPUS["emoji"]
    assert_same_rows(ours(texts, n), simple(texts, context_length=n), texts)


@pytest.mark.parametrize("files", [["tokenizer.json"], ["vocab.json", "merges.txt"]])
def test_hugging_face_files_match_open_clip(open_clip, tmp_path, files):
    """OpenAI's vocabulary as Hugging Face's repositories hold it, pad_token <|endoftext|>:
    pad="openai" gives open_clip's rows; the checkpoint's own pad changes only the padding."""
    simple, ours = open_clip
    ours.save_pretrained(tmp_path / "saved")
    for name in files:
        shutil.copy(tmp_path / "saved" / name, tmp_path / name)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": EOT}))
    texts = [t for category in ("special", "fullwidth", "long") for t in CORPUS[category]]
    theirs = simple(texts)
    assert_same_rows(Tokenizer.from_pretrained(tmp_path, pad="openai")(texts), theirs, texts)
    padded = Tokenizer.from_pretrained(tmp_path)(texts)
    lengths = torch.tensor([[min(len(simple.encode(t)) + 2, 77)] for t in texts])  # (B, 1)
    after = torch.arange(77) >= lengths  # (B, 77): open_clip's padding
    assert_same_rows(padded, torch.where(after, ours.eot_id, theirs), texts)


@settings(deadline=None, derandomize=True, database=None, max_examples=300)
@given(text=st.text(max_size=80))
def test_matches_open_clip_on_any_text(open_clip, text):
    simple, ours = open_clip
    assert_same_rows(ours(text), simple(text), [text])


@pytest.mark.parametrize(
    "text, same_as",
    [
        ("ΟΔΟΣ ΣΟΦΟΣ", "οδος σοφος"),  # str.lower: a final sigma is ς
        ("don’t “quoted”", 'don\'t "quoted"'),  # ftfy straightens quotes
        ("ＡＢＣ １２３", "abc 123"),  # ... narrows fullwidth characters
        ("ﬁsh ﬂower", "fish flower"),  # ... splits ligatures
        ("cafÃ© donâ€™t", "café don't"),  # ... repairs mojibake
        ("a\x00b\x07 \ufeffc\x1b[31m", "ab c"),  # ... drops controls, BOMs, terminal escapes
        ("&amp;amp;amp;amp; &lt;3", "& <3"),  # ftfy unescapes html once, then twice more
        ("  a\u3000\n\tb  ", "a b"),  # whitespace runs collapse, ends stripped
    ],
)
def test_cleans_as_open_clip(tok, text, same_as):
    assert tok.encode(text) == tok.encode(same_as)


def test_special_spellings_as_open_clip(tok):
    """The vocabulary's <|endoftext|> typed in a text is text; open_clip's <end_of_text> (any
    case) is an eot wherever it stands, <start_of_text> a sot."""
    pieces = tok.encode("<|") + tok.encode("endoftext") + tok.encode("|>")
    assert tok.encode("<|endoftext|>") == pieces and tok.eot_id not in pieces
    a, b = tok.encode("a dog"), tok.encode("a cat")
    assert tok.encode("a dog <END_OF_TEXT> a cat") == [*a, tok.eot_id, *b]
    assert tok.encode("<start_of_text>a dog") == [tok.sot_id, *a]
    row = tok("a dog <end_of_text> a cat")[0].tolist()
    assert row[: len(a) + len(b) + 3] == [tok.sot_id, *a, tok.eot_id, *b, tok.eot_id]
    assert tok.decode(tok("a dog <end_of_text> a cat")[0]) == "a dog"


def test_html_is_unescaped_twice_unlike_transformers(tok, saved):
    text = "fish &amp; chips &lt;3 &amp;amp; &quot;yum&quot;"
    assert html.unescape(html.unescape(text)) == 'fish & chips <3 & "yum"'
    assert torch.equal(tok(text), hf_ids(saved["eot"], [html.unescape(html.unescape(text))]))
    assert not torch.equal(tok(text), hf_ids(saved["eot"], [text]))


def test_openai_pad_in_transformers(saved):
    """Saved as pad_token "!", transformers pads with 0 too but also makes "!" a special token:
    "dog!" then ends in id 0, where OpenAI and this tokenizer give the id of "!</w>"."""
    tok = Tokenizer.from_pretrained(saved["openai"])
    texts = [t for t in TEXTS if "!" not in t]
    assert tok.pad_id == 0 and torch.equal(tok(texts), hf_ids(saved["openai"], texts))
    dog, bang = tok.encode("dog"), tok.encode("!")
    assert tok.encode("dog!") == dog + bang and bang != [0]
    theirs = hf_ids(saved["openai"], ["dog!"])[0, : len(dog) + 3].tolist()
    assert theirs == [tok.sot_id, *dog, 0, tok.eot_id]


@pytest.mark.parametrize(
    "files, written, pad, length",
    [
        (["vocab.json", "merges.txt"], {}, "openai", 77),
        (["tokenizer.json"], {}, "openai", 77),
        (["tokenizer.json", "tokenizer_config.json"], {}, "eot", 77),
        (["vocab.json", "merges.txt"], {"tokenizer_config.json": {"pad_token": EOT}}, "eot", 77),
        (
            ["vocab.json", "merges.txt"],
            {  # special_tokens_map.json wins, as in transformers
                "tokenizer_config.json": {"pad_token": "!", "model_max_length": 32},
                "special_tokens_map.json": {"pad_token": {"content": EOT, "special": True}},
            },
            "eot",
            32,
        ),
        (["tokenizer.json"], {"tokenizer_config.json": {"model_max_length": 32}}, "openai", 32),
        (["tokenizer.json"], {"tokenizer_config.json": {"model_max_length": 10**30}}, "openai", 77),
    ],
)
def test_pad_convention_follows_directory(tok, saved, tmp_path, files, written, pad, length):
    for name in files:
        shutil.copy(saved["eot"] / name, tmp_path / name)
    for name, data in written.items():
        (tmp_path / name).write_text(json.dumps(data))
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.pad_id == (0 if pad == "openai" else tok.eot_id)
    assert loaded.context_length == length
    ids, expected = loaded(TEXTS, 77), tok(TEXTS)
    lengths = torch.tensor([[min(len(tok.encode(t)), 75) + 2] for t in TEXTS])
    content = torch.arange(77) < lengths  # (B, 77): sot, tokens, eot
    assert torch.equal(ids[content], expected[content])
    assert (ids[~content] == loaded.pad_id).all()
    if "tokenizer.json" not in files:  # transformers reads our vocab.json + merges.txt alike
        assert torch.equal(hf_ids(tmp_path, TEXTS)[content], expected[content])


@pytest.mark.parametrize("pad", ["openai", "eot"])
def test_pad_chosen_over_directory(tok, saved, pad):
    """open_clip's factory pads with 0 whatever a repository's pad_token: pad="openai"."""
    for directory in saved.values():
        loaded = Tokenizer.from_pretrained(directory, pad=pad)
        assert loaded.pad_id == (0 if pad == "openai" else tok.eot_id)
        assert loaded("a dog")[0, -1] == loaded.pad_id
    with pytest.raises(ValueError, match="pad must be one of"):
        Tokenizer.from_pretrained(saved["eot"], pad="zero")


@pytest.mark.parametrize("pad", ["openai", "eot"])
def test_save_load_round_trip(corpus, tmp_path, pad):
    tok = Tokenizer.train(corpus, 650, min_frequency=2, context_length=40, pad=pad)
    tok.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)
    got = (loaded.vocab_size, loaded.pad_id, loaded.context_length, loaded.eot_id)
    assert got == (tok.vocab_size, tok.pad_id, 40, tok.eot_id)
    assert torch.equal(loaded(TEXTS), tok(TEXTS)) and tok(TEXTS).shape == (len(TEXTS), 40)
    texts = [t for t in TEXTS if "!" not in t]  # transformers makes a "!" pad_token special
    assert torch.equal(tok(texts), hf_ids(tmp_path, texts, 40))


def test_truncation_and_no_context_limit(tok):
    content = tok.encode(LONG)
    assert len(content) > 100
    ids = tok([LONG, "a dog"], 10)
    assert ids[0].tolist() == [tok.sot_id, *content[:8], tok.eot_id]
    full = tok([LONG, "a dog"], context_length=None)
    assert full.shape == (2, len(content) + 2)
    assert full[0].tolist() == [tok.sot_id, *content, tok.eot_id]
    assert torch.equal(full[1], tok("a dog", len(content) + 2)[0])
    assert tok([], None).shape == (0, 2) and tok([]).shape == (0, 77)


@pytest.mark.parametrize("text", ["a photo of a dog", "the old man on the beach", "zebra qxj"])
def test_encode_decode_round_trip(tok, saved, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok(text)[0]) == text
    openai = Tokenizer.from_pretrained(saved["openai"])  # pad id 0 is "!": kept in the text
    assert openai.decode(openai(text + "!!!")[0]) == text + " !!!"


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda t: t(3), TypeError, "texts"),
        (lambda t: t(["a", None]), TypeError, r"texts\[1\]"),
        (lambda t: t("a", 1), ValueError, "context_length"),
        (lambda t: t("a", 7.0), TypeError, "context_length"),
        (lambda t: t.encode(b"a"), TypeError, "text"),
        (lambda t: t.decode([t.vocab_size]), ValueError, "ids"),
        (lambda t: Tokenizer.train(["a b"], 300), ValueError, "vocab_size"),
        (lambda t: Tokenizer.train(["a b"], min_frequency=-1), ValueError, "min_frequency"),
        (lambda t: Tokenizer.train("a b c"), TypeError, "texts"),
        (lambda t: Tokenizer.train(["a", 3]), TypeError, r"texts\[1\]"),
        (lambda t: Tokenizer.train(["a"], pad="zero"), ValueError, "pad"),
        (lambda t: Tokenizer({"a": 0}, []), ValueError, "special tokens"),
        (lambda t: Tokenizer({"a": 0, SOT: 1, EOT: 2}, [("a", "b")]), ValueError, "merges"),
        (lambda t: Tokenizer({SOT: 0, EOT: 1}, [], pad_id=5), ValueError, "pad_id"),
        (lambda t: setattr(t, "pad_id", 3), AttributeError, "pad_id"),
    ],
)
def test_bad_input(tok, call, error, match):
    with pytest.raises(error, match=match):
        call(tok)


@pytest.mark.parametrize(
    "files, error, match",
    [
        ({}, FileNotFoundError, "neither"),
        ({"vocab.json": "{not json", "merges.txt": ""}, ValueError, "vocab.json"),
        ({"vocab.json": "{}", "merges.txt": "a b c\n"}, ValueError, "merges.txt line 1"),
        ({"vocab.json": '{"a": 0}', "merges.txt": ""}, ValueError, "vocab.json"),
        ({"tokenizer.json": '{"model": {"type": "WordPiece"}}'}, ValueError, "tokenizer.json"),
        ({"tokenizer_config.json": '{"pad_token": "<pad>"}'}, ValueError, "pad_token"),
    ],
)
def test_bad_directory(saved, tmp_path, files, error, match):
    if "tokenizer_config.json" in files:
        shutil.copy(saved["eot"] / "tokenizer.json", tmp_path / "tokenizer.json")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(error, match=match):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        Tokenizer.from_pretrained(tmp_path / "missing")
