"""A compact CLIP: a Vision Transformer (or the paper's modified ResNet) and a causal text
Transformer, each ending in a fused normalized projection into one embedding space.

    image (B, 3, H, W) -> visual -> (B, width) -> proj -> normalize -> image_features (B, E)
    tokens (B, T)      -> text   -> (B, width) -> proj -> normalize -> text_features  (B, E)
    forward -> (image_features, text_features, logit_scale.exp()), which fastclip.ClipLoss takes

Weights follow OpenAI's layout closely (``fastclip.checkpoint`` maps OpenAI, open_clip and
Hugging Face checkpoints onto it). Attention runs through ``F.scaled_dot_product_attention``
(flash attention on GPU); LayerNorm computes in fp32 so bf16 autocast stays stable.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastclip.projection import NormalizedLinear

LONG_TEXT = ("truncate", "chunk_mean", "sliding")
POSITIVE_FIELDS = (
    "embed_dim", "image_size", "vision_width", "vision_heads", "patch_size", "context_length",
    "vocab_size", "text_width", "text_heads", "text_layers",
)  # fmt: skip


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int = 512  # width of the shared image-text embedding space
    # Image tower. vision_layers: an int is a ViT's depth; a 4-tuple the ResNet's blocks per stage.
    image_size: int = 224
    vision_layers: int | tuple[int, int, int, int] = 12
    vision_width: int = 768  # ViT: token width; ResNet: channels of the first stage
    vision_heads: int = 12  # ViT: width // 64; ResNet: attention pool's heads, width * 32 // 64
    patch_size: int = 32  # ViT only
    # Text tower.
    context_length: int = 77  # positions of the text transformer
    vocab_size: int = 49408  # CLIP's BPE vocabulary
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    sot_token_id: int = 49406  # start of text
    eot_token_id: int = 49407  # end of text: the text feature is read at its first occurrence
    pad_token_id: int = 0  # OpenAI pads with 0; Hugging Face tokenizers pad with eot
    # Both towers.
    mlp_ratio: float = 4.0  # hidden width of the MLPs over the residual width
    activation: str = "gelu"  # "quick_gelu" for OpenAI's weights
    layer_norm_eps: float = 1e-5
    proj_bias: bool = False  # the ResNet's projection (OpenAI's attnpool.c_proj) has a bias
    logit_scale_init: float = math.log(1 / 0.07)  # logit_scale = exp(this) at initialization
    logit_bias_init: float | None = None  # a learned logit bias (SigLIP, e.g. -10); None: none

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}"
            )
        for name in POSITIVE_FIELDS:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.resnet:
            if len(self.vision_layers) != 4 or min(self.vision_layers) < 1:
                raise ValueError(
                    f"vision_layers must be an int or 4 block counts, got {self.vision_layers}"
                )
            if self.image_size % 32:
                raise ValueError(
                    f"a ResNet needs image_size divisible by 32, got {self.image_size}"
                )
        elif self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        widths = {
            "vision_width": self.vision_width * (32 if self.resnet else 1),
            "text_width": self.text_width,
        }
        heads = {"vision_width": self.vision_heads, "text_width": self.text_heads}
        for name, width in widths.items():
            if width % heads[name]:
                raise ValueError(
                    f"{name} ({width}) is not divisible by its number of heads ({heads[name]})"
                )

    @property
    def resnet(self) -> bool:
        return not isinstance(self.vision_layers, int)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, values: dict) -> CLIPConfig:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown CLIPConfig fields: {sorted(unknown)}")
        layers = values.get("vision_layers", 12)
        return cls(
            **{**values, "vision_layers": layers if isinstance(layers, int) else tuple(layers)}
        )


PRESETS = {
    # Trains on a CPU in minutes; pairs with a small BPE trained on the captions.
    "tiny": CLIPConfig(
        embed_dim=64, image_size=32, vision_layers=2, vision_width=64, vision_heads=2, patch_size=8,
        context_length=32, vocab_size=1024, text_width=64, text_heads=2, text_layers=2,
        sot_token_id=1022, eot_token_id=1023,
    ),
    # The CLIP paper's models (open_clip's names); OpenAI's weights use QuickGELU.
    "RN50": CLIPConfig(
        embed_dim=1024, vision_layers=(3, 4, 6, 3), vision_width=64, vision_heads=32, proj_bias=True
    ),
    "ViT-B-32": CLIPConfig(),
    "ViT-B-16": CLIPConfig(patch_size=16),
    "ViT-L-14": CLIPConfig(embed_dim=768, vision_layers=24, vision_width=1024, vision_heads=16,
                           patch_size=14, text_width=768, text_heads=12),
}  # fmt: skip


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and returned in the input's dtype (stable under bf16/fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.float(), self.bias.float()  # a bf16/fp16 model's too
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention, q/k/v from one fused projection (OpenAI's in_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, heads, T, C / heads)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.act = ACTIVATIONS[activation]()
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, config: CLIPConfig):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=config.layer_norm_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = MLP(width, round(width * config.mlp_ratio), config.activation)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, config: CLIPConfig, causal: bool):
        super().__init__()
        self.causal = causal
        self.blocks = nn.ModuleList(Block(width, heads, config) for _ in range(layers))
        self.grad_checkpointing = False
        # CLIP's initialization (HF applies it to both towers): std shrinks with width and depth.
        attn_std, proj_std = width**-0.5, width**-0.5 * (2 * layers) ** -0.5
        for block in self.blocks:
            stds = {"attn.qkv": attn_std, "attn.out": proj_std, "mlp.fc": (2 * width) ** -0.5,
                    "mlp.proj": proj_std}  # fmt: skip
            for name, std in stds.items():
                nn.init.normal_(block.get_submodule(name).weight, std=std)
                nn.init.zeros_(block.get_submodule(name).bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, self.causal, use_reentrant=False)
            else:
                x = block(x, self.causal)
        return x


class VisionTransformer(nn.Module):
    """Patches -> [class token, patches] + positions -> ln_pre -> blocks -> ln_post(class token)."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        width, patch = config.vision_width, config.patch_size
        grid = config.image_size // patch
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(width**-0.5 * torch.randn(width))
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width, eps=config.layer_norm_eps)
        self.transformer = Transformer(
            width, config.vision_layers, config.vision_heads, config, False
        )
        self.ln_post = LayerNorm(width, eps=config.layer_norm_eps)
        self.output_width = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (
            self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        )  # (B, grid², width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(
            x.dtype
        )  # (B, 1 + grid², width)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0])  # (B, width)


