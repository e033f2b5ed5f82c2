"""The CLIP model: presets, towers, pooling, long text, gradient checkpointing, autocast."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import CUDA

import fastclip
from fastclip.model import CLIP, PRESETS, CLIPConfig

TINY_RESNET = dict(vision_layers=(1, 2, 1, 1), vision_width=16, vision_heads=4, proj_bias=True)


def tokens_for(model: CLIP, lengths: list[int], width: int | None = None, seed: int = 0):
    """[sot, random ids, eot, pad...] rows with `lengths` content tokens each."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    width = width or c.context_length
    rows = torch.full((len(lengths), width), c.pad_token_id)
    for i, n in enumerate(lengths):
        rows[i, 0], rows[i, n + 1] = c.sot_token_id, c.eot_token_id
        rows[i, 1 : n + 1] = torch.randint(0, c.sot_token_id, (n,), generator=g)
    return rows


def images_for(model: CLIP, n: int, seed: int = 0):
    size = model.config.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CLIP("tiny").eval()


@pytest.mark.parametrize(
    "name, millions",
    [("RN50", 102.01), ("ViT-B-32", 151.28), ("ViT-B-16", 149.62), ("ViT-L-14", 427.62)],
)
def test_presets_have_the_published_sizes(name, millions):
    with torch.device("meta"):
        model = CLIP(name)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)


def test_initialization():
    torch.manual_seed(0)
    model = CLIP("ViT-B-32", vision_layers=2, text_layers=2)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    block, width = model.text.transformer.blocks[0], 512
    assert block.attn.qkv.weight.std().item() == pytest.approx(width**-0.5, rel=0.02)
    assert block.attn.out.weight.std().item() == pytest.approx(width**-0.5 / 2, rel=0.02)
    assert block.mlp.fc.weight.std().item() == pytest.approx((2 * width) ** -0.5, rel=0.02)
    assert model.text.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.text_proj.weight.std().item() == pytest.approx(width**-0.5, rel=0.02)
    assert torch.all(block.attn.qkv.bias == 0)


def test_forward_plugs_into_clip_loss(tiny):
    images, tokens = images_for(tiny, 6), tokens_for(tiny, [3, 0, 30, 7, 12, 1])
    image_features, text_features, scale = tiny(images, tokens)
    assert image_features.shape == text_features.shape == (6, 64)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(6))
    loss = fastclip.ClipLoss()(image_features, text_features, scale)
    logits = scale * image_features @ text_features.T
    labels = torch.arange(6)
    eager = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(loss, eager)
    loss.backward()
    for name, p in tiny.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    tiny.zero_grad(set_to_none=True)


