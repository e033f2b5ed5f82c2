"""Prompt tuning (CoOp, Zhou et al. 2022): learned context vectors before every class name,
through the frozen text tower."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastclip.checks import check_classnames, check_number
from fastclip.finetune.base import FewShot, Method, check_text_tower, optimize, save_adapter
from fastclip.tokenizer import Tokenizer
from fastclip.zeroshot import frozen

PLACEHOLDER = "X"  # the word whose token embeddings the learned context replaces


class PromptLearner(nn.Module):
    """CoOp's learned prompt: ``n_ctx`` context vectors (text_width each), shared by the classes,
    between sot and every class name.

        tokens (C, T): "X X X X {classname}." -> [sot, X × n_ctx, name..., ".", eot, pad...]
        embeddings (C, T, W): the token embeddings, positions 1..n_ctx swapped for ``ctx``
        forward(model) -> model.encode_text(tokens, embeddings=...): (C, E) unit class embeddings

    ``ctx`` (n_ctx, W) starts as the token embeddings of ``init`` if it has n_ctx tokens, else
    as N(0, 0.02) drawn from ``seed``. The model is an argument, not a submodule: the state dict
    is ``ctx`` and ``tokens``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        classnames: Sequence[str],
        *,
        n_ctx: int = 4,
        init: str = "a photo of a",
        seed: int = 0,
    ):
        super().__init__()
        check_text_tower(model, "PromptLearner")
        classnames = check_classnames(classnames)
        check_number("n_ctx", n_ctx, 1, integer=True)
        prompts = _prompts(tokenizer, classnames, n_ctx, model.config.context_length)
        embedding = model.text.token_embedding.weight  # (vocab, W)
        ids = tokenizer.encode(init) if init else []
        if len(ids) == n_ctx:
            ctx = embedding[ids].detach().float().clone()
        else:
            rng = torch.Generator().manual_seed(seed)
            ctx = 0.02 * torch.randn(n_ctx, embedding.shape[1], generator=rng)
        self.ctx = nn.Parameter(ctx.to(embedding.device))  # (n_ctx, W)
        tokens = tokenizer(prompts, context_length=model.config.context_length)  # (C, T)
        self.register_buffer("tokens", tokens.to(embedding.device))

    def forward(self, model: nn.Module) -> torch.Tensor:
        """(C, E) normalized class embeddings of the learned prompts, through ``model``."""
        C, n = self.tokens.shape[0], self.ctx.shape[0]
        embeddings = model.text.token_embedding(self.tokens)  # (C, T, W)
        ctx = self.ctx.to(embeddings.dtype).expand(C, -1, -1)  # (C, n_ctx, W)
        embeddings = torch.cat([embeddings[:, :1], ctx, embeddings[:, 1 + n :]], dim=1)
        return model.encode_text(self.tokens, embeddings=embeddings)


def _prompts(tokenizer: Tokenizer, classnames: list[str], n_ctx: int, context: int) -> list[str]:
    """ "X X X X {classname}." for every class, each checked to fit the text context."""
    if len(tokenizer.encode(PLACEHOLDER)) != 1:
        raise ValueError(f"the tokenizer splits the placeholder {PLACEHOLDER!r} in pieces")
    prompts = [" ".join([PLACEHOLDER] * n_ctx + [name]) + "." for name in classnames]
    for name, prompt in zip(classnames, prompts, strict=True):
        if len(tokenizer.encode(prompt)) + 2 > context:
            raise ValueError(
                f"the prompt of class {name!r} ({n_ctx} context tokens, the name, '.') does "
                f"not fit the text context of {context} tokens"
            )
    return prompts


def train_prompts(
    model: nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_ctx: int = 4,
    init: str = "a photo of a",
    steps: int = 100,
    lr: float = 1e-2,
    seed: int = 0,
) -> PromptLearner:
    """A PromptLearner trained with cross-entropy on logit_scale · features @ class_embeddingsᵀ,
    (N, E) few-shot ``features``, (N,) labels; the model stays frozen."""
    learner = PromptLearner(model, tokenizer, classnames, n_ctx=n_ctx, init=init, seed=seed)
    x, y = features.detach().float(), labels.long()
    with frozen(model):
        scale = model.logit_scale.exp().float()
        loss = lambda: F.cross_entropy(scale * x @ learner(model).float().T, y)  # noqa: E731
        optimize(learner.parameters(), loss, steps=steps, lr=lr)
    return learner.eval()


def _fit(task: FewShot, *, seed: int = 0, **options) -> PromptLearner:
    train = task.train
    return train_prompts(
        task.model, task.tokenizer, task.classnames, train.features, train.labels, seed=seed,
        **options,
    )  # fmt: skip


@torch.no_grad()
def _test_logits(task: FewShot, learner: PromptLearner) -> torch.Tensor:
    return task.test.features @ learner(task.model).float().T


METHOD = Method(fit=_fit, test_logits=_test_logits, save=save_adapter)