class Bottleneck(nn.Module):
    """ResNet bottleneck with anti-aliased strides: an average pool before the stride-1 conv3
    and the downsample's conv, instead of strided convolutions."""

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = (
            nn.Conv2d(planes, 4 * planes, 1, bias=False),
            nn.BatchNorm2d(4 * planes),
        )
        nn.init.zeros_(self.bn3.weight)  # each block starts as the identity
        self.downsample = None
        if stride > 1 or inplanes != 4 * planes:  # OpenAI's names: "-1" pool, "0" conv, "1" norm
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                ("0", nn.Conv2d(inplanes, 4 * planes, 1, bias=False)),
                ("1", nn.BatchNorm2d(4 * planes)),
            ]))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.avgpool(F.relu(self.bn2(self.conv2(y))))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class AttentionPool(nn.Module):
    """The mean of the feature map, as a query, attends over [mean, positions] (+ positional
    embeddings); one token out instead of global average pooling. OpenAI's output projection
    (``attnpool.c_proj``) is the model's ``visual_proj`` head."""

    def __init__(self, grid: int, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(grid * grid + 1, width))
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        for linear in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(linear.weight, std=width**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # (B, h·w, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(
            x.dtype
        )
        B, T, C = x.shape
        heads = lambda t: t.view(B, t.shape[1], self.heads, C // self.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(
            heads(self.q_proj(x[:, :1])), heads(self.k_proj(x)), heads(self.v_proj(x))
        )
        return y.reshape(B, C)  # one query per head: (B, heads, 1, C / heads) -> (B, C)


