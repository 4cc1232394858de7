"""Optional dependencies, probed once: ``import nlgraph`` needs torch and numpy only.

Each probe returns the module or None; ``missing(name)`` gives the one-line message naming the
extra to install.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from types import ModuleType
from typing import Optional

__all__ = ["optional", "missing", "EXTRAS"]

#: module -> (pip requirement, nlgraph extra)
EXTRAS = {
    "torch_geometric": ("torch-geometric", "pyg"),
    "triton": ("triton", "triton"),
    "skimage": ("scikit-image", "test"),
    "pydensecrf": ("pydensecrf2", "test"),
    "matplotlib": ("matplotlib", "demo"),
    "tqdm": ("tqdm", "demo"),
    "sklearn": ("scikit-learn", "demo"),
}


@lru_cache(maxsize=None)
def optional(name: str) -> Optional[ModuleType]:
    """The module if it can be imported, else None (the result is cached)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def missing(name: str) -> str:
    req, extra = EXTRAS.get(name, (name, None))
    hint = f"pip install 'nlgraph[{extra}]'" if extra else f"pip install {req}"
    return f"{name} is not installed ({hint}, or pip install {req})"
