"""Datasets: generated shapes (captions checked against the pixels), digits, tar shards, CSV."""

import io
import re
import subprocess
import sys
import tarfile
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fastclip.data import (
    CAPTIONS,
    CLASSNAMES,
    COLOURS,
    DIGIT_CAPTIONS,
    DIGIT_CLASSNAMES,
    DIGIT_TEMPLATES,
    DIGIT_WORDS,
    HELD_OUT,
    RELATIONS,
    SHAPES,
    SPLITS,
    TEMPLATES,
    CsvPairs,
    DigitsDataset,
    ShapesDataset,
    WebDatasetPairs,
    collate_pairs,
    decode_image,
    write_shards,
)

# ---------------------------------------------------------------------------------------------
# Shapes: captions parsed, pixels measured

_OBJECT = r"(an? \w+ \w+)"
_BODY = re.compile(rf"{_OBJECT}(?: ({'|'.join(RELATIONS)}) {_OBJECT})?")
_TEMPLATES = [re.compile(re.escape(t).replace(r"\{\}", "(.+)") + "$") for t in CAPTIONS]


def parse(caption: str) -> tuple[list[tuple[str, str]], str | None]:
    """A shapes caption's [(colour, shape), ...] and relation (None for one object)."""
    for template in _TEMPLATES:
        m = template.match(caption)
        body = m and _BODY.fullmatch(m.group(1))
        if body:
            objects = [tuple(p.split()[1:]) for p in (body.group(1), body.group(3)) if p]
            return objects, body.group(2)
    raise AssertionError(f"caption {caption!r} follows no template of CAPTIONS")


def colour_masks(image: torch.Tensor) -> dict[str, np.ndarray]:
    """(3, H, W) uint8 -> {colour: (H, W) mask} for the colours with more than 10 pixels."""
    pixels = image.permute(1, 2, 0).numpy().astype(float)  # (H, W, 3)
    palette = np.array(list(COLOURS.values()), dtype=float)  # (C, 3)
    nearest = np.linalg.norm(pixels[:, :, None] - palette, axis=-1).argmin(-1)  # (H, W)
    foreground = pixels.max(-1) > 100  # the background noise stays below 32
    masks = {c: foreground & (nearest == k) for k, c in enumerate(COLOURS)}
    return {c: m for c, m in masks.items() if m.sum() > 10}