class ModifiedResNet(nn.Module):
    """The CLIP paper's ResNet: a 3-conv stem with an average pool, anti-aliased bottleneck
    stages, and attention pooling in place of global average pooling."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        width, stem = config.vision_width, config.vision_width // 2
        self.conv1, self.bn1 = (
            nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem),
        )
        self.conv2, self.bn2 = nn.Conv2d(stem, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem)
        self.conv3, self.bn3 = (
            nn.Conv2d(stem, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )
        self.avgpool = nn.AvgPool2d(2)
        inplanes, stages = width, []
        for i, blocks in enumerate(config.vision_layers):
            planes = width * 2**i
            stride = 2 if i > 0 else 1  # the first block of each later stage halves the map
            stage = [Bottleneck(inplanes, planes, stride)]
            stage += [Bottleneck(4 * planes, planes, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            inplanes = 4 * planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.output_width = 32 * width
        self.attnpool = AttentionPool(
            config.image_size // 32, self.output_width, config.vision_heads
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.conv1.weight.dtype)
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.avgpool(x)))))  # (B, C, h, w)
        return self.attnpool(x)  # (B, C)


class TextTransformer(nn.Module):
    """Tokens + positions -> causal blocks -> ln_final, read at each row's first end-of-text."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        width = config.text_width
        self.eot_token_id = config.eot_token_id
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(config.context_length, width))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.transformer = Transformer(width, config.text_layers, config.text_heads, config, True)
        self.ln_final = LayerNorm(width, eps=config.layer_norm_eps)
        self.output_width = width

    def forward(self, tokens: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> (B, width). ``embeddings`` (B, T, width), if given, replace the token
        embeddings (learned prompts); the tokens still locate each row's end of text."""
        T = tokens.shape[1]
        x = self.token_embedding(tokens) if embeddings is None else embeddings
        x = x + self.positional_embedding[:T]  # (B, T, width)
        x = self.ln_final(self.transformer(x))
        # The first end-of-text (argmax returns the first maximum); the last token if none.
        is_eot = tokens == self.eot_token_id
        last = torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1), T - 1)
        return x[torch.arange(x.shape[0], device=x.device), last]  # (B, width)


