"""open_clip's own code, found without importing its package, its tokenizer module, and a corpus
of texts by category to compare tokenizers on.

``open_clip/tokenizer.py`` needs only ftfy, regex, numpy and torch, so it is loaded from its file
without running ``open_clip/__init__.py`` (which imports torchvision).
"""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path
from types import ModuleType

import pytest

from fastclip.tokenizer import EOT, SOT, Tokenizer

OPEN_CLIP_INSTALL = "pip install --no-deps open_clip_torch==3.3.0"


def open_clip_files() -> Path | None:
    """The folder of open_clip's package, found without importing it (it imports torchvision);
    None where it is not installed. Under CI, which installs it, its absence is an error."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None and os.environ.get("CI"):
        raise RuntimeError(f"open_clip is not installed; CI installs it with: {OPEN_CLIP_INSTALL}")
    return Path(spec.submodule_search_locations[0]) if spec else None


def load_open_clip_tokenizer() -> ModuleType:
    """``open_clip.tokenizer``, imported alone. Missing, it fails the test under CI (which
    installs it) and skips it elsewhere."""
    folder = open_clip_files()
    if folder is None:
        pytest.skip(f"open_clip is not installed: {OPEN_CLIP_INSTALL}")
    path = folder / "tokenizer.py"
    alone = importlib.util.spec_from_file_location("open_clip_tokenizer_alone", path)
    module = importlib.util.module_from_spec(alone)
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    alone.loader.exec_module(module)
    # The module turns off the Rust tokenizers' threads for the whole process: not for the others.
    if parallelism is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = parallelism
    return module


def openai_tokenizer(simple) -> Tokenizer:
    """fastclip's tokenizer on the vocabulary and merges of open_clip's ``SimpleTokenizer``
    ``simple`` (OpenAI's), its sot and eot spelled as OpenAI's and Hugging Face's vocab.json."""
    spellings = {"<start_of_text>": SOT, "<end_of_text>": EOT}
    vocab = {spellings.get(t, t): i for t, i in simple.encoder.items()}
    return Tokenizer(vocab, sorted(simple.bpe_ranks, key=simple.bpe_ranks.get))


def _random_texts(count: int, seed: int = 0) -> list[str]:
    """Texts of characters drawn from the corpus's own and from anywhere in Unicode (lone
    surrogates, unassigned and private-use code points included), with spaces between runs."""
    rng = random.Random(seed)
    pool = sorted({c for texts in CORPUS.values() for text in texts for c in text})
    texts = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(1, 40)):
            r = rng.random()
            if r < 0.6:
                chars.append(rng.choice(pool))
            elif r < 0.75:
                chars.append(" ")
            elif r < 0.9:
                chars.append(chr(rng.randrange(0x10000)))
            else:
                chars.append(chr(rng.randrange(0x110000)))
        texts.append("".join(chars))
    return texts


LONG = " ".join(["a photograph of a very small dog running"] * 20)  # ~160 tokens
# (75 words of one token each: a row of exactly 77 with sot and eot; then one word more.)
EXACT, OVER = " ".join(["dog"] * 75), " ".join(["dog"] * 76)

