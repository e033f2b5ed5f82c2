"""The public API: argument checking (clear errors before any kernel runs) and its contracts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, LOSS_BACKENDS, assert_close, make_inputs

from fastclip import ClipLoss, SigLipLoss, backends, clip_loss, siglip_loss
from fastclip.reference import clip_loss_reference, siglip_loss_reference

BACKENDS = LOSS_BACKENDS
CALLS = {
    "clip_loss": clip_loss,
    "ClipLoss": ClipLoss(),
    "siglip_loss": siglip_loss,
    "SigLipLoss": SigLipLoss(),
}
# Each loss as (module, function, float64 reference).
LOSSES = {
    "clip": (ClipLoss, clip_loss, clip_loss_reference),
    "siglip": (SigLipLoss, siglip_loss, siglip_loss_reference),
}
each_loss = pytest.mark.parametrize("module, loss, reference", LOSSES.values(), ids=LOSSES.keys())


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch (either backend) fails the test: errors must come before it."""

    def launched(*args, **kwargs):
        raise AssertionError("a kernel ran before the bad argument was rejected")

    for name in ("contrastive_forward", "contrastive_backward", "siglip_forward"):
        monkeypatch.setattr(backends, name, launched)


def features(n=6, dim=8, dtype=torch.float32, device=DEVICE):
    return torch.randn(n, dim, dtype=dtype, device=device)


# Each case: (image_features, text_features, logit_scale, logit_bias) -> (error, match).
# `match` names the offending argument.
BAD_INPUTS = {
    "image-not-tensor": (
        lambda: ([[0.0] * 8] * 6, features(), 1.0, None),
        TypeError,
        "image_features must be a torch.Tensor",
    ),
    "text-not-tensor": (
        lambda: (features(), features().cpu().numpy(), 1.0, None),
        TypeError,
        "text_features must be a torch.Tensor",
    ),
    "image-1d": (
        lambda: (features()[0], features(), 1.0, None),
        ValueError,
        "image_features .*2-D",
    ),
    "text-3d": (
        lambda: (features(), features()[None], 1.0, None),
        ValueError,
        "text_features .*2-D",
    ),
    "image-empty": (
        lambda: (features(0), features(), 1.0, None),
        ValueError,
        "image_features is an empty batch",
    ),
    "text-empty": (
        lambda: (features(), features(0), 1.0, None),
        ValueError,
        "text_features is an empty batch",
    ),
    "zero-width": (
        lambda: (features(dim=0), features(dim=0), 1.0, None),
        ValueError,
        "image_features has zero feature width",
    ),
    "widths-differ": (
        lambda: (features(dim=8), features(dim=9), 1.0, None),
        ValueError,
        "image_features and text_features must have the same feature width",
    ),
    "devices-differ": (
        lambda: (features(), features(device="meta"), 1.0, None),
        ValueError,
        "text_features is on the meta device",
    ),
    "integer-image": (
        lambda: (features().long(), features(), 1.0, None),
        TypeError,
        "image_features must be a floating-point tensor",
    ),
    "integer-text": (
        lambda: (features(), features().int(), 1.0, None),
        TypeError,
        "text_features must be a floating-point tensor",
    ),
    "scale-shape-2": (
        lambda: (features(), features(), torch.ones(2, device=DEVICE), None),
        ValueError,
        "logit_scale must be a scalar",
    ),
    "scale-inf": (
        lambda: (features(), features(), float("inf"), None),
        ValueError,
        "logit_scale must be finite",
    ),
    "scale-nan": (
        lambda: (features(device="cpu"), features(device="cpu"), torch.tensor(float("nan")), None),
        ValueError,
        "logit_scale must be finite",
    ),
    "scale-string": (
        lambda: (features(), features(), "100", None),
        TypeError,
        "logit_scale must be a tensor or a number",
    ),
    "scale-bool": (
        lambda: (features(), features(), True, None),
        TypeError,
        "logit_scale must be a tensor or a number",
    ),
    "scale-integer-tensor": (
        lambda: (features(), features(), torch.tensor(3, device=DEVICE), None),
        TypeError,
        "logit_scale must be a floating-point tensor",
    ),
    "scale-other-device": (
        lambda: (features(), features(), torch.tensor(1.0, device="meta"), None),
        ValueError,
        "logit_scale is on meta",
    ),
    "bias-shape-2": (
        lambda: (features(), features(), 1.0, torch.zeros(2, device=DEVICE)),
        ValueError,
        "logit_bias must be a scalar",
    ),
    "bias-string": (
        lambda: (features(), features(), 1.0, "0"),
        TypeError,
        "logit_bias must be a tensor or a number",
    ),
    "bias-nan": (
        lambda: (features(device="cpu"), features(device="cpu"), 1.0, torch.tensor(float("nan"))),
        ValueError,
        "logit_bias must be finite",
    ),
    "bias-inf": (
        lambda: (features(), features(), 1.0, float("-inf")),
        ValueError,
        "logit_bias must be finite",
    ),
    "all-on-meta": (
        lambda: (features(device="meta"), features(device="meta"), 1.0, None),
        ValueError,
        "image_features is on the meta device",
    ),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_naming_the_argument(no_launch, call, case):
    make_args, error, match = case
    with pytest.raises(error, match=match):
        call(*make_args())


@each_loss
@pytest.mark.parametrize("block_bytes", [0, -5, 2.5, "1M"])
def test_bad_block_bytes(no_launch, module, loss, reference, block_bytes):
    with pytest.raises((TypeError, ValueError), match="block_bytes must be"):
        loss(features(), features(), 1.0, block_bytes=block_bytes)
    with pytest.raises((TypeError, ValueError), match="block_bytes must be"):
        module(block_bytes=block_bytes)


@each_loss
@pytest.mark.parametrize("offset", [-1, 1.0, True, "1", 3])
def test_bad_offset(no_launch, module, loss, reference, offset):
    x, y = features(6), features(8)  # offset 3: image 5 would pair with text 8 of 0..7
    with pytest.raises(ValueError, match="offset"):
        loss(x, y, 1.0, offset=offset)


@each_loss
def test_more_images_than_texts_need_swapping(no_launch, module, loss, reference):
    with pytest.raises(ValueError, match="n_img=6, offset=0, n_txt=5"):
        loss(features(6), features(5), 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0, -1, 3])