def test_raw_features_are_the_unnormalized_projection(tiny):
    images = images_for(tiny, 2)
    raw = tiny.encode_image(images, normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(F.normalize(raw, dim=-1), tiny.encode_image(images))


def test_logit_bias_gives_siglip_outputs():
    model = CLIP("tiny", logit_scale_init=math.log(10), logit_bias_init=-10.0)
    *features, scale, bias = model(images_for(model, 4), tokens_for(model, [1, 2, 3, 4]))
    assert scale.item() == pytest.approx(10) and bias.item() == -10
    fastclip.SigLipLoss()(*features, scale, bias).backward()
    assert model.logit_bias.grad is not None


def test_text_is_read_at_the_first_end_of_text(tiny):
    tokens = tokens_for(tiny, [5, 9])
    after = tokens.clone()
    after[:, 12:] = torch.randint(0, 1000, (2, tiny.config.context_length - 12))  # after the eots
    torch.testing.assert_close(tiny.encode_text(after), tiny.encode_text(tokens))
    before = tokens.clone()
    before[0, 3] += 1  # a token before the first eot changes its row only
    diff = (tiny.encode_text(before) - tiny.encode_text(tokens)).abs().sum(dim=-1)
    assert diff[0] > 1e-4 and diff[1] == 0
    # Shorter inputs than the context give the same features (the attention is causal).
    torch.testing.assert_close(tiny.encode_text(tokens[:, :11]), tiny.encode_text(tokens))


def test_embeddings_replace_the_token_embeddings(tiny):
    tokens = tokens_for(tiny, [4, 7])
    embeddings = tiny.text.token_embedding(tokens)
    torch.testing.assert_close(
        tiny.encode_text(tokens, embeddings=embeddings), tiny.encode_text(tokens)
    )
    embeddings = embeddings.detach().clone().requires_grad_()
    with torch.no_grad():
        shifted = embeddings.clone()
        shifted[:, 2] += 1.0  # a learned context vector in place of token 2
    assert not torch.allclose(
        tiny.encode_text(tokens, embeddings=shifted), tiny.encode_text(tokens)
    )
    tiny.encode_text(tokens, embeddings=embeddings).sum().backward()
    assert embeddings.grad[:, 2].abs().sum() > 0
    with pytest.raises(ValueError, match="embeddings must have shape"):
        tiny.encode_text(tokens, embeddings=embeddings[:, :5])


def test_long_text_strategies(tiny):
    c = tiny.config
    window = c.context_length - 2  # 30 content tokens per piece
    tokens = tokens_for(tiny, [75, 10, 30], width=80)
    pieces = {}
    for strategy in ("truncate", "chunk_mean", "sliding"):
        got, owner = tiny._split_long(tokens, strategy, None)
        assert got.shape[1] == c.context_length
        assert torch.all(got[:, 0] == c.sot_token_id)
        pieces[strategy] = (got, owner)
    # Truncation keeps the first 30 tokens and closes them with eot.
    got, owner = pieces["truncate"]
    assert owner.tolist() == [0, 1, 2]
    assert got[0, 1:31].tolist() == tokens[0, 1:31].tolist() and got[0, 31] == c.eot_token_id
    truncated = tiny.encode_text(tokens, long_text="truncate")
    torch.testing.assert_close(truncated, tiny.encode_text(got))
    # Chunks: 75 tokens -> 30 + 30 + 15; short rows are one chunk, as if encoded alone.
    got, owner = pieces["chunk_mean"]
    assert owner.tolist() == [0, 0, 0, 1, 2]
    assert got[2, 1:16].tolist() == tokens[0, 61:76].tolist() and got[2, 16] == c.eot_token_id
    expected = F.normalize(tiny.encode_text(got[:3]).mean(0), dim=-1)
    chunked = tiny.encode_text(tokens, long_text="chunk_mean")
    torch.testing.assert_close(chunked[0], expected)
    torch.testing.assert_close(chunked[1:], truncated[1:])
    raw = tiny.encode_text(tokens, long_text="chunk_mean", normalize=False)
    assert raw[0].norm() < 1 and torch.allclose(F.normalize(raw, dim=-1), chunked)
    # Sliding windows of 30 every 10 tokens; the last one ends at the text's end.
    got, owner = tiny._split_long(tokens, "sliding", 10)
    starts = [0, 10, 20, 30, 40, 45]
    assert owner.tolist() == [0] * len(starts) + [1, 2]
    for i, s in enumerate(starts):
        assert got[i, 1 : window + 1].tolist() == tokens[0, 1 + s : 1 + s + window].tolist()
    sliding = tiny.encode_text(tokens, long_text="sliding", stride=10)
    torch.testing.assert_close(sliding[0], F.normalize(tiny.encode_text(got[:6]).mean(0), dim=-1))
    default, _ = pieces["sliding"]  # stride: half a window
    assert len(default) == len([0, 15, 30, 45]) + 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(long_text="middle"), "long_text must be one of"),
        (dict(long_text="chunk_mean", stride=4), "stride"),
        (dict(long_text="sliding", stride=0), "stride"),
    ],
)
def test_bad_long_text_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny.encode_text(tokens_for(tiny, [40], width=50), **kwargs)


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="images must have shape"):
        tiny.encode_image(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="tokens must be"):
        tiny.encode_text(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="activation"):
        CLIPConfig(activation="relu")
    with pytest.raises(ValueError, match="patch_size"):
        CLIPConfig(image_size=100)
    with pytest.raises(ValueError, match="heads"):
        CLIPConfig(text_heads=7)
    with pytest.raises(ValueError, match="vision_layers"):
        CLIPConfig(vision_layers=(3, 4, 6))
    with pytest.raises(ValueError, match="unknown CLIPConfig fields"):
        CLIPConfig.from_dict({"widht": 3})


