"""Optional dependencies, probed once: ``import nlgraph`` needs torch and numpy only.

Each probe returns the module or None; ``missing(name)`` gives the one-line message naming the
extra to install. :func:`import_module` is the same for modules that must exist (backends).

Both are compile-friendly: torch.compile (``fullgraph=True``) and torch.export cannot trace
``importlib``, so the import sits in a function marked ``torch.compiler.assume_constant_result``
(while tracing, the compiler calls it once and takes its result as the constant it is for the life
of the process), and the traced code then reads the module as an attribute of a plain object,
which the tracer reads live (a dict it would snapshot on first use, missing later imports). In
eager mode a probe is an attribute look-up after the first call; it is thread-safe.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import Optional

import torch

__all__ = ["optional", "import_module", "missing", "EXTRAS"]

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


class _Probed:
    """Probed modules (or None), one attribute per module name (dots spelled ``__``: an identifier)."""


_PROBED = _Probed()


def _attr(name: str) -> str:
    return name.replace(".", "__")

_LOCK = threading.Lock()


@torch.compiler.assume_constant_result
def _probe(name: str, required: bool) -> bool:
    """Import ``name`` once; True when importable. ``required``: re-raise an ImportError instead of
    caching None."""
    attr = _attr(name)
    if not hasattr(_PROBED, attr):
        with _LOCK:
            if not hasattr(_PROBED, attr):
                try:
                    mod: Optional[ModuleType] = importlib.import_module(name)
                except ImportError:
                    if required:
                        raise
                    mod = None
                setattr(_PROBED, attr, mod)
    return getattr(_PROBED, attr) is not None


def optional(name: str) -> Optional[ModuleType]:
    """The module if it can be imported, else None (probed once per process)."""
    _probe(name, False)
    return getattr(_PROBED, _attr(name))


def import_module(name: str) -> ModuleType:
    """``importlib.import_module`` (cached) that torch.compile and torch.export run through."""
    if not _probe(name, True):
        raise ImportError(f"No module named {name!r} (an earlier probe found it missing)")
    return getattr(_PROBED, _attr(name))


def missing(name: str) -> str:
    """One line naming the package and the nlgraph extra that provides it."""
    req, extra = EXTRAS.get(name, (name, None))
    hint = f"pip install 'nlgraph[{extra}]'" if extra else f"pip install {req}"
    return f"{name} is not installed ({hint}, or pip install {req})"