def test_negatives_only_has_no_pairs_to_check(backend, offset):
    """A negatives-only block pairs nothing: any shape, and the offset is not looked at."""
    ours, ref = make_inputs(7, 5, 8, seed=6)
    loss = siglip_loss(*ours, offset=offset, negatives_only=True, backend=backend)
    expected = siglip_loss_reference(*ref, offset=None)
    assert_close(loss, expected, torch.float32, "loss")


@each_loss
def test_unknown_backend(no_launch, module, loss, reference):
    with pytest.raises(ValueError, match="backend must be one of"):
        loss(features(), features(), 1.0, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        module(backend="cuda")


@each_loss
def test_triton_backend_rejects_float64(no_launch, module, loss, reference):
    x, y = features(dtype=torch.float64), features(dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='triton' supports float32"):
        loss(x, y, 1.0, backend="triton")
    with pytest.raises(TypeError, match="backend='triton' supports float32"):
        module(backend="triton")(x, y, 1.0, None)


@each_loss
@pytest.mark.parametrize(
    "rank, world_size", [(-1, 2), (2, 2), (5, 2), (0, 0), (0, -1)], ids=lambda v: str(v)
)
def test_constructor_checks_rank(module, loss, reference, rank, world_size):
    with pytest.raises(ValueError, match="rank < world_size"):
        module(rank=rank, world_size=world_size)


@each_loss
@pytest.mark.parametrize("rank, world_size", [(0.5, 2), (0, 2.0), (True, 2)])
def test_constructor_checks_types(module, loss, reference, rank, world_size):
    with pytest.raises(TypeError, match="(rank|world_size) must be an int"):
        module(rank=rank, world_size=world_size)


@pytest.mark.parametrize("dist_impl", ["ring", "BIDIR", 1])
def test_siglip_unknown_dist_impl(dist_impl):
    with pytest.raises(ValueError, match="dist_impl must be one of .*bidir"):
        SigLipLoss(rank=0, world_size=2, dist_impl=dist_impl)


@pytest.mark.parametrize("dist_impl", [None, "bidir", "shift", "reduce", "gather"])
def test_siglip_dist_impls(dist_impl):
    assert SigLipLoss(rank=1, world_size=3, dist_impl=dist_impl).dist_impl == (dist_impl or "bidir")


@each_loss
def test_numpy_scalars_are_numbers(module, loss, reference):
    x, y = features(), features()
    expected = loss(x, y, 2.0, 0.5)
    assert_close(loss(x, y, np.float32(2.0), np.float64(0.5)), expected, torch.float32, "loss")


def test_distributed_cliploss_needs_a_process_group(no_launch):
    loss = ClipLoss(rank=0, world_size=2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        loss(features(), features(), 1.0)
    # Bad features are reported as such, before any collective.
    with pytest.raises(ValueError, match="text_features .*2-D"):
        loss(features(), features()[0], 1.0)


@pytest.mark.filterwarnings("ignore:torch.distributed.nn.functional:FutureWarning")
@pytest.mark.parametrize("dist_impl", ["bidir", "shift", "reduce", "gather"])
def test_distributed_sigliploss_needs_a_process_group(dist_impl):
    # The rank's own block is scored before the first exchange: no ``no_launch`` here.
    loss = SigLipLoss(rank=0, world_size=2, dist_impl=dist_impl, backend="torch")
    with pytest.raises((RuntimeError, ValueError), match="init_process_group"):
        loss(features(), features(), 1.0, None)
    with pytest.raises(ValueError, match="text_features .*2-D"):
        loss(features(), features()[0], 1.0, None)


@each_loss
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_equals_function(module, loss, reference, backend):
    ours, _ = make_inputs(12, 12, 16, seed=1)
    leaves = [t.detach().clone().requires_grad_() for t in ours]
    got = module(backend=backend)(*ours)
    expected = loss(*leaves, backend=backend)
    assert_close(got, expected, torch.float32, "loss")
    got.backward()
    expected.backward()
    for name, a, b in zip(("d_image", "d_text", "d_scale", "d_bias"), ours, leaves, strict=True):
        assert_close(a.grad, b.grad, torch.float32, name)


@each_loss
def test_output_dict(module, loss, reference):
    ours, _ = make_inputs(5, 5, 8)
    out = module(backend="torch")(*ours, output_dict=True)
    assert list(out) == ["contrastive_loss"]
    assert torch.equal(out["contrastive_loss"], loss(*ours, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_square_batch_is_symmetric_cross_entropy(backend):
    (x, y, scale, bias), _ = make_inputs(13, 13, 16, seed=2)
    logits = scale * x @ y.T + bias  # (13, 13), eager fp32
    labels = torch.arange(13, device=DEVICE)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert_close(clip_loss(x, y, scale, bias, backend=backend), expected, torch.float32, "loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_element_scale(backend):
    (x, y, scale, _), _ = make_inputs(9, 11, 16, seed=3)
    scale_1 = scale.detach().reshape(1).requires_grad_()
    loss = clip_loss(x, y, scale_1, offset=2, backend=backend)
    loss.backward()
    assert loss.dim() == 0
    assert scale_1.grad.shape == (1,)
    loss_0 = clip_loss(x, y, scale, offset=2, backend=backend)
    loss_0.backward()
    assert_close(loss, loss_0, torch.float32, "loss")
    assert_close(scale_1.grad, scale.grad.reshape(1), torch.float32, "d_scale")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_shifts_nothing(backend):
    (x, y, scale, _), _ = make_inputs(10, 10, 16, seed=4)
    bias = torch.full((1,), 3.0, device=DEVICE, requires_grad=True)
    with_bias = clip_loss(x, y, scale, bias, backend=backend)
    with_bias.backward()
    assert torch.equal(bias.grad, torch.zeros_like(bias))
    assert_close(with_bias, clip_loss(x, y, scale, backend=backend), torch.float32, "loss")


@each_loss
def test_float64_on_the_torch_backend(module, loss, reference):
    ours, ref = make_inputs(10, 14, 16, dtype=torch.float64, seed=5)
    got = loss(*ours, offset=3, backend="torch")
    assert got.dtype == torch.float64
    expected = reference(*ref, offset=3)
    assert_close(got, expected, torch.float64, "loss")
    got.backward()
    expected.backward()
    for name, a, b in zip(("d_image", "d_text"), ours[:2], ref[:2], strict=True):
        assert a.grad.dtype == torch.float64, name
        assert_close(a.grad, b.grad, torch.float64, name)
    # Scale and bias are fp32 (as model parameters would be): their gradients are fp32 too.
    for name, a, b in zip(("d_scale", "d_bias"), ours[2:], ref[2:], strict=True):
        assert a.grad.dtype == torch.float32, name
        assert_close(a.grad, b.grad, torch.float32, name)


MIXED = [
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float16),
    (torch.float32, torch.float64),
]


@each_loss
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", MIXED, ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_two_dtypes_follow_type_promotion(module, loss, reference, backend, dtypes):
    """One tower in bf16, the other in fp32 (say): both compute in the promoted dtype, the loss
    is that of the features cast to it, and each gradient comes back in its tensor's dtype."""
    promoted = torch.promote_types(*dtypes)
    if promoted == torch.float64 and backend != "torch":
        pytest.skip("float64 runs on the torch backend only")
    (x, y, scale, bias), _ = make_inputs(9, 11, 16, seed=7)
    mixed = [x.detach().to(dtypes[0]).requires_grad_(), y.detach().to(dtypes[1]).requires_grad_()]
    cast = [t.detach().to(promoted).requires_grad_() for t in mixed]
    got = module(backend=backend)(*mixed, scale, bias)
    expected = loss(*cast, scale, bias, backend=backend)
    assert torch.equal(got, expected)
    got.backward()
    expected.backward()
    for name, a, b in zip(("d_image", "d_text"), mixed, cast, strict=True):
        assert a.grad.dtype == a.dtype, name
        assert torch.equal(a.grad, b.grad.to(a.dtype)), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_one_element_scale_and_bias(backend):
    (x, y, scale, bias), _ = make_inputs(9, 11, 16, seed=3)
    params = [t.detach().reshape(1).requires_grad_() for t in (scale, bias)]
    loss = siglip_loss(x, y, *params, offset=2, backend=backend)
    loss.backward()
    assert loss.dim() == 0
    loss_0 = siglip_loss(x, y, scale, bias, offset=2, backend=backend)
    loss_0.backward()
    assert_close(loss, loss_0, torch.float32, "loss")
    for name, a, b in zip(("d_scale", "d_bias"), params, (scale, bias), strict=True):
        assert a.grad.shape == (1,), name
        assert_close(a.grad, b.grad.reshape(1), torch.float32, name)
