"""--data hf:<path or name>[:split]: Hugging Face datasets the test builds and saves with
`datasets` itself (save_to_disk, and a folder of parquet files that load_dataset reads), bad rows
skipped, columns chosen by flag, clear errors; and a short training run on one."""

import json
import sys

import numpy as np
import pytest
import torch
from helpers import require
from torch.utils.data import DataLoader

require("datasets", "PIL")
import datasets
from PIL import Image

from fastclip.data import ShapesDataset, collate_pairs, training_set
from fastclip.data.hf import HfPairs
from fastclip.train import TrainConfig, train

FEATURES = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})


def shapes(n: int) -> tuple[list[torch.Tensor], list[str]]:
    pairs = [ShapesDataset("train", n)[i] for i in range(n)]
    return [image for image, _ in pairs], [caption for _, caption in pairs]


def pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DatasetDict on disk: "train" of 64 shapes, "validation" with an undecodable image and
    an empty caption among 4 rows."""
    images, captions = shapes(64)
    train_split = datasets.Dataset.from_dict(
        {"image": [pil(x) for x in images], "text": captions}, features=FEATURES
    )
    rows = {
        "image": [pil(images[0]), {"bytes": b"not an image", "path": None}, pil(images[2]),
                  pil(images[3])],
        "text": [captions[0], captions[1], "  ", captions[3]],
    }  # fmt: skip
    validation = datasets.Dataset.from_dict(rows, features=FEATURES)
    path = tmp_path_factory.mktemp("hf") / "shapes"
    datasets.DatasetDict({"train": train_split, "validation": validation}).save_to_disk(path)
    return path, images, captions


def test_a_saved_dataset_and_its_splits(saved):
    path, images, captions = saved
    pairs = training_set(f"hf:{path}", seed=0)  # "train" by default
    assert len(pairs) == 64 and list(pairs.captions) == captions
    image, caption = pairs[5]
    assert torch.equal(image, images[5]) and caption == captions[5]
    validation = HfPairs(f"{path}:validation")
    with pytest.warns(UserWarning, match="HfPairs skipped row") as caught:
        batches = list(DataLoader(validation, batch_size=4, collate_fn=collate_pairs))
    assert [str(w.message) for w in caught] == [
        f"HfPairs skipped row 1 ({path}[1]): undecodable image",
        f"HfPairs skipped row 2 ({path}[2]): empty caption",
    ]
    (kept_images, kept_captions), = batches  # fmt: skip
    assert kept_captions == [captions[0], captions[3]]
    assert torch.equal(kept_images[1], images[3])
    assert validation.skip_reasons == {"undecodable image": 1, "empty caption": 1}


def test_a_folder_of_parquet_files_and_named_columns(tmp_path):
    """load_dataset reads a folder of data files (as it reads a cached Hub dataset), and image
    paths work as well as embedded images."""
    images, captions = shapes(8)
    for i, image in enumerate(images):
        pil(image).save(tmp_path / f"{i}.png")
    files = [str(tmp_path / f"{i}.png") for i in range(8)]
    table = datasets.Dataset.from_dict({"file": files, "caption": captions, "id": list(range(8))})
    table.to_parquet(tmp_path / "data" / "train.parquet")
    pairs = training_set(
        f"hf:{tmp_path / 'data'}", 0, image_column="file", caption_column="caption"
    )
    assert [c for _, c in (pairs[i] for i in range(8))] == captions
    assert all(torch.equal(pairs[i][0], images[i]) for i in range(8))


def test_errors(saved, tmp_path, monkeypatch):
    path, _, _ = saved
    with pytest.raises(ValueError, match=r"no column 'photo'.*columns are \['image', 'text'\]"):
        HfPairs(str(path), image_key="photo")
    with pytest.raises(ValueError, match=r"column 'image' .* holds Image\(.*\), not strings"):
        HfPairs(str(path), caption_key="image")
    datasets.Dataset.from_dict({"image": [1, 2], "text": ["a", "b"]}).save_to_disk(tmp_path / "ids")
    with pytest.raises(ValueError, match=r"holds Value\('int64'\), not images or paths"):
        HfPairs(str(tmp_path / "ids"))
    with pytest.raises(ValueError, match=r"no split 'test'.*\['train', 'validation'\]"):
        HfPairs(f"{path}:test")
    with pytest.raises(ValueError, match="one saved dataset, not splits"):
        HfPairs(f"{path / 'train'}:train")
    with pytest.raises(ValueError, match=r"apply to csv:<file> or hf:.*not shapes"):
        TrainConfig(data="shapes", image_column="image")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install "fastclip-triton\[datasets\]"'):
        HfPairs(str(path))


def test_trains_on_a_saved_dataset(saved, tmp_path):
    path, _, _ = saved
    cfg = TrainConfig(out=str(tmp_path / "run"), data=f"hf:{path}", steps=2, batch_size=32,
                      warmup=1, log_every=1, eval_every=0, save_every=0, device="cpu")  # fmt: skip
    assert train(cfg) == {}  # no evaluation sets in a dataset of pairs
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
