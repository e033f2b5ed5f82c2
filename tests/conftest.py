"""Run the Triton kernels through Triton's CPU interpreter when no CUDA device is present.

TRITON_INTERPRET must be set before triton is first imported, so this happens at import time,
ahead of every test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
