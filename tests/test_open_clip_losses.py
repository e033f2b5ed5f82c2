"""fastclip's ClipLoss and SigLipLoss against open_clip's (open_clip_torch 3.3.0, the contract):
the same constructor, methods and signatures; for every combination of the constructors'
arguments the same attributes, ``get_ground_truth`` and ``get_logits``, and the same loss and
gradients, on one process and across gloo ranks.

open_clip's package imports torchvision on import; its loss module needs only torch, so it is
loaded on its own, by file path. Two differences are by design (the losses' docstrings): a
16-bit loss comes back in fp32, and the global logits across ranks carry the bias once, where
open_clip 3.3's in-place additions through the transpose add it twice.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools

import pytest
import torch
from dist_helpers import results_of, run_on_ranks
from helpers import CUDA, DEVICE, LOSS_BACKENDS, assert_close
from open_clip_code import OPEN_CLIP_INSTALL, open_clip_files

import fastclip
from fastclip import ClipLoss


def load_open_clip_losses():
    """open_clip's ``loss.py`` as a module of its own (None where open_clip is not installed)."""
    folder = open_clip_files()
    if folder is None:
        return None
    path = folder / "loss.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


oc = load_open_clip_losses()
pytestmark = [
    pytest.mark.skipif(oc is None, reason=f"open_clip is not installed: {OPEN_CLIP_INSTALL}"),
    pytest.mark.filterwarnings("ignore:torch.distributed.nn.functional:FutureWarning"),
]

N, DIM = 6, 16
LOSS_CLASSES = ("ClipLoss", "SigLipLoss")
DIST_IMPLS = (None, "bidir", "shift", "reduce", "gather")
FLAGS = ("local_loss", "gather_with_grad", "cache_labels")
# Every combination of the constructors' arguments on one process.
CASES = [
    ("ClipLoss", dict(zip(FLAGS, f, strict=True))) for f in itertools.product([0, 1], repeat=3)
]
CASES += [
    ("SigLipLoss", {"cache_labels": bool(c), "dist_impl": d})
    for c, d in itertools.product([0, 1], DIST_IMPLS)
]
CASES = [
    (name, {k: v if k == "dist_impl" else bool(v) for k, v in kw.items()}) for name, kw in CASES
]
# Scale and bias as a model gives them (tensors), as numbers, and without a bias.
PARAMS = {
    "tensors": (torch.tensor(8.0), torch.tensor(-2.0)),
    "numbers": (8.0, -2.0),
    "no-bias": (8.0, None),
}


def case_id(case) -> str:
    name, kw = case
    return name + "".join(f"-{k}={v}" for k, v in kw.items())


def both(name: str, **kw):
    """open_clip's loss and fastclip's, built from the same arguments."""
    return getattr(oc, name)(**kw), getattr(fastclip, name)(**kw, backend="torch")


def features(dtype=torch.float32, seed=0, n=N):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, n, DIM, generator=gen, dtype=torch.float64)
    x, y = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    return x.to(DEVICE, dtype), y.to(DEVICE, dtype)


def loss_and_grads(loss_fn, x, y, scale, bias):
    """The loss (open_clip's SigLipLoss takes the bias positionally) and d(x, y, scale)."""
    leaves = [t.detach().clone().to(DEVICE).requires_grad_() for t in (x, y, scale)]
    loss = loss_fn(*leaves, bias)
    loss.float().backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("method", ["__init__", "forward", "get_logits", "get_ground_truth"])
@pytest.mark.parametrize("name", LOSS_CLASSES)
def test_same_signatures(name, method):
    """open_clip's parameters come first, in its order, with its defaults; fastclip's own
    (backend, block_bytes, config) are keyword-only after them."""
    theirs = inspect.signature(getattr(getattr(oc, name), method)).parameters
    ours = inspect.signature(getattr(getattr(fastclip, name), method)).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for p in theirs:
        assert ours[p].default == theirs[p].default, p
        assert ours[p].kind == theirs[p].kind, p
    assert all(ours[p].kind == inspect.Parameter.KEYWORD_ONLY for p in list(ours)[len(theirs) :])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_same_attributes_and_ground_truth(case):
    name, kw = case
    theirs, ours = both(name, **kw)
    attributes = ["cache_labels", "rank", "world_size", "prev_num_logits", "labels"]
    if name == "ClipLoss":
        attributes += ["local_loss", "gather_with_grad", "use_horovod"]
    else:
        attributes += ["dist_impl"]
    for attribute in attributes:
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    calls = [(n,) for n in (5, 5, 3)]  # a cached call, then a new size
    if name == "SigLipLoss":
        dtypes = (torch.float32, torch.bfloat16)
        calls = [(dtype, n, neg) for n, dtype, neg in itertools.product((5, 3), dtypes, (0, 1))]
    for call in calls:
        expected = theirs.get_ground_truth(DEVICE, *call)
        got = ours.get_ground_truth(DEVICE, *call)
        assert got.dtype == expected.dtype and torch.equal(got, expected), call
    assert ours.prev_num_logits == theirs.prev_num_logits
    assert ours.labels.keys() == theirs.labels.keys()
    assert all(torch.equal(ours.labels[d], theirs.labels[d]) for d in theirs.labels)


