"""Few-shot adaptation on digits: every method beats chance, the frozen CLIP stays bit for bit
what it was, trained parts round-trip through safetensors, and bad input fails clearly; the
command on every data source it offers, each split naming the classes it holds."""

import copy
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import require
from safetensors.torch import load_file, save_file

require("tokenizers", "tqdm", "sklearn")
from fastclip import finetune
from fastclip.checkpoint import load_pretrained
from fastclip.cli import finetune_command
from fastclip.data import HELD_OUT, DigitsDataset, few_shot_splits, serving
from fastclip.tokenizer import Tokenizer
from fastclip.train import TrainConfig, latest_checkpoint, train

FEW_SHOT_SOURCES = [s.syntax for s in serving("few_shot")]  # what `finetune --help` lists
FAST = {"adapter": {"steps": 50}, "prompt": {"steps": 30}, "lora": {"steps": 10}}  # smoke runs


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny CLIP trained briefly on digits: (checkpoint directory, model, tokenizer)."""
    out = tmp_path_factory.mktemp("digits")
    cfg = TrainConfig(data="digits", steps=60, batch_size=256, warmup=10, augment=False,
                      eval_every=0, save_every=0, log_every=60, out=str(out))  # fmt: skip
    train(cfg)
    checkpoint = latest_checkpoint(out)
    return checkpoint, load_pretrained(checkpoint), Tokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def splits():
    return DigitsDataset("train"), DigitsDataset("test")


@pytest.fixture(scope="module")
def task(pretrained, splits):
    return finetune.Task.build(*pretrained[1:], *splits)


@pytest.mark.parametrize("method", finetune.METHODS)
def test_method_beats_chance_and_leaves_the_clip_frozen(task, method):
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    flags = [p.requires_grad for p in task.model.parameters()]
    part, top1 = task.run(method, 16)
    assert top1 > 0.5, (
        f"{method}: {top1:.1%} at k = 16 (chance 10%, zero-shot {task.zero_shot():.1%})"
    )
    after = task.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{method} changed {len(changed)} frozen tensors, e.g. {changed[:3]}"
    assert flags == [p.requires_grad for p in task.model.parameters()]
    if method == "lora":  # a trained copy: adapters in it, none in the original
        assert any(".lora_A" in k for k in part.state_dict())
        assert not any(".lora_A" in k for k in after)


def test_fresh_parts_start_at_zero_shot(task, pretrained):
    """An untrained adapter classifies as zero-shot; a learner initialized from "a photo of a"
    encodes exactly the prompts "a photo of a {name}."."""
    _, model, tokenizer = pretrained
    scale = model.logit_scale.exp().detach()
    adapter = finetune.ClipAdapter(task.classifier, scale, adapt_text=True)
    zero_shot = task.test.features @ task.classifier.T
    assert torch.equal(adapter(task.test.features).argmax(1), zero_shot.argmax(1))
    learner = finetune.PromptLearner(model, tokenizer, task.classnames)
    with torch.no_grad():
        learned = learner(model)
        plain = model.encode_text(tokenizer([f"a photo of a {n}." for n in task.classnames]))
    torch.testing.assert_close(learned, plain, rtol=0, atol=1e-6)


def fresh_part(method: str, task, options: dict):
    """A part built as ``method``'s trainer builds it, before training."""
    C, E = task.classifier.shape
    if method == "probe":
        return finetune.LinearProbe(E, C)
    if method == "adapter":
        return finetune.ClipAdapter(torch.zeros(C, E), 1.0, **options)
    return finetune.PromptLearner(task.model, task.tokenizer, task.classnames, init="")


@pytest.mark.parametrize(
    "method, options",
    [("probe", {}), ("adapter", {}), ("adapter", {"adapt_text": True}), ("prompt", {})],
)
def test_trained_parts_round_trip_through_safetensors(task, method, options, tmp_path):
    part, _ = task.run(method, 4, **FAST.get(method, {}), **options)
    path = tmp_path / f"{method}.safetensors"
    finetune.save_adapter(part, path)
    loaded = finetune.load_adapter(fresh_part(method, task, options), path)
    for key, value in part.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        x = task.model if method == "prompt" else task.test.features
        assert torch.equal(loaded(x), part(x))
    other = finetune.LinearProbe(3, 2) if method != "probe" else fresh_part("adapter", task, {})
    with pytest.raises(ValueError, match=f"holds a {type(part).__name__}, not a"):
        finetune.load_adapter(other, path)


