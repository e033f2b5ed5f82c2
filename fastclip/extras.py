"""Optional dependencies: imported where a feature needs them, or one line naming what installs
them (``pip install "fastclip-triton[hub]"``)."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, user: str, install: str) -> ModuleType:
    """Import an optional dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{user} needs {module.split('.')[0]}: pip install {install}") from e
