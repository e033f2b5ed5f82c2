"""Few-shot adaptation of a pretrained CLIP to image classification: k labelled images per class.

    zero-shot  class embeddings from prompt templates; nothing trained (the baseline)
    probe      multinomial logistic regression on frozen image features (L-BFGS, L2 penalty)
    adapter    CLIP-Adapter: f' = ratio · mlp(f) + (1 - ratio) · f on frozen features, cosine
               against the zero-shot class embeddings (Gao et al. 2021)
    prompt     CoOp: n_ctx learned context vectors before every class name, through the frozen
               text tower (Zhou et al. 2022)
    lora       low-rank adapters on the image tower's linear layers (``fastclip.lora``)
    full, LiT  the training script from the checkpoint: ``fastclip train --init CHECKPOINT``,
               with ``--lock-image`` to train the text side only

    model, tok = load_checkpoint(ckpt), Tokenizer.from_pretrained(ckpt)
    results = compare(model, tok, DigitsDataset("train"), DigitsDataset("test"), shots=(1, 4, 16))
    print(render_table(results))

Probe, adapter and prompt leave the CLIP bit for bit as it was: image features are computed once,
and every method trains full batch on the C · k few-shot examples. Each trained part saves on its
own: ``save_adapter``/``load_adapter`` (safetensors); ``fastclip.lora.save_lora`` for LoRA.

One module per method (``probe``, ``adapter``, ``prompt``, ``lora``), each exposing a ``Method``
(``base``): fit on a task's shots, score its test split, save the part. ``task.METHODS`` is the
registry that ``Task.run``, ``compare`` and ``fastclip finetune`` read; ``command`` holds that
command's flags (``FinetuneConfig``) and its run (``finetune``).
"""

from fastclip.finetune.adapter import ClipAdapter, train_adapter
from fastclip.finetune.base import FewShot, Method, Split, load_adapter, save_adapter, top1
from fastclip.finetune.command import FinetuneConfig, finetune
from fastclip.finetune.lora import train_lora
from fastclip.finetune.probe import LinearProbe, fit_linear_probe
from fastclip.finetune.prompt import PromptLearner, train_prompts
from fastclip.finetune.task import (
    METHODS,
    Task,
    compare,
    few_shot_indices,
    load_checkpoint,
    prepare,
    render_table,
)

__all__ = [
    "METHODS",
    "ClipAdapter",
    "FewShot",
    "FinetuneConfig",
    "LinearProbe",
    "Method",
    "PromptLearner",
    "Split",
    "Task",
    "compare",
    "few_shot_indices",
    "finetune",
    "fit_linear_probe",
    "load_adapter",
    "load_checkpoint",
    "prepare",
    "render_table",
    "save_adapter",
    "top1",
    "train_adapter",
    "train_lora",
    "train_prompts",
]