def test_few_shot_indices():
    labels = [i % 3 for i in range(30)] + [3] * 5  # classes 0-2: 10 each, class 3: 5
    ids = finetune.few_shot_indices(labels, 4, seed=1)
    assert ids == sorted(ids) and len(set(ids)) == 16
    assert [sum(labels[i] == c for i in ids) for c in range(4)] == [4, 4, 4, 4]
    assert ids == finetune.few_shot_indices(torch.tensor(labels), 4, seed=1)
    assert ids != finetune.few_shot_indices(labels, 4, seed=2)
    assert set(finetune.few_shot_indices(labels, 2, seed=1)) <= set(ids)  # nested in k
    with pytest.raises(ValueError, match=r"k=6 exceeds the 5 examples of class 3\b"):
        finetune.few_shot_indices(labels, 6)
    with pytest.raises(ValueError, match=r"k=6 exceeds the 5 examples of class 3 \('d'\)"):
        finetune.few_shot_indices(labels, 6, classnames=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"k=1 exceeds the 0 examples of class 4 \('e'\)"):
        finetune.few_shot_indices(labels, 1, classnames=list("abcde"))
    with pytest.raises(ValueError, match="k must be >= 1"):
        finetune.few_shot_indices(labels, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        finetune.few_shot_indices(labels, 2.0)


def test_compare_renders_a_table_and_the_cli_prints_it(pretrained, splits, capsys):
    checkpoint, model, tokenizer = pretrained
    results = finetune.compare(model, tokenizer, *splits, shots=(1, 4), options=FAST)
    assert list(results) == ["zero-shot", *finetune.METHODS]
    assert all(
        list(row) == [1, 4] and all(0 <= v <= 1 for v in row.values()) for row in results.values()
    )
    lines = finetune.render_table(results).splitlines()
    assert lines[:2] == ["| method | k = 1 | k = 4 |", "|---|---:|---:|"]
    assert [line.split("|")[1].strip() for line in lines[2:]] == list(results)
    assert re.fullmatch(r"\| zero-shot \| (\d+\.\d%) \| \1 \|", lines[2])

    finetune_command(["--compare", "--checkpoint", str(checkpoint), "--shots", "1", "4"])
    printed = capsys.readouterr().out
    assert "| method | k = 1 | k = 4 |" in printed
    assert all(f"| {row} |" in printed for row in results)


def test_cli_trains_one_method_and_saves_it(pretrained, task, tmp_path, capsys):
    checkpoint = pretrained[0]
    results = finetune_command(
        ["--checkpoint", str(checkpoint), "--shots", "4", "--out", str(tmp_path)]
    )
    assert set(results) == {"zero-shot", "probe"}
    printed = capsys.readouterr().out
    assert "zero-shot" in printed and "probe" in printed
    probe = finetune.load_adapter(fresh_part("probe", task, {}), tmp_path / "probe.safetensors")
    assert finetune.top1(probe(task.test.features), task.test.labels) == results["probe"]


def test_bad_input(pretrained, splits, task, tmp_path):
    checkpoint, model, tokenizer = pretrained
    train_set, test_set = splits
    names = list(train_set.classnames)
    for classnames, message in [
        (names[:9], r"labels hold class 9, but classnames lists 9 classes"),
        (names + ["ten"], r"train_set has no example of \['ten'\]"),
        (names[:9] + ["one"], "classnames must be distinct"),
    ]:
        relabelled = [copy.copy(train_set), copy.copy(test_set)]
        for ds in relabelled:
            ds.classnames = classnames
        with pytest.raises(ValueError, match=message):
            finetune.compare(model, tokenizer, *relabelled, shots=(1,))
    with pytest.raises(ValueError, match=r"k=500 exceeds the \d+ examples of class \d+ \('\w+'\)"):
        finetune.compare(model, tokenizer, train_set, test_set, shots=(1, 500))
    with pytest.raises(ValueError, match="method must be one of"):
        task.run("full", 4)
    with pytest.raises(ValueError, match="methods must be a non-empty subset"):
        finetune.compare(model, tokenizer, train_set, test_set, methods=("probe", "lit"))

    image_only = tmp_path / "image-only"  # a checkpoint whose weights lack the text tower
    image_only.mkdir()
    (image_only / "config.json").write_text((checkpoint / "config.json").read_text())
    weights = load_file(checkpoint / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("text")},
              image_only / "model.safetensors")  # fmt: skip
    with pytest.raises(ValueError, match=r"has no text tower \(no text\.\*.*which zero-shot"):
        finetune.load_checkpoint(image_only)
    with pytest.raises(ValueError, match="has no text tower"):
        finetune_command(["--checkpoint", str(image_only), "--method", "prompt"])


@pytest.mark.parametrize("source", FEW_SHOT_SOURCES)
def test_few_shot_splits_name_the_classes_they_hold(source):
    """Every class named has training examples (k = 16 of them), the test split is scored on the
    same names, and the labels index them; shapes' ``HELD_OUT`` pairs stay out of fine-tuning."""
    train_set, test_set = few_shot_splits(source, seed=0)
    classnames = list(train_set.classnames)
    assert list(test_set.classnames) == classnames
    assert sorted(set(train_set.labels)) == list(range(len(classnames)))
    assert set(test_set.labels) <= set(range(len(classnames)))
    finetune.few_shot_indices(train_set.labels, 16, classnames=classnames)
    for ds in (train_set, test_set):
        for i in range(0, len(ds), 97):  # the item's caption names its class (word or digit)
            caption, label = ds[i][1], ds.labels[i]
            assert classnames[label] in caption or str(label) in caption, (caption, label)
    if source == "shapes":
        held_out = [f"{colour} {shape}" for colour, shape in HELD_OUT]
        assert len(classnames) == 24
        assert not [name for name in classnames if any(pair in name for pair in held_out)]


@pytest.mark.parametrize("source", FEW_SHOT_SOURCES)
def test_the_command_fine_tunes_on_every_source_it_offers(source, tmp_path):
    """``fastclip finetune --data SOURCE`` as a user runs it: a tiny CLIP pretrained for a step,
    then k = 1 shot per class."""
    command = [sys.executable, "-m", "fastclip.cli", "finetune", "--data", source, "--shots", "1"]
    command += ["--pretrain-steps", "1", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^zero-shot +\d+\.\d%$", result.stdout, re.M), result.stdout[-2000:]
    assert re.search(r"^probe +\d+\.\d%  \(k = 1, ", result.stdout, re.M), result.stdout[-2000:]
    assert (tmp_path / "probe.safetensors").is_file()
