"""Test-session settings, applied at import time, ahead of every test module.

Without a CUDA device the Triton kernels run through Triton's CPU interpreter: TRITON_INTERPRET
must be set before triton is first imported (so here, before any test module imports it).
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# No test touches the network: Hugging Face's libraries read only their caches, here an empty
# one per session (tests build what they load), and Weights & Biases runs offline. They read these
# variables when first imported.
_HF_HOME = tempfile.TemporaryDirectory(prefix="fastclip-hf-")
os.environ.update(
    HF_HOME=_HF_HOME.name, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
    WANDB_SILENT="true",
)  # fmt: skip

# Tests run the kernels with fixed tiles: autotuning every new shape would dominate a GPU run.
# The tests of the autotuned path turn it back on.
os.environ.setdefault("FASTCLIP_AUTOTUNE", "0")