def test_config_round_trips_through_a_dict():
    for config in PRESETS.values():
        assert CLIPConfig.from_dict(config.to_dict()) == config


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = CLIP("tiny")
    images, tokens = images_for(model, 4), tokens_for(model, [2, 4, 6, 8])
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enabled)
        fastclip.ClipLoss()(*model(images, tokens)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_bf16_autocast_stays_close_to_fp32(tiny):
    images, tokens = images_for(tiny, 4), tokens_for(tiny, [2, 4, 6, 8])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = tiny(images, tokens)
    for ours, ref in zip(low[:2], tiny(images, tokens)[:2], strict=True):
        assert torch.isfinite(ours).all()
        assert (ours.float() - ref).abs().max() < 0.05


def test_a_bf16_model_runs(tiny):
    """Weights cast to bf16 (inference), LayerNorm still in fp32."""
    images, tokens = images_for(tiny, 4), tokens_for(tiny, [2, 4, 6, 8])
    low = copy.deepcopy(tiny).to(torch.bfloat16)
    for ours, ref in zip(low(images, tokens)[:2], tiny(images, tokens)[:2], strict=True):
        assert ours.dtype == torch.bfloat16
        assert (ours.float() - ref).abs().max() < 0.05


def test_compiles_without_graph_breaks(tiny):
    images, tokens = images_for(tiny, 2), tokens_for(tiny, [3, 5])
    compiled = torch.compile(tiny, fullgraph=True, backend="aot_eager")
    for ours, ref in zip(compiled(images, tokens), tiny(images, tokens), strict=True):
        torch.testing.assert_close(ours, ref)


def test_resnet_attention_pool_matches_multi_head_attention():
    """The pool against PyTorch's own multi-head attention, the way OpenAI's code calls it."""
    torch.manual_seed(0)
    model = CLIP("tiny", **TINY_RESNET).eval()
    pool = model.visual.attnpool
    x = torch.randn(2, 512, 1, 1)  # (B, C, h, w): 32x32 images end in a 1x1 map
    seq = x.flatten(2).permute(2, 0, 1)  # (h·w, B, C)
    seq = torch.cat([seq.mean(dim=0, keepdim=True), seq]) + pool.positional_embedding[:, None]
    ref, _ = F.multi_head_attention_forward(
        query=seq[:1], key=seq, value=seq, embed_dim_to_check=512, num_heads=pool.heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=torch.eye(512), out_proj_bias=torch.zeros(512),
        use_separate_proj_weight=True, training=False, need_weights=False,
    )  # fmt: skip
    torch.testing.assert_close(pool(x), ref[0])


def test_resnet_tower_end_to_end():
    torch.manual_seed(0)
    model = CLIP("tiny", **TINY_RESNET, image_size=64)
    assert [len(stage) for stage in (model.visual.layer1, model.visual.layer2)] == [1, 2]
    assert model.visual.layer1[0].downsample is not None  # 16 -> 64 channels
    assert model.visual.layer2[1].downsample is None
    features = model.encode_image(images_for(model, 3))
    assert features.shape == (3, 64)
    model.encode_image(images_for(model, 3)).sum().backward()
    assert model.visual.conv1.weight.grad is not None


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_training_step_on_cuda_under_autocast():
    torch.manual_seed(0)
    model = CLIP("tiny").cuda()
    images, tokens = images_for(model, 8).cuda(), tokens_for(model, list(range(1, 9))).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fastclip.ClipLoss()(*model(images, tokens))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    compiled = torch.compile(model)  # the Triton heads and loss inside a compiled model
    with torch.autocast("cuda", dtype=torch.bfloat16):
        again = fastclip.ClipLoss()(*compiled(images, tokens))
    torch.testing.assert_close(again, loss, atol=2e-2, rtol=2e-2)
