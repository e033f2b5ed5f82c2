"""CLIP's byte-level BPE tokenizer, giving open_clip's ``SimpleTokenizer`` ids, without downloads.

The pipeline is open_clip's (``clean="lower"``, OpenAI CLIP's): fix the text with
``ftfy.fix_text``, unescape html twice, collapse whitespace runs to one space, strip, lowercase
with ``str.lower``, split into words by CLIP's regex, map each word's UTF-8 bytes to printable
characters, then BPE with ``</w>`` ending each word (on the Rust ``tokenizers`` library). A row
of ``tok(texts)`` is ``[sot, tokens..., eot, pad, ...]``; text too long keeps sot, the first
``context_length - 2`` tokens and eot, as open_clip does.

Special tokens inside a text follow open_clip too. The vocabulary's own spellings
(``<|startoftext|>``, ``<|endoftext|>``) are plain text there: ``<|``, ``endoftext``, ``|>``.
open_clip's names for them, ``<start_of_text>`` and ``<end_of_text>`` (in any case, after
cleaning), become the sot and eot ids wherever they stand, so ``"a <end_of_text> b"`` holds an
eot mid-row.

Pad ids: open_clip pads with 0 (the token ``!``), and so does this tokenizer unless told
otherwise: :meth:`Tokenizer.train` and :meth:`Tokenizer.from_pretrained` take ``pad="openai"``
(0) or ``pad="eot"``, and ``from_pretrained`` otherwise follows a checkpoint that names a
``pad_token`` (Hugging Face's usually name ``<|endoftext|>``, so a padded row may hold several
eot ids). Under both conventions the first eot ends the text:
``(ids == tok.eot_id).int().argmax(-1)``.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import EllipsisType

import ftfy
import regex
import torch
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from fastclip.checks import check_int
from fastclip.files import atomic_write, read_json, write_json, write_text
from fastclip.hub import Layout, resolve

SOT, EOT, SUFFIX = "<|startoftext|>", "<|endoftext|>", "</w>"  # the vocabulary's spellings
TEXT_SOT, TEXT_EOT = "<start_of_text>", "<end_of_text>"  # open_clip's: typed, they are sot, eot
DEFAULT_CONTEXT_LENGTH = 77  # CLIP's text context, sot and eot included
MIN_VOCAB_SIZE = 2 * 256 + 2  # the byte bases, with </w>, + sot, eot
PADS = ("openai", "eot")  # pad with id 0 (open_clip, OpenAI) or with eot (Hugging Face's usual)
# open_clip's word split, flags included: IGNORECASE also lets "ſ" (long s) match "s", so "it'ſ"
# splits as "it", "'ſ" and "<ſtart_of_text>" is one word.
_WORDS = regex.compile(
    rf"{TEXT_SOT}|{TEXT_EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
    regex.IGNORECASE,
)
# Hugging Face's CLIP pre-tokenizer, for the tokenizer.json written by save_pretrained.
_HF_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")  # special_tokens_map.json wins
# What from_pretrained fetches of a Hugging Face Hub repository.
HUB_LAYOUTS = (
    Layout("tokenizer.json", also=_CONFIGS),
    Layout("vocab.json", ("merges.txt",), _CONFIGS),
)


def _byte_chars() -> list[str]:
    """The 256 printable characters standing for bytes 0..255, in OpenAI's vocab order: bytes that
    print as themselves first, then the others shifted past U+0100. ``[0]`` is ``!``."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    kept += range(ord("®"), ord("ÿ") + 1)
    shifted = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(shifted))]


def clean(text: str) -> str:
    """open_clip's text cleaning: ``ftfy.fix_text`` (mojibake, curly quotes, fullwidth letters,
    ligatures, control characters, NFC), html unescaped twice, whitespace runs collapsed to one
    space, stripped, then ``str.lower`` (Greek final sigma included)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def words(text: str) -> list[str]:
    """The words of ``text`` after :func:`clean`, as open_clip splits them; each is BPE'd alone."""
    return _WORDS.findall(clean(text))