CORPUS: dict[str, list[str]] = {
    "latin": [
        "A Photo of a DOG.",
        "hello, world! what's up?! :-)",
        "it's THEY'RE we'll I'M you've she'd",
        "in 2024 there were 3.14159 pies and 42 cats",
        "Café naïve ÜBER crème brûlée Zoë",
        "cafe\u0301 decomposed, nfc composes it",
        "Straße GROSSE ẞ",
        "Tiếng Việt có dấu",
        "Zażółć gęślą jaźń",
        "ǅungla ǈubav ǋegoš",
        "snake_case and kebab-case and CamelCase",
        "e-mail: someone@example.com, https://example.com/a?b=c#d",
    ],
    "greek": [
        "ΟΔΟΣ",
        "ΣΟΦΟΣ ΚΑΙ ΣΟΦΗ",
        "Σ",
        "ΑΣ.",
        "ΟΔΟΣ'Σ ΟΔΟΣ-ΟΔΟΣ",
        "ὈΔΥΣΣΕΎΣ",
        "ΣΑΣ1 ΑΣΑ",
        "Ἀθῆναι ᾼ ᾈ",
        "μικρός σκύλος",
        "Ω ohm sign",
    ],
    "cyrillic": ["Москва ЗИМОЙ", "Ёлка и ёж", "Україна ЇЖАК", "Српски Ђ Љ Њ", "ӘЛЕМ Қазақ"],
    "cjk": [
        "日本語のテキスト",
        "一只狗在草地上奔跑",
        "고양이가 매트 위에 있다",
        "ｶﾀｶﾅ ﾊﾝｶｸ",
        "豈 更 車",
        "「引用」。、・",
        "𠮷野家",
    ],
    "arabic_hebrew": [
        "القطة على السجادة",
        "مَرْحَبًا بِكُم",
        "٠١٢٣٤٥٦٧٨٩",
        "گربه \u200fروی\u200e فرش",
        "שָׁלוֹם עולם",
        "ﷺ ﷽",
    ],
    "indic_thai": [
        "नमस्ते दुनिया",
        "क्षत्रिय क्\u200dष क्\u200cष",
        "வணக்கம்",
        "বাংলা ভাষা",
        "สวัสดีครับ แมวนั่งบนเสื่อ",
        "ខ្មែរ ພາສາລາວ မြန်မာ",
    ],
    "other_scripts": [
        "ქართული Հայերեն",
        "ኢትዮጵያ",
        "ᏣᎳᎩ ꮳꮃꭹ",
        "𐐔𐐯𐑅𐐨𐑉𐐯𐐻",
        "ᠮᠣᠩᠭᠣᠯ བོད་ཡིག",
        "𐌲𐌿𐍄𐌹𐍃𐌺",
    ],
    "emoji": [
        "👨\u200d👩\u200d👧\u200d👦 family",
        "🇯🇵🇺🇸🇫🇷 flags",
        "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f scotland",
        "👍🏽 👍🏿 👋🏻",
        "1\ufe0f\u20e3 #\ufe0f\u20e3 keycaps",
        "❤️ ❤ ☺︎",
        "🧑🏽\u200d🚀 🏳️\u200d🌈",
        "🐶dog🐱cat",
        "🐶 dog 🎉 party 👍🏽 emoji",
    ],
    "html": [
        "fish &amp; chips &lt;3 &amp;amp; &quot;yum&quot;",
        "&amp;amp;",
        "&amp;amp;amp;amp;",
        "&lt;b&gt;bold&lt;/b&gt;",
        "<b>&amp;</b> tags keep ftfy from unescaping",
        "&quot;x&quot; &#39;y&#39; &#x27;z&#x27;",
        "&nbsp;a&nbsp;b",
        "&eacute;t&eacute; &Eacute;T&Eacute;",
        "&unknown; &amp",
        "&#0; &#x110000; &#xD800;",
        "&copy 2024 AT&T &AMP;",
        "&lt;end_of_text&gt;",
    ],
    "mojibake": [
        "cafÃ©",
        "Ã¼ber Ã©tÃ©",
        "â€œquotedâ€\x9d",
        "donâ€™t",
        "ÐœÐ¾Ñ\x81ÐºÐ²Ð°",
        "æ—¥æœ¬",
        "The Mona Lisa doesnÃƒÂ¢Ã¢â€šÂ¬Ã¢â€žÂ¢t have eyebrows.",
        "Ã\xa0 la mode",
        "ðŸ˜€ smile",
    ],
    "control": [
        "a\x00b",
        "bell\x07 ring",
        "\x1b[31mred\x1b[0m",
        "del\x7fete",
        "c1 \x80\x85\x9f controls",
        "zero\u200bwidth",
        "soft\xadhyphen",
        "line\u2028separator\u2029",
        "crlf\r\nnext\rline",
        "form\x0cfeed vt\x0b",
        "unit\x1fsep\x1c",
        "tab\tsep",
        "\ufffd replacement",
        "a\ud800b lone surrogate \udc00",
        "\ud83d\ude00 surrogate pair",
        "\U000e0041 tag \ue000 private \U0010fffd",
    ],
    "bom": ["\ufeffhello", "mid\ufeffdle", "\ufeff", "\ufeff\ufeffdouble", "\ufffe noncharacter"],
    "fullwidth": [
        "ＡＢＣ",
        "ｈｅｌｌｏ\u3000ｗｏｒｌｄ",
        "Ｆｕｌｌ width ｃｈａｒｓ and 日本語 text",
        "１２３ ！？",
        "＂quote＂ ＤＯＮ＇Ｔ",
        "＜end_of_text＞",
    ],
    "ligatures": ["ﬁsh ﬂower", "oﬀice eﬃcient baﬄe", "ﬆ ﬅ", "Ĳssel ĳs", "Æsir œuvre", "ǆ ǉ"],
    "quotes": [
        "don’t",
        "‘single’ “double”",
        "„German“ «French» ‹single›",
        "it’s THEY’RE I’M",
        "5′ 3″ ´acute` ‛reversed‟",
    ],
    "numbers_symbols": [
        "1,000,000 1e10 0x1F",
        "²³ ¼½¾ Ⅻ ⅻ",
        "०१२ ①② 𝟙𝟚",
        "𝐀𝐁𝐂 𝔉𝔯𝔞𝔨 ℌℍ",
        "∑∫√∞ → ← ⇒",
        "© ® ™ °C €5 £3 ¥",
        "~!@#$%^&*()_+{}|:<>?",
        "ª º µ K Å",
    ],
    "combining": [
        "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
        "a\u0345 \u0345",
        "n\u0303 a\u030a",
        "\u0301 leading mark",
        "q\u0307\u0323",
    ],
    "case": [
        "İSTANBUL ıi",
        "ß ẞ SS",
        "ǄǅǆǇ",
        "ſ long s ſtreet",
        "it'ſ IT'S 'S",
        "ǰ ŉ ᾳ",
        "ÀÉÎÕÜ",
    ],
    "special": [
        "<|endoftext|>",
        "<|startoftext|>",
        "<|endoftext|> inside the text",
        "a <|startoftext|>b<|endoftext|> c",
        "<end_of_text>",
        "<start_of_text>",
        "a dog <end_of_text> a cat",
        "<END_OF_TEXT> <End_Of_Text>",
        "<end_of_text><end_of_text>",
        "x<start_of_text>y",
        "<ſtart_of_text>",
        "<end of text> <end_of_text end_of_text>",
        "</w> hello</w>world",
        "<start_of_text> " * 40,
    ],
    "long": [
        LONG,
        "a" * 500,
        "9" * 200,
        "日本語" * 100,
        "🎉" * 40,
        EXACT,
        OVER,
        OVER + " <end_of_text>",
        EXACT[:-3] + "<end_of_text>",
    ],
    "empty_whitespace": [
        "",
        " ",
        "   ",
        "\t\n\r",
        "\u3000",
        "\xa0",
        "\u2003\u2009",
        "\n\n\n",
        "\x85",
        "\u2028\u2029",
        "\x1c\x1d\x1e\x1f",
        "  extra   spaces\n\nnew lines\tand\ttabs \u00a0nbsp  ",
    ],
}
CORPUS["random"] = _random_texts(300)