def as_list(logits) -> list[torch.Tensor]:
    """ClipLoss's pair of logits or SigLipLoss's one matrix, as a list."""
    return list(logits) if isinstance(logits, tuple) else [logits]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("params", PARAMS.values(), ids=PARAMS.keys())
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_same_logits_and_loss(case, params, dtype):
    """get_logits exactly; the loss and its gradients within the dtype's tolerance (open_clip
    rounds 16-bit logits; fastclip computes in fp32 and returns an fp32 loss)."""
    name, kw = case
    theirs, ours = both(name, **kw)
    x, y = features(dtype)
    scale, bias = params
    expected, got = theirs.get_logits(x, y, scale, bias), ours.get_logits(x, y, scale, bias)
    for e, g in zip(as_list(expected), as_list(got), strict=True):
        assert g.dtype == e.dtype and torch.equal(g, e)
    check_loss(theirs, ours, x, y, torch.as_tensor(scale, device=DEVICE), bias, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("name", LOSS_CLASSES)
def test_same_loss_on_every_backend(name, backend, dtype):
    if dtype == torch.bfloat16 and backend != "torch" and not CUDA:
        pytest.skip("Triton's CPU interpreter miscomputes bf16 kernels (they are tested on CUDA)")
    theirs, ours = getattr(oc, name)(), getattr(fastclip, name)(backend=backend)
    x, y = features(dtype, seed=1)
    check_loss(
        theirs,
        ours,
        x,
        y,
        torch.tensor(8.0, device=DEVICE),
        torch.tensor(-2.0, device=DEVICE),
        dtype,
    )


def check_loss(theirs, ours, x, y, scale, bias, dtype):
    """The same loss (fp32 for 16-bit features on fastclip's side), gradients and output_dict."""
    expected, expected_grads = loss_and_grads(theirs, x, y, scale, bias)
    got, grads = loss_and_grads(ours, x, y, scale, bias)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got, expected, dtype, "loss")
    for what, g, e in zip(("d_image", "d_text", "d_scale"), grads, expected_grads, strict=True):
        assert g.dtype == e.dtype, what
        assert_close(g, e, dtype, what)
    keys = ours(x, y, scale, bias, output_dict=True).keys()
    assert keys == theirs(x, y, scale, bias, output_dict=True).keys()


def test_horovod_is_refused():
    assert ClipLoss(use_horovod=False).use_horovod is False
    with pytest.raises(ValueError, match="use_horovod=True is not supported"):
        ClipLoss(use_horovod=True)


# ----------------------------------------------------------------------------------------------
# Across ranks

WORLD = 2
DIST_CASES = [
    ("ClipLoss", (("local_loss", local), ("gather_with_grad", grad), ("cache_labels", True)))
    for local, grad in itertools.product([False, True], repeat=2)
]
DIST_CASES += [("SigLipLoss", (("dist_impl", d),)) for d in DIST_IMPLS[1:]]
DIST_CASES = [(*case, backend) for case in DIST_CASES for backend in ("torch", "blocks")]


def dist_case_id(case) -> str:
    name, kw, backend = case
    return case_id((name, dict(kw))) + f"-{backend}"


def _run_rank(rank, world_size, case, image, text):
    """One rank: both losses' get_logits, get_ground_truth, loss and gradients on its slice."""
    name, kw, backend = case
    kw = {**dict(kw), "rank": rank, "world_size": world_size}
    open_clip_loss = getattr(load_open_clip_losses(), name)(**kw)
    fastclip_loss = getattr(fastclip, name)(**kw, backend=backend)
    rows = slice(rank * N, (rank + 1) * N)
    x, y, scale, bias = image[rows], text[rows], torch.tensor(8.0), torch.tensor(-2.0)
    out = {}
    for who, loss_fn in (("theirs", open_clip_loss), ("ours", fastclip_loss)):
        if name == "ClipLoss":
            logits = loss_fn.get_logits(x, y, scale)  # no bias: open_clip adds it twice to one
            labels = loss_fn.get_ground_truth(x.device, logits[0].shape[0])
        else:
            logits = (loss_fn.get_logits(x, y, scale, bias),)
            labels = loss_fn.get_ground_truth(x.device, x.dtype, N)
        loss, grads = loss_and_grads(loss_fn, x, y, scale, bias)
        logits = [t.detach() for t in logits]
        out[who] = {"logits": logits, "labels": labels, "loss": loss, "grads": grads}
    if name == "ClipLoss":
        with_bias = fastclip_loss.get_logits(x, y, scale, bias)
        logits = out["ours"]["logits"]
        out["bias_once"] = [(b - t).detach() for b, t in zip(with_bias, logits, strict=True)]
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    gen = torch.Generator().manual_seed(1)
    image, text = torch.randn(2, WORLD * N, DIM, generator=gen)
    image, text = image / image.norm(dim=1, keepdim=True), text / text.norm(dim=1, keepdim=True)
    return run_on_ranks(_run_rank, DIST_CASES, WORLD, (image, text), tmp_path_factory.mktemp("oc"))


@pytest.mark.distributed
@pytest.mark.parametrize("case", DIST_CASES, ids=dist_case_id)
def test_same_across_ranks(ranks, case):
    """Each rank's logits and labels exactly, its loss and gradients within fp32's tolerance;
    ClipLoss's logits with the bias, the bias added once."""
    for rank, result in enumerate(results_of(ranks, case)):
        theirs, ours = result["theirs"], result["ours"]
        for e, g in zip(theirs["logits"], ours["logits"], strict=True):
            assert torch.equal(g, e), f"rank {rank}: logits"
        assert torch.equal(ours["labels"], theirs["labels"]), f"rank {rank}: labels"
        assert_close(ours["loss"], theirs["loss"], torch.float32, f"rank {rank}: loss")
        names = ("d_image", "d_text", "d_scale")
        for what, g, e in zip(names, ours["grads"], theirs["grads"], strict=True):
            assert_close(g, e, torch.float32, f"rank {rank}: {what}")
        for shift in result.get("bias_once", []):
            assert_close(shift, torch.full_like(shift, -2.0), torch.float32, f"rank {rank}: bias")