class CLIP(nn.Module):
    """Image and text towers with normalized projection heads and a learned temperature.

    ``forward(images, tokens)`` returns ``(image_features, text_features, logit_scale.exp())``
    (and ``logit_bias`` when the config has one), as open_clip's models do, so
    ``fastclip.ClipLoss()(*model(images, tokens))`` is a training step's loss.
    """

    def __init__(self, config: CLIPConfig | str = "ViT-B-32", **overrides):
        super().__init__()
        config = PRESETS[config] if isinstance(config, str) else config
        self.config = config = replace(config, **overrides)
        self.visual = ModifiedResNet(config) if config.resnet else VisionTransformer(config)
        self.text = TextTransformer(config)
        self.visual_proj = NormalizedLinear(
            self.visual.output_width, config.embed_dim, bias=config.proj_bias
        )
        self.text_proj = NormalizedLinear(config.text_width, config.embed_dim, bias=False)
        for head in (self.visual_proj, self.text_proj):
            nn.init.normal_(head.weight, std=head.in_features**-0.5)
            if head.bias is not None:
                nn.init.zeros_(head.bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.logit_bias = None
        if config.logit_bias_init is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init)))

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each transformer block in backward instead of storing its activations."""
        for tower in (self.visual, self.text):
            if hasattr(tower, "transformer"):
                tower.transformer.grad_checkpointing = enabled

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, image_size, image_size) preprocessed images -> (B, embed_dim) features."""
        expected = (3, self.config.image_size, self.config.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(images.shape)}"
            )
        return _project(self.visual_proj, self.visual(images), normalize)

    def encode_text(
        self,
        tokens: torch.Tensor,
        normalize: bool = True,
        *,
        long_text: str = "truncate",
        stride: int | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) token ids ([sot, ..., eot, pad...]) -> (B, embed_dim) features.

        T up to ``context_length`` encodes as is. Longer rows (a tokenizer called with
        ``context_length=None``) follow ``long_text``:
          - "truncate": the first context_length - 2 tokens, closed with eot;
          - "chunk_mean": consecutive pieces of context_length - 2 tokens, each encoded with its
            own sot/eot; the mean of their normalized embeddings (renormalized if ``normalize``);
          - "sliding": like chunk_mean over windows of context_length - 2 tokens that start every
            ``stride`` tokens (default half a window), the last window ending at the text's end.

        ``embeddings`` (B, T, text_width) replace the token embeddings (prompt tuning); T must
        then fit the context.
        """
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"tokens must be (B, T) integer ids, got {tuple(tokens.shape)} {tokens.dtype}"
            )
        if long_text not in LONG_TEXT:
            raise ValueError(f"long_text must be one of {LONG_TEXT}, got {long_text!r}")
        if stride is not None and (long_text != "sliding" or stride < 1):
            raise ValueError(
                f"stride must be a positive int and goes only with long_text='sliding', "
                f"got {stride!r}"
            )
        if embeddings is not None and embeddings.shape != (*tokens.shape, self.config.text_width):
            raise ValueError(
                f"embeddings must have shape (B, T, text_width) = "
                f"{(*tokens.shape, self.config.text_width)}, got {tuple(embeddings.shape)}"
            )
        if tokens.shape[1] <= self.config.context_length:
            return _project(self.text_proj, self.text(tokens, embeddings), normalize)
        if embeddings is not None:
            raise ValueError(f"embeddings must fit the context of {self.config.context_length}")
        pieces, owner = self._split_long(tokens, long_text, stride)
        if long_text == "truncate":
            return _project(self.text_proj, self.text(pieces), normalize)
        features = _project(self.text_proj, self.text(pieces), True)  # (P, embed_dim)
        mean = torch.zeros(
            tokens.shape[0], features.shape[1], dtype=features.dtype, device=features.device
        )
        mean.index_add_(0, owner, features)
        mean = mean / torch.bincount(owner, minlength=tokens.shape[0]).unsqueeze(1).to(mean.dtype)
        return F.normalize(mean, dim=-1) if normalize else mean

    def _split_long(self, tokens: torch.Tensor, long_text: str, stride: int | None):
        """Rows longer than the context -> (P, context_length) pieces and each piece's row."""
        c = self.config
        window = c.context_length - 2
        step = window if long_text == "chunk_mean" else stride or max(window // 2, 1)
        pieces, owner = [], []
        for row, ids in enumerate(tokens.tolist()):
            end = ids.index(c.eot_token_id) if c.eot_token_id in ids else len(ids)
            text = ids[1 if ids and ids[0] == c.sot_token_id else 0 : end]
            starts = range(0, max(len(text) - window, 0) + step, step)
            if long_text != "chunk_mean":  # windows stop once one reaches the end
                starts = [s for s in starts if s + window < len(text)] + [
                    max(len(text) - window, 0)
                ]
            if long_text == "truncate":
                starts = [0]
            for s in starts:
                piece = [c.sot_token_id, *text[s : s + window], c.eot_token_id]
                pieces.append(piece + [c.pad_token_id] * (c.context_length - len(piece)))
                owner.append(row)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=tokens.device)  # noqa: E731
        return as_tensor(pieces), as_tensor(owner)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        image_features = self.encode_image(images)
        text_features = self.encode_text(tokens)
        if self.logit_bias is None:
            return image_features, text_features, self.logit_scale.exp()
        return image_features, text_features, self.logit_scale.exp(), self.logit_bias


def _project(head: NormalizedLinear, x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The fused normalized head, or the bare linear map when raw features are asked for."""
    return head(x) if normalize else F.linear(x, head.weight, head.bias)