def shape_of(mask: np.ndarray) -> str:
    """Tell the shapes apart by the corners of their bounding box and its quarter points (filled
    in a circle, empty in a cross)."""
    rows, cols = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    top, bottom = box[0, [0, -1]].sum(), box[-1, [0, -1]].sum()
    if top + bottom == 4:
        return "square"
    if bottom == 2 and top == 0:
        return "triangle"
    assert top + bottom == 0, f"corners {top} {bottom}"
    h, w = box.shape
    quarters = box[[h // 4, h // 4, -1 - h // 4, -1 - h // 4], [w // 4, -1 - w // 4] * 2].sum()
    assert quarters in (0, 4), f"{quarters} of 4 quarter points set"
    return "circle" if quarters == 4 else "cross"


def test_shapes_constants():
    assert len(COLOURS) >= 6 and len(SHAPES) >= 3 and len(RELATIONS) == 4
    assert len(CLASSNAMES) == len(set(CLASSNAMES)) == len(COLOURS) * len(SHAPES)
    for name in CLASSNAMES:
        article, colour, shape = name.split()
        assert colour in COLOURS and shape in SHAPES
        assert article == ("an" if colour[0] in "aeiou" else "a"), name
    assert "an orange square" in CLASSNAMES
    seen = {(c, s) for c in COLOURS for s in SHAPES} - set(HELD_OUT)
    assert set(HELD_OUT) < {(c, s) for c in COLOURS for s in SHAPES}
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)
    assert all(t.count("{}") == 1 for t in TEMPLATES + CAPTIONS)
    ds = ShapesDataset("zeroshot", 3)
    assert ds.classnames == CLASSNAMES and ds.templates == TEMPLATES


@pytest.mark.parametrize("split", list(SPLITS))
def test_shapes_deterministic(split):
    ds = ShapesDataset(split, 60, seed=3)
    first = [ds[i] for i in range(60)]
    again = ShapesDataset(split, 100, seed=3)  # a fresh object, another length
    for i in reversed(range(60)):  # another access order
        for a, b in ((ds[i], first[i]), (again[i], first[i])):
            assert torch.equal(a[0], b[0]) and a[1] == b[1], f"{split}[{i}] changed"
    image, caption = first[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and isinstance(caption, str)
    other = ShapesDataset(split, 60, seed=4)
    same = sum(torch.equal(other[i][0], first[i][0]) for i in range(60))
    assert same == 0, f"{same} of 60 images equal under another seed"


def test_shapes_splits_are_different_streams():
    train, test = ShapesDataset("train", 50), ShapesDataset("test", 50)
    assert not any(torch.equal(train[i][0], test[i][0]) for i in range(50))
    assert all(label == -1 for label in test.labels)


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("image_size", [32, 48])
def test_shapes_pixels_match_captions(split, image_size):
    ds = ShapesDataset(split, 300, image_size=image_size, seed=1)
    relations = set()
    for i in range(len(ds)):
        image, caption = ds[i]
        assert image.shape == (3, image_size, image_size)
        objects, relation = parse(caption)
        masks = colour_masks(image)
        assert set(masks) == {c for c, _ in objects}, f"{split}[{i}] {caption!r}: drew {set(masks)}"
        for colour, shape in objects:
            assert shape_of(masks[colour]) == shape, f"{split}[{i}] {caption!r}: {colour} shape"
        if relation is None:
            assert CLASSNAMES[ds.labels[i]].split()[1:] == list(objects[0]), caption
            continue
        assert ds.labels[i] == -1
        relations.add(relation)
        (ya, xa), (yb, xb) = (np.argwhere(masks[c]).mean(0) for c, _ in objects)  # centroids
        axis = {"above": yb - ya, "below": ya - yb, "to the left of": xb - xa}
        gap = axis.get(relation, xa - xb)
        assert gap > 5 * image_size / 32, f"{split}[{i}] {caption!r}: centroids {gap:.1f} apart"
    if split in ("train", "test"):
        assert relations == set(RELATIONS)


def test_shapes_held_out_and_labels():
    held_out = {f"{c} {s}" for c, s in HELD_OUT}
    for split in ("train", "test", "zeroshot"):
        ds = ShapesDataset(split, 5000 if split == "train" else None)
        drawn = {" ".join(p) for c in ds.captions for p in parse(c)[0]}
        assert not drawn & held_out, f"{split} draws held-out pairs {drawn & held_out}"
        assert len(drawn) == len(COLOURS) * len(SHAPES) - len(HELD_OUT), split
    train = ShapesDataset("train", 2000)
    counts = [sum(1 for c in train.captions if len(parse(c)[0]) == k) for k in (1, 2)]
    assert min(counts) > 800, f"one- and two-object train items: {counts}"
    compositional = ShapesDataset("compositional")
    assert {tuple(CLASSNAMES[y].split()[1:]) for y in compositional.labels} == set(HELD_OUT)
    for ds in (compositional, ShapesDataset("zeroshot")):
        for label, caption in zip(ds.labels, ds.captions, strict=True):
            assert parse(caption) == ([tuple(CLASSNAMES[label].split()[1:])], None)


def test_shapes_grammar():
    captions = [c for split in SPLITS for c in ShapesDataset(split, 2000).captions]
    for caption in captions:
        assert not re.search(r"\ba [aeiou]", caption), caption
        assert not re.search(r"\ban [^aeiou]", caption), caption
    assert any(re.search(r"\ban orange", c) for c in captions)


def test_shapes_errors():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("val")
    with pytest.raises(ValueError, match="n must"):
        ShapesDataset("train", 0)
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset("train", 5, image_size=8)
    ds = ShapesDataset("test", 5)
    assert torch.equal(ds[-1][0], ds[4][0])
    with pytest.raises(IndexError):
        ds[5]
    assert len(list(ds)) == 5  # iteration stops at the end


# ---------------------------------------------------------------------------------------------
# Digits


def test_digits_splits():
    sklearn = pytest.importorskip("sklearn.datasets")
    train, test = DigitsDataset("train"), DigitsDataset("test")
    assert len(test) == round(0.2 * 1797) and len(train) + len(test) == 1797
    assert sorted(train.indices + test.indices) == list(range(1797))
    assert DigitsDataset("test").indices == test.indices
    assert DigitsDataset("test", seed=1).indices != test.indices
    digits = sklearn.load_digits()
    for ds in (train, test):
        for i in range(0, len(ds), 37):
            image, caption = ds[i]
            assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
            expected = np.round(digits.images[ds.indices[i]] * 255 / 16)
            assert (image.numpy() == expected).all(), f"image {i} differs"
            y = ds.labels[i]
            assert y == digits.target[ds.indices[i]]
            words = caption.split()
            assert DIGIT_WORDS[y] in words or str(y) in words, (caption, y)
    assert len(set(train.captions)) > 60  # varied: words and numerals, several wordings


def test_digits_templates_held_out():
    pytest.importorskip("sklearn")
    ds = DigitsDataset("train")
    assert ds.classnames == DIGIT_CLASSNAMES == list(DIGIT_WORDS)
    assert ds.templates == DIGIT_TEMPLATES and not set(DIGIT_TEMPLATES) & set(DIGIT_CAPTIONS)
    prompts = {t.format(c) for t in DIGIT_TEMPLATES for c in DIGIT_CLASSNAMES}
    training = {t.format(word=w, num=n) for t in DIGIT_CAPTIONS for n, w in enumerate(DIGIT_WORDS)}
    assert not prompts & training
    assert set(ds.captions) <= training
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("val")
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsDataset(test_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# Files

needs_pil = pytest.mark.skipif(not find_spec("PIL"), reason="needs Pillow")
needs_wds = pytest.mark.skipif(
    not (find_spec("webdataset") and find_spec("PIL")), reason="needs webdataset and Pillow"
)


def samples(n: int) -> list[tuple[torch.Tensor, str]]:
    """n distinct two-object images with their (distinct) captions."""
    ds = ShapesDataset("test", n)
    return [(ds[i][0], f"{i}: {ds[i][1]}") for i in range(n)]


def png_bytes(image: torch.Tensor) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(out, "PNG")
    return out.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@needs_wds
def test_shards_round_trip(tmp_path, recwarn):
    pairs = samples(25)
    paths = write_shards(pairs, tmp_path, per_shard=10)
    assert [p.name for p in paths] == ["000000.tar", "000001.tar", "000002.tar"]
    for urls in (str(tmp_path / "{000000..000002}.tar"), paths):
        ds = WebDatasetPairs(urls)
        read = list(ds)
        assert [c for _, c in read] == [c for _, c in pairs]
        for (a, _), (b, caption) in zip(read, pairs, strict=True):
            assert torch.equal(a, b), f"{caption!r}: the png round trip changed pixels"
        assert ds.skipped == 0
    assert not [w for w in recwarn if "skipped" in str(w.message)]
    write_shards(pairs[:5], tmp_path / "jpg", image_format="jpg")
    jpgs = list(WebDatasetPairs(str(tmp_path / "jpg/000000.tar")))
    for (a, _), (b, _) in zip(jpgs, pairs[:5], strict=True):  # lossy, but the same picture
        assert (a.float() - b.float()).abs().mean() < 12 and set(colour_masks(a)) == set(
            colour_masks(b)
        )


@needs_wds
def test_shards_skip_bad_samples(tmp_path):
    (good, caption), (other, caption2) = samples(2)
    write_tar(
        tmp_path / "000000.tar",
        [
            ("a.png", png_bytes(good)),
            ("a.txt", caption.encode()),
            ("b.jpg", b"not an image at all"),
            ("b.txt", b"garbage pixels"),
            ("c.png", png_bytes(good)),  # no caption
            ("d.png", png_bytes(good)),
            ("d.txt", b"  \n"),
            ("e.txt", b"no image"),
            ("f.png", png_bytes(other)),
            ("f.txt", caption2.encode()),
        ],
    )
    (tmp_path / "000001.tar").write_bytes(b"this is not a tar file" * 50)
    ds = WebDatasetPairs(str(tmp_path / "{000000..000001}.tar"))
    with pytest.warns(
        UserWarning, match="read 2 samples, skipped 1 undecodable image, .*1 unreadable shard"
    ):
        read = list(ds)
    assert [c for _, c in read] == [caption, caption2]
    assert torch.equal(read[0][0], good) and torch.equal(read[1][0], other)
    assert ds.skipped == 5
    assert ds.skip_reasons == {
        "undecodable image": 1,
        "missing caption": 1,
        "empty caption": 1,
        "missing image": 1,
        "unreadable shard (ReadError)": 1,
    }


@needs_wds
@pytest.mark.parametrize("cut", [100, 700, 3000])  # in the first header, a member's data, later
def test_a_truncated_shard_counts_once(tmp_path, cut, recwarn):
    """Its samples before the break are read; it counts once, in every pass and over passes."""
    paths = write_shards(samples(20), tmp_path, per_shard=10)
    paths[0].write_bytes(paths[0].read_bytes()[:cut])
    ds = WebDatasetPairs([*map(str, paths), str(tmp_path / "gone.tar")], shuffle=4)
    for epoch in range(3):
        ds.set_epoch(epoch)
        assert 10 <= len(list(ds)) < 20
    unreadable = {k: n for k, n in ds.skip_reasons.items() if k.startswith("unreadable")}
    assert unreadable == {
        "unreadable shard (ReadError)": 1,
        "unreadable shard (FileNotFoundError)": 1,
    }
    assert ds.unreadable == {str(paths[0]), str(tmp_path / "gone.tar")}
    assert ds.skipped == sum(ds.skip_reasons.values())
    passes = [str(w.message) for w in recwarn if "WebDatasetPairs read" in str(w.message)]
    for why in unreadable:  # each pass's warning: both, once (repeated warnings may be merged)
        assert passes and all(f"1 {why}" in message for message in passes), passes


@needs_wds
def test_shards_split_across_workers_and_ranks(tmp_path, monkeypatch):
    pairs = samples(24)
    write_shards(pairs, tmp_path, per_shard=4)  # 6 shards
    urls, everything = str(tmp_path / "{000000..000005}.tar"), sorted(c for _, c in pairs)
    loader = DataLoader(
        WebDatasetPairs(urls), batch_size=5, num_workers=2, collate_fn=collate_pairs
    )
    read = [c for _, captions in loader for c in captions]
    assert sorted(read) == everything, "each sample exactly once through 2 workers"
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append([c for _, c in WebDatasetPairs(urls)])
    assert len(per_rank[0]) == len(per_rank[1]) == 12
    assert sorted(per_rank[0] + per_rank[1]) == everything


@needs_wds
def test_shards_shuffle(tmp_path):
    pairs = samples(30)
    write_shards(pairs, tmp_path, per_shard=10)
    urls = str(tmp_path / "{000000..000002}.tar")
    order = [c for _, c in WebDatasetPairs(urls, shuffle=16, seed=5)]
    assert order == [c for _, c in WebDatasetPairs(urls, shuffle=16, seed=5)]
    assert order != [c for _, c in pairs] and sorted(order) == sorted(c for _, c in pairs)
    epoch1 = WebDatasetPairs(urls, shuffle=16, seed=5)
    epoch1.set_epoch(1)
    assert [c for _, c in epoch1] != order


@needs_pil
def test_write_shards_errors(tmp_path):
    with pytest.raises(ValueError, match="image_format"):
        write_shards(samples(1), tmp_path, image_format="gif")
    with pytest.raises(ValueError, match="per_shard"):
        write_shards(samples(1), tmp_path, per_shard=0)
    with pytest.raises(ValueError, match="samples\\[0\\] image"):
        write_shards([(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "a batch")], tmp_path)


@needs_pil
def test_decode_image(tmp_path):
    from PIL import Image

    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey).save(tmp_path / "grey.png")
    image = decode_image(tmp_path / "grey.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 3, 4)
    assert (image.numpy() == grey).all()
    rgba = np.zeros((2, 2, 4), np.uint8) + np.array([10, 20, 30, 0], np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert decode_image(str(tmp_path / "rgba.png"))[:, 0, 0].tolist() == [10, 20, 30]
    with pytest.raises(ValueError, match="<5 bytes>"):
        decode_image(b"hello")
    with pytest.raises(ValueError, match="shard:key"):
        decode_image(png_bytes(torch.zeros(3, 4, 4, dtype=torch.uint8))[:40], name="shard:key")
    with pytest.raises(FileNotFoundError):
        decode_image(tmp_path / "missing.png")


@needs_pil
def test_csv_pairs(tmp_path):
    pairs = samples(3)
    (tmp_path / "img").mkdir()
    for i, (image, _) in enumerate(pairs):
        (tmp_path / "img" / f"{i}.png").write_bytes(png_bytes(image))
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG broken")
    rows = [f"img/{i}.png\t{c}" for i, (_, c) in enumerate(pairs)]
    rows[1:1] = ["img/bad.png\ta corrupt file", "img/gone.png\ta missing file"]
    (tmp_path / "pairs.tsv").write_text("path\ttext\n" + "\n".join(rows) + "\n")
    ds = CsvPairs(tmp_path / "pairs.tsv", image_key="path", caption_key="text", delimiter="\t")
    assert len(ds) == 5
    with pytest.warns(UserWarning, match="CsvPairs skipped row"):
        batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_pairs))
    images = [x for b in batches for x in b[0]]
    assert [c for b in batches for c in b[1]] == [c for _, c in pairs]
    assert all(torch.equal(a, b) for a, (b, _) in zip(images, pairs, strict=True))
    assert ds.skipped == 2 and ds.skip_reasons == {"undecodable image": 1, "missing image": 1}
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "list.csv").write_text("filepath,caption\nimg/0.png,first\n")
    assert CsvPairs(tmp_path / "sub" / "list.csv", root=tmp_path)[0][1] == "first"
    assert collate_pairs([None, None]) == ([], [])


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_csv_not_utf8_names_the_file_and_line(tmp_path, bom):
    """In one line, from the command too, before anything is written."""
    path = tmp_path / "pairs.csv"
    path.write_bytes(bom + b"filepath,caption\na.png,first\nb.png,caf\xe9 au lait\n")
    with pytest.raises(ValueError) as error:
        CsvPairs(path)
    assert str(error.value) == (
        f"{path}, line 3, column 10: byte 0xe9 is not UTF-8 (save the file as UTF-8)"
    )
    command = [sys.executable, "-m", "fastclip.cli", "train", "--data", f"csv:{path}"]
    result = subprocess.run([*command, "--out", str(tmp_path / "run")], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1 and not result.stdout, result.stderr[-3000:]
    assert result.stderr == f"fastclip train: error: {error.value}\n"
    assert not (tmp_path / "run").exists()
    path.write_bytes(bom + "filepath,caption\na.png,café\n".encode())  # a byte-order mark is fine
    assert CsvPairs(path).captions == ["café"]


def test_csv_missing_column(tmp_path):
    (tmp_path / "pairs.csv").write_text("path,text\na.png,a caption\n")
    with pytest.raises(ValueError, match=r"no column 'filepath', 'caption'.*\['path', 'text'\]"):
        CsvPairs(tmp_path / "pairs.csv")


@pytest.mark.parametrize(
    "module, make, install",
    [
        ("sklearn.datasets", lambda: DigitsDataset(), "fastclip-triton\\[digits\\]"),
        ("webdataset", lambda: WebDatasetPairs("a.tar"), "fastclip-triton\\[webdataset\\]"),
        ("PIL.Image", lambda: decode_image(b"png"), "pillow"),
    ],
)
def test_optional_dependencies(monkeypatch, module, make, install):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(ImportError, match=f"pip install {install}"):
        make()
