"""Zero-shot classification and retrieval recall against brute force over the full score matrix:
rankings, prompt ensembling on a tiny CLIP, the training flag, and argument checking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import require

require("tokenizers")
from fastclip.model import CLIP
from fastclip.tokenizer import Tokenizer
from fastclip.zeroshot import (
    TEMPLATES,
    accuracy,
    build_zero_shot_classifier,
    encode_images,
    evaluate_zero_shot,
    retrieval_recall,
    zero_shot_classify,
)

CLASSNAMES = ["circle", "square", "triangle", "star", "hexagon"]
CAPTIONS = [f"a {a} photo of a {c}." for a in ("blurry", "bright", "small") for c in CLASSNAMES]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CAPTIONS + list(TEMPLATES), vocab_size=600, context_length=32)


@pytest.fixture
def model(tok):
    torch.manual_seed(0)
    return CLIP("tiny", **tok.model_fields())


def unit(n, dim, gen):
    return F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=-1)


def retrieval_set(n_images, n_texts, seed):
    """Unit features where half the captions are near-duplicates of their image and the rest are
    noise, so recall is neither 0 nor 1. Every image has a caption (one if n_texts == n_images)."""
    gen = torch.Generator().manual_seed(seed)
    images = unit(n_images, 16, gen)
    if n_texts == n_images:
        owner = torch.arange(n_images)
    else:
        extra = torch.randint(n_images, (n_texts - n_images,), generator=gen)
        owner = torch.cat([torch.arange(n_images), extra])[torch.randperm(n_texts, generator=gen)]
    near = torch.rand(n_texts, 1, generator=gen, dtype=torch.float64) < 0.5
    noise = torch.randn(n_texts, 16, generator=gen, dtype=torch.float64)
    texts = F.normalize(torch.where(near, images[owner] + 0.3 * noise, noise), dim=-1)
    return images, texts, owner


def brute_force_recall(images, texts, owner, k):
    """By rank in the full matrix: a hit when fewer than k candidates outscore the best match."""
    scores = images @ texts.T  # (N_i, N_t)
    mine = owner[None, :] == torch.arange(images.shape[0])[:, None]  # (N_i, N_t) caption of image
    best = scores.masked_fill(~mine, -torch.inf).amax(1, keepdim=True)
    i2t = ((scores > best).sum(1) < k).double().mean().item()
    own = scores[owner, torch.arange(texts.shape[0])]  # (N_t,) each caption's own image score
    t2i = ((scores.T > own[:, None]).sum(1) < k).double().mean().item()
    return i2t, t2i


@pytest.mark.parametrize(
    "n_images, n_texts, explicit", [(40, 40, False), (40, 40, True), (30, 75, True), (1, 3, True)]
)
def test_retrieval_recall_matches_brute_force(n_images, n_texts, explicit):
    images, texts, owner = retrieval_set(n_images, n_texts, seed=n_images + n_texts)
    ks = (1, 3, 5, 10, 100)  # 100 exceeds every candidate count
    recall = retrieval_recall(images, texts, owner if explicit else None, ks=ks)
    assert list(recall) == [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in ks]
    for k in ks:
        i2t, t2i = brute_force_recall(images, texts, owner, k)
        assert recall[f"image_to_text_R@{k}"] == pytest.approx(i2t), k
        assert recall[f"text_to_image_R@{k}"] == pytest.approx(t2i), k
    assert recall["image_to_text_R@100"] == recall["text_to_image_R@100"] == 1.0
    if n_images >= 30:  # the planted near-duplicates leave recall strictly inside (0, 1)
        assert 0 < recall["image_to_text_R@1"] < 1 and 0 < recall["text_to_image_R@1"] < 1


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda i, t: retrieval_recall(i, t[:-1]), ValueError, "as many rows"),
        (
            lambda i, t: retrieval_recall(i, t, torch.zeros(3, dtype=torch.long)),
            ValueError,
            "\\(8,\\)",
        ),
        (lambda i, t: retrieval_recall(i, t, torch.arange(8.0)), TypeError, "text_to_image"),
        (lambda i, t: retrieval_recall(i, t, torch.arange(1, 9)), ValueError, "N_i is 8"),
        (lambda i, t: retrieval_recall(i, t, torch.arange(8) - 1), ValueError, "non-negative"),
        (
            lambda i, t: retrieval_recall(i, t, torch.arange(8) // 2),
            ValueError,
            "without a caption",
        ),
        (lambda i, t: retrieval_recall(i, t, ks=()), ValueError, "ks"),
        (lambda i, t: retrieval_recall(i, t, ks=(1, 0)), ValueError, "ks"),
        (lambda i, t: retrieval_recall(i, t.float()), TypeError, "text_features"),
        (lambda i, t: retrieval_recall(i[:, :3], t), ValueError, "feature width"),
    ],
)
def test_retrieval_recall_errors(call, error, match):
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(error, match=match):
        call(unit(8, 4, gen), unit(8, 4, gen))


@pytest.mark.parametrize("k", [1, 3, 7, 10])
def test_zero_shot_classify_matches_full_matrix(k):
    gen = torch.Generator().manual_seed(k)
    features, classifier = unit(50, 16, gen), unit(7, 16, gen)
    got = zero_shot_classify(features, classifier, k=k)
    scores = features @ classifier.T  # (50, 7)
    assert got.shape == (50, min(k, 7)) and got.dtype == torch.int64
    assert torch.equal(got, scores.topk(min(k, 7), dim=1).indices)
    assert torch.equal(got[:, 0], scores.argmax(1))


def test_zero_shot_classify_errors():
    features, classifier = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="classifier"):
        zero_shot_classify(features, classifier[:, :5])
    with pytest.raises(TypeError, match="image_features"):
        zero_shot_classify(features.long(), classifier)
    with pytest.raises(ValueError, match="k must be >= 1"):
        zero_shot_classify(features, classifier, k=0)


def test_accuracy_by_hand():
    labels = torch.tensor([0, 1, 2, 3])
    # The label at rank 1, 3, nowhere and 5.
    predictions = torch.tensor([[0, 4, 5, 6, 7], [4, 5, 1, 6, 7], [4, 5, 6, 7, 8], [4, 5, 6, 7, 3]])
    assert accuracy(predictions, labels, ks=(1, 2, 3, 5)) == {
        "top1": 0.25,
        "top2": 0.25,
        "top3": 0.5,
        "top5": 0.75,
    }
    assert accuracy(predictions[:, 0], labels) == {"top1": 0.25}  # (N,): top5 skipped
    assert accuracy(predictions[:, :3], labels, ks=(1, 5, 3)) == {"top1": 0.25, "top3": 0.5}


@pytest.mark.parametrize(
    "predictions, labels, error, match",
    [
        (
            torch.zeros(4, 1, dtype=torch.long),
            torch.zeros(3, dtype=torch.long),
            ValueError,
            "labels",
        ),
        (torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), TypeError, "predictions"),
        (torch.zeros(4, 1, dtype=torch.long), torch.zeros(4), TypeError, "labels"),
        (
            torch.zeros(4, 1, dtype=torch.long),
            -torch.ones(4, dtype=torch.long),
            ValueError,
            "labels",
        ),
        (
            torch.zeros(0, 1, dtype=torch.long),
            torch.zeros(0, dtype=torch.long),
            ValueError,
            "empty",
        ),
        (
            torch.zeros(4, 2, dtype=torch.long),
            torch.zeros(4, dtype=torch.long),
            ValueError,
            "every k",
        ),
    ],
)
def test_accuracy_errors(predictions, labels, error, match):
    with pytest.raises(error, match=match):
        accuracy(predictions, labels, ks=(5,))


def test_classifier_is_the_renormalized_mean_of_prompt_embeddings(model, tok):
    templates = ["a photo of a {}.", "a blurry drawing of the {}.", lambda c: f"art of {c}s"]
    model.train()
    got = build_zero_shot_classifier(model, tok, CLASSNAMES, templates, batch_size=4)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    expected = []
    with torch.no_grad():
        for c in CLASSNAMES:
            prompts = [t(c) if callable(t) else t.format(c) for t in templates]
            per_template = model.encode_text(tok(prompts))  # (T, E), normalized rows
            assert torch.allclose(per_template.norm(dim=1), torch.ones(3), atol=1e-5)
            expected.append(F.normalize(per_template.mean(0), dim=0))
    expected = torch.stack(expected)  # (C, E)
    assert got.shape == (len(CLASSNAMES), model.config.embed_dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(CLASSNAMES)))
    one_template = build_zero_shot_classifier(model, tok, CLASSNAMES, templates[:1])
    assert (got - one_template).abs().max() > 1e-3  # every template counts
    # Batch boundaries do not matter.
    whole = build_zero_shot_classifier(model, tok, CLASSNAMES, templates)
    torch.testing.assert_close(whole, got, rtol=1e-5, atol=1e-6)
    assert not model.training


def test_encoding_runs_in_eval_mode_without_gradients(model, tok):
    seen = []
    encode_text, encode_image = model.encode_text, model.encode_image

    def spy(encode):
        def wrapped(*args, **kwargs):
            seen.append((model.training, torch.is_grad_enabled()))
            return encode(*args, **kwargs)

        return wrapped

    model.encode_text, model.encode_image = spy(encode_text), spy(encode_image)
    model.train()
    classifier = build_zero_shot_classifier(model, tok, CLASSNAMES[:2], ["a {}"], batch_size=1)
    features = encode_images(model, torch.rand(3, 3, 32, 32), batch_size=2)
    assert seen == [(False, False)] * 4 and model.training
    assert not classifier.requires_grad and not features.requires_grad


def test_encode_images_batches(model):
    images = torch.rand(7, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        expected = model.encode_image(images)  # (7, E)
    model.train()
    labels = torch.arange(7)
    loader = [(images[i : i + 3], labels[i : i + 3]) for i in range(0, 7, 3)]
    for source in (images, list(images.split(2)), loader):
        got = encode_images(model, source, batch_size=3)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.norm(dim=1), torch.ones(7))
    assert model.training
    for bad, error, match in [
        (torch.rand(0, 3, 32, 32), ValueError, "empty"),
        ([], ValueError, "no batches"),
        (torch.rand(2, 32, 32), ValueError, "batch 0"),
        ([torch.zeros(2, 3, 32, 32, dtype=torch.uint8)], ValueError, "float"),
        (["not a tensor"], TypeError, "batch 0"),
        (3, TypeError, "images"),
    ]:
        with pytest.raises(error, match=match):
            encode_images(model, bad)
    with pytest.raises(ValueError, match="batch_size"):
        encode_images(model, images, batch_size=0)


@pytest.mark.parametrize(
    "classnames, templates, error, match",
    [
        ([], ["a {}"], ValueError, "classnames is empty"),
        (["cat"], [], ValueError, "templates is empty"),
        (["cat"], ["a photo"], ValueError, "templates\\[0\\]"),
        (["cat", "dog", "cat"], ["a {}"], ValueError, "duplicates: \\['cat'\\]"),
        ("cat", ["a {}"], TypeError, "classnames"),
        (["cat", 3], ["a {}"], TypeError, "classnames\\[1\\]"),
        (["cat"], ["a {}", 3], TypeError, "templates\\[1\\]"),
        (["cat"], [lambda c: None], TypeError, "must return a str"),
    ],
)
def test_classifier_errors(model, tok, classnames, templates, error, match):
    model.train()
    with pytest.raises(error, match=match):
        build_zero_shot_classifier(model, tok, classnames, templates)
    assert model.training


def test_evaluate_zero_shot_end_to_end(model, tok):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 32, 32, generator=gen)
    labels = torch.randint(len(CLASSNAMES), (12,), generator=gen)
    templates = TEMPLATES[:4]
    result = evaluate_zero_shot(model, tok, images, labels, CLASSNAMES, templates, ks=(1, 2, 5, 9))
    assert list(result) == ["top1", "top2", "top5"]  # 9 > 5 classes: skipped
    assert all(0.0 <= v <= 1.0 for v in result.values()) and result["top5"] == 1.0
    classifier = build_zero_shot_classifier(model, tok, CLASSNAMES, templates)
    scores = encode_images(model, images) @ classifier.T  # (12, 5)
    top1 = (scores.argmax(1) == labels).double().mean().item()
    assert result["top1"] == pytest.approx(top1)
    loader = [(images[i : i + 5], labels[i : i + 5]) for i in range(0, 12, 5)]
    from_loader = evaluate_zero_shot(model, tok, loader, labels, CLASSNAMES, templates, ks=(1, 2))
    assert from_loader == pytest.approx({"top1": result["top1"], "top2": result["top2"]})
    with pytest.raises(ValueError, match="5 classes"):
        evaluate_zero_shot(model, tok, images, labels + 5, CLASSNAMES, templates)
    with pytest.raises(ValueError, match="labels"):
        evaluate_zero_shot(model, tok, images, labels[:5], CLASSNAMES, templates)
