"""CLIP's byte-level BPE tokenizer on the Rust ``tokenizers`` library, without downloads.

The pipeline is OpenAI CLIP's, as ``transformers.CLIPTokenizer`` builds it: clean the text (html
unescaped twice, whitespace collapsed, stripped), NFC + lowercase, split by CLIP's regex, map bytes
to printable characters, then BPE with ``</w>`` ending each word. A row of ``tok(texts)`` is
``[sot, tokens..., eot, pad, ...]``; text too long keeps sot, the first ``context_length - 2``
tokens and eot, as OpenAI's ``truncate=True`` and Hugging Face's truncation both do.

Pad ids differ by checkpoint. OpenAI pads with id 0 (the token ``!``): it is the default, used
when a directory has no ``tokenizer_config.json``/``special_tokens_map.json``. Hugging Face pads
with its ``pad_token``, usually ``<|endoftext|>``, so a padded row may hold several eot ids. Under
both conventions the first eot ends the text: ``(ids == tok.eot_id).int().argmax(-1)``.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import EllipsisType

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

SOT, EOT, SUFFIX = "<|startoftext|>", "<|endoftext|>", "</w>"
DEFAULT_CONTEXT_LENGTH = 77  # CLIP's text context, sot and eot included
MIN_VOCAB_SIZE = 2 * 256 + 2  # the byte bases, with </w>, + sot, eot
_SPLIT = (  # CLIP's pre-tokenizer: the specials, contractions, letter runs, single digits, symbols
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_WHITESPACE = re.compile(r"\s+")
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
    """OpenAI CLIP's text cleaning, without ftfy: html unescaped twice, whitespace collapsed."""
    return _WHITESPACE.sub(" ", html.unescape(html.unescape(text))).strip()


def _pipeline(model: BPE) -> _Backend:
    """A backend running CLIP's normalizer, pre-tokenizer and decoder around ``model``."""
    tok = _Backend(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
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


class Tokenizer:
    """CLIP's tokenizer: ``tok(texts)`` gives (B, context_length) int64 ids.

    ``vocab`` maps tokens to ids and must hold ``<|startoftext|>`` and ``<|endoftext|>``;
    ``merges`` are BPE merges in rank order; ``pad_id`` fills rows after eot. Build one with
    :meth:`from_pretrained` or :meth:`train`.
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
            model = BPE(self._vocab, self._merges, unk_token=EOT, end_of_word_suffix=SUFFIX)
        except Exception as e:  # tokenizers raises a bare Exception for merges outside vocab
            raise ValueError(f"merges do not fit vocab: {e}") from e
        self._tok = _pipeline(model)
        specials = [AddedToken(t, special=True, normalized=False) for t in (SOT, EOT)]
        self._tok.add_special_tokens(specials)
        self._sot, self._eot, self._pad = vocab[SOT], vocab[EOT], pad_id
        self._tok.post_processor = processors.RobertaProcessing(  # [sot, ..., eot], as HF's
            (EOT, self._eot), (SOT, self._sot), trim_offsets=False, add_prefix_space=False
        )
        self._context_length = check_int("context_length", context_length, 2)  # sot + eot

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
    def from_pretrained(cls, directory: str | Path, *, revision: str | None = None) -> Tokenizer:
        """Load ``tokenizer.json``, else ``vocab.json`` + ``merges.txt``, from ``directory``: a
        local directory or a Hugging Face Hub repository (``org/name`` or ``hf-hub:org/name``, at
        ``revision``; ``fastclip.hub``).

        ``pad_token`` and ``model_max_length`` come from ``tokenizer_config.json`` and
        ``special_tokens_map.json`` (which wins, as in transformers); without them the pad id is
        OpenAI's 0 and the context length 77.
        """
        root = resolve(directory, HUB_LAYOUTS, revision)
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
        pad, length = config.get("pad_token"), config.get("model_max_length")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if pad is not None and (not isinstance(pad, str) or pad not in vocab):
            raise ValueError(f"pad_token {pad!r} of {root} is not in the vocabulary")
        if not isinstance(length, int) or length > 1_000_000:  # transformers writes 1e30: no limit
            length = DEFAULT_CONTEXT_LENGTH
        pad_id = 0 if pad is None else vocab[pad]
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
        encodes. ``pad`` is ``"openai"`` (pad id 0) or ``"eot"`` (Hugging Face's usual)."""
        check_int("vocab_size", vocab_size, MIN_VOCAB_SIZE)
        check_int("min_frequency", min_frequency, 0)
        if pad not in ("openai", "eot"):
            raise ValueError(f"pad must be 'openai' or 'eot', got {pad!r}")
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of str, not one str")

        def cleaned():
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
                yield clean(text)

        backend = _pipeline(BPE(end_of_word_suffix=SUFFIX))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 2,  # the trainer's alphabet holds at most the 512 bases
            min_frequency=min_frequency,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            end_of_word_suffix=SUFFIX,
        )
        backend.train_from_iterator(cleaned(), trainer)
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
        ``transformers.CLIPTokenizer.from_pretrained``."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        atomic_write(root / "tokenizer.json", self._tok.save)
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

    def encode(self, text: str) -> list[int]:
        """Content ids of one text, without sot, eot or padding."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(clean(text), add_special_tokens=False).ids

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
        """Tokenize ``texts`` into (B, context_length) int64 ids ``[sot, tokens, eot, pad...]``.

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
        encodings = self._tok.encode_batch([clean(t) for t in texts], add_special_tokens=False)
        n = context_length or max((len(e.ids) for e in encodings), default=0) + 2
        rows = [[self._sot, *e.ids[: n - 2], self._eot] for e in encodings]
        rows = [row + [self._pad] * (n - len(row)) for row in rows]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), n)  # (B, n)