def _backend(model: BPE) -> _Backend:
    """A backend running BPE on words joined by single spaces (``words``' output)."""
    tok = _Backend(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(" ", behavior="removed"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _hf_backend(model: BPE, sot: int, eot: int) -> _Backend:
    """Hugging Face's CLIP pipeline around ``model``, as ``transformers.CLIPTokenizer`` builds it:
    NFC, whitespace and lowercase normalizers (no ftfy), the specials matched in any text."""
    tok = _Backend(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_HF_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (SOT, EOT)])
    tok.post_processor = processors.RobertaProcessing(  # [sot, ..., eot]
        (EOT, eot), (SOT, sot), trim_offsets=False, add_prefix_space=False
    )
    return tok


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    merges = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or (n == 1 and "#version" in line):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{path} line {n}: a merge is two tokens, got {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


def _check_pad(pad: str | None) -> None:
    if pad is not None and pad not in PADS:
        raise ValueError(f"pad must be one of {PADS}, got {pad!r}")


class Tokenizer:
    """CLIP's tokenizer: ``tok(texts)`` gives (B, context_length) int64 ids, open_clip's
    ``SimpleTokenizer`` ids for OpenAI's vocabulary.

    ``vocab`` maps tokens to ids and must hold ``<|startoftext|>`` and ``<|endoftext|>``;
    ``merges`` are BPE merges in rank order; ``pad_id`` fills rows after eot (0, open_clip's, by
    default). Build one with :meth:`from_pretrained` or :meth:`train`.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        pad_id: int = 0,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
    ) -> None:
        if not isinstance(vocab, dict) or not all(
            isinstance(t, str) and isinstance(i, int) for t, i in vocab.items()
        ):
            raise TypeError("vocab must be a dict mapping str tokens to int ids")
        missing = [t for t in (SOT, EOT) if t not in vocab]
        if missing:
            raise ValueError(f"vocab lacks the special tokens {missing}")
        if check_int("pad_id", pad_id, 0) not in vocab.values():
            raise ValueError(f"pad_id {pad_id} is not an id of vocab")
        self._vocab, self._merges = dict(vocab), [tuple(m) for m in merges]
        try:
            self._tok = _backend(self._bpe())
        except Exception as e:  # tokenizers raises a bare Exception for merges outside vocab
            raise ValueError(f"merges do not fit vocab: {e}") from e
        self._sot, self._eot, self._pad = vocab[SOT], vocab[EOT], pad_id
        self._specials = {TEXT_SOT: self._sot, TEXT_EOT: self._eot}
        self._context_length = check_int("context_length", context_length, 2)  # sot + eot

    def _bpe(self) -> BPE:
        return BPE(self._vocab, self._merges, unk_token=EOT, end_of_word_suffix=SUFFIX)

    @property
    def sot_id(self) -> int:
        return self._sot

    @property
    def eot_id(self) -> int:
        return self._eot

    @property
    def pad_id(self) -> int:
        """The id filling a row after its eot."""
        return self._pad

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def context_length(self) -> int:
        """The row length ``tok(texts)`` gives by default."""
        return self._context_length

    def model_fields(self) -> dict[str, int]:
        """The CLIPConfig fields a text tower needs to read this tokenizer's rows:
        ``CLIP("tiny", **tok.model_fields())``."""
        return dict(
            vocab_size=self.vocab_size,
            context_length=self.context_length,
            sot_token_id=self.sot_id,
            eot_token_id=self.eot_id,
            pad_token_id=self.pad_id,
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length}, "
            f"pad_id={self.pad_id})"
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, revision: str | None = None, pad: str | None = None
    ) -> Tokenizer:
        """Load ``tokenizer.json``, else ``vocab.json`` + ``merges.txt``, from ``directory``: a
        local directory or a Hugging Face Hub repository (``org/name`` or ``hf-hub:org/name``, at
        ``revision``; ``fastclip.hub``). Only the BPE model is read from ``tokenizer.json``: the
        text is always cleaned and split as open_clip does.

        ``pad`` is ``"openai"`` (pad id 0, open_clip's) or ``"eot"``. Left ``None``, the
        checkpoint chooses where it says so: the ``pad_token`` of ``tokenizer_config.json`` or
        ``special_tokens_map.json`` (which wins, as in transformers), else 0.
        ``model_max_length`` there sets the context length, else 77.
        """
        _check_pad(pad)
        root = resolve(directory, HUB_LAYOUTS, revision, argument="directory")
        if not root.is_dir():
            raise FileNotFoundError(f"directory {root} does not exist")
        source = root / "tokenizer.json"
        if source.is_file():
            model = read_json(source).get("model")
            if not isinstance(model, dict) or model.get("type") != "BPE":
                raise ValueError(f"{source} does not hold a BPE model")
            if model.get("end_of_word_suffix") != SUFFIX:
                raise ValueError(f"{source} is not CLIP's BPE: words do not end in {SUFFIX}")
            vocab = model.get("vocab")
            if not isinstance(vocab, dict):
                raise ValueError(f"{source} holds no vocab")
            merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
        elif (root / "vocab.json").is_file() and (root / "merges.txt").is_file():
            source = root / "vocab.json"
            vocab, merges = read_json(source), _read_merges(root / "merges.txt")
        else:
            raise FileNotFoundError(
                f"{root} holds neither tokenizer.json nor vocab.json+merges.txt"
            )
        config = {}
        for name in _CONFIGS:
            if (root / name).is_file():
                config.update(read_json(root / name))
        named, length = config.get("pad_token"), config.get("model_max_length")
        named = named.get("content") if isinstance(named, dict) else named
        if named is not None and (not isinstance(named, str) or named not in vocab):
            raise ValueError(f"pad_token {named!r} of {root} is not in the vocabulary")
        if not isinstance(length, int) or length > 1_000_000:  # transformers writes 1e30: no limit
            length = DEFAULT_CONTEXT_LENGTH
        if pad is None:
            pad_id = 0 if named is None else vocab[named]
        else:
            pad_id = 0 if pad == "openai" else vocab.get(EOT, 0)  # no EOT: the constructor says so
        try:
            return cls(vocab, merges, pad_id=pad_id, context_length=length)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source} is not a valid CLIP tokenizer: {e}") from e

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 49408,
        *,
        min_frequency: int = 2,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        pad: str = "openai",
    ) -> Tokenizer:
        """Learn at most ``vocab_size`` ids of CLIP-style BPE from captions, laid out like OpenAI's
        vocab: the 256 byte characters, the same ending in ``</w>``, merges, sot, eot. Any text
        encodes. ``pad`` is ``"openai"`` (pad id 0, open_clip's) or ``"eot"``."""
        check_int("vocab_size", vocab_size, MIN_VOCAB_SIZE)
        check_int("min_frequency", min_frequency, 0)
        _check_pad(pad)
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of str, not one str")

        def split():  # the words encoding BPEs, joined by spaces; no sot or eot spellings
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
                yield " ".join(w for w in words(text) if w not in (TEXT_SOT, TEXT_EOT))

        backend = _backend(BPE(end_of_word_suffix=SUFFIX))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 2,  # the trainer's alphabet holds at most the 512 bases
            min_frequency=min_frequency,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            end_of_word_suffix=SUFFIX,
        )
        backend.train_from_iterator(split(), trainer)
        tokens = _byte_chars()
        tokens += [t + SUFFIX for t in tokens]
        known, merges = set(tokens), []
        for a, b in json.loads(backend.to_str())["model"]["merges"]:
            if len(tokens) == vocab_size - 2:
                break
            merges.append((a, b))
            if a + b not in known:
                known.add(a + b)
                tokens.append(a + b)
        vocab = {t: i for i, t in enumerate([*tokens, SOT, EOT])}
        pad_id = 0 if pad == "openai" else vocab[EOT]
        return cls(vocab, merges, pad_id=pad_id, context_length=context_length)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``tokenizer.json``, ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json``
        (each atomically), loadable by :meth:`from_pretrained` and
        ``transformers.CLIPTokenizer.from_pretrained``. ``tokenizer.json`` holds Hugging Face's
        CLIP pipeline, which cleans text without ftfy; :meth:`from_pretrained` reads its model."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        atomic_write(root / "tokenizer.json", _hf_backend(self._bpe(), self._sot, self._eot).save)
        write_text(root / "vocab.json", json.dumps(self._vocab, ensure_ascii=False))
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in self._merges)]
        write_text(root / "merges.txt", "\n".join(lines) + "\n")
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "bos_token": SOT,
            "eos_token": EOT,
            "unk_token": EOT,
            "pad_token": self._tok.id_to_token(self._pad),
            "model_max_length": self._context_length,
        }
        write_json(root / "tokenizer_config.json", config)

    def _pieces(self, text: str) -> list[str | int]:
        """``text``'s words joined by spaces, cut around open_clip's sot and eot spellings, which
        stand as their ids."""
        pieces, run = [], []
        for word in words(text):
            if word in self._specials:
                pieces += [" ".join(run), self._specials[word]]
                run = []
            else:
                run.append(word)
        return [*pieces, " ".join(run)]

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """The content ids of each text, sot and eot typed inside it included."""
        pieces = [self._pieces(text) for text in texts]
        runs = [p for row in pieces for p in row if isinstance(p, str)]
        bpe = iter(e.ids for e in self._tok.encode_batch(runs, add_special_tokens=False))
        return [
            [i for p in row for i in ([p] if isinstance(p, int) else next(bpe))] for row in pieces
        ]

    def encode(self, text: str) -> list[int]:
        """Content ids of one text, without the sot, eot and padding that rows add (an
        ``<end_of_text>`` typed in the text is an eot here, as in open_clip)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._encode_batch([text])[0]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one row of ids: stops at the first eot (padding follows), drops sot and eot,
        turns ``</w>`` into spaces and strips."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab_size)]
        if bad:
            raise ValueError(f"ids must be ints in [0, {self.vocab_size}), got {bad[0]!r}")
        ids = ids[: ids.index(self._eot)] if self._eot in ids else ids
        text = self._tok.decode([i for i in ids if i != self._sot], skip_special_tokens=False)
        return text.replace(SUFFIX, " ").strip()

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None | EllipsisType = ...
    ) -> torch.Tensor:
        """Tokenize ``texts`` into (B, context_length) int64 ids ``[sot, tokens, eot, pad...]``,
        open_clip's ``SimpleTokenizer`` rows when the vocabulary is OpenAI's and ``pad_id`` 0.

        ``context_length`` (``...`` for ``self.context_length``) is the row length: longer texts
        keep their first ``context_length - 2`` tokens. ``None`` truncates nothing and pads to the
        batch's longest row. A single str gives B = 1.
        """
        if context_length is ...:
            context_length = self._context_length
        elif context_length is not None:
            context_length = check_int("context_length", context_length, 2)
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        content = self._encode_batch(texts)
        n = context_length or max(map(len, content), default=0) + 2
        rows = [[self._sot, *ids[: n - 2], self._eot] for ids in content]
        rows = [row + [self._pad] * (n - len(row)) for row in rows]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), n)  # (B, n)
