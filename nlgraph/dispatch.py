"""The one dispatch point: a registry of backends walked in priority order.

Each backend is a module exposing ``can_run(query, key, value, affinity, graph, dropout_p=0.0) ->
(bool, reason)`` and ``run(query, key, value, affinity, graph, *, dropout_p=0.0, seed=None, **options)``
(a backend without dropout may omit ``dropout_p``/``seed``: it is then never asked for dropout).
Optional module attributes: ``EXACT = False`` marks an approximate backend (tests that demand
exact equality skip it), ``prefer(query, key, value, affinity, graph[, dropout_p]) -> bool`` limits
when automatic selection takes a backend that could run (a forced ``backend=`` ignores it), and
``RETURNS_LSE = True`` declares that ``run`` takes ``return_lse=True`` and then returns ``(y, lse)``
with lse = log C_i of shape (..., N) (``aggregate(..., return_lse=True)`` only considers such
backends; the others are never passed the argument). Registering one is one line in
``nlgraph/backends/__init__.py``; modules are imported on first use, so a backend whose optional
dependency is missing costs nothing until asked for (its ``can_run`` says what is missing).
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Optional

from torch import Tensor

from ._optional import import_module
from .affinity import Affinity
from .graph import Graph

__all__ = ["register", "backend_names", "get_backend", "compatible_backends", "exact_backends", "select_backend",
           "BackendError"]

_REGISTRY: dict[str, str] = {}  # name -> module path; insertion order is the automatic priority
_MODULES: dict[str, ModuleType] = {}


class BackendError(ValueError):
    """Raised when a requested backend cannot run the given combination."""


def register(name: str, module: str) -> None:
    """Register a backend module under ``name`` (later registrations have lower priority)."""
    _REGISTRY[name] = module


def backend_names() -> list[str]:
    """All registered backends, in automatic-selection priority order."""
    return list(_REGISTRY)


def get_backend(name: str) -> ModuleType:
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {backend_names()}, got {name!r}")
    if name not in _MODULES:
        _MODULES[name] = import_module(_REGISTRY[name])  # compile-friendly
    return _MODULES[name]


def _describe(query: Tensor, key: Tensor, value: Tensor, affinity: Affinity, graph: Optional[Graph]) -> str:
    return (f"affinity={affinity!r}, graph={graph!r}, device={query.device.type}, dtype={query.dtype}, "
            f"query={tuple(query.shape)}, key={tuple(key.shape)}, value={tuple(value.shape)}")


def _can_run(mod: ModuleType, query, key, value, affinity, graph, dropout_p: float,
             return_lse: bool = False) -> tuple[bool, str]:
    if return_lse and not getattr(mod, "RETURNS_LSE", False):
        return False, "this backend cannot return the log-normaliser (return_lse=True)"
    if dropout_p > 0:
        if "dropout_p" not in inspect.signature(mod.can_run).parameters:
            return False, "this backend has no dropout"
        return mod.can_run(query, key, value, affinity, graph, dropout_p=dropout_p)
    return mod.can_run(query, key, value, affinity, graph)


def _prefers(mod: ModuleType, query, key, value, affinity, graph, dropout_p: float) -> bool:
    if not hasattr(mod, "prefer"):
        return True
    if dropout_p > 0 and "dropout_p" in inspect.signature(mod.prefer).parameters:
        return mod.prefer(query, key, value, affinity, graph, dropout_p=dropout_p)
    return mod.prefer(query, key, value, affinity, graph)


def compatible_backends(query: Tensor, key: Tensor, value: Tensor, affinity: Affinity,
                        graph: Optional[Graph], dropout_p: float = 0.0,
                        return_lse: bool = False) -> list[str]:
    """Names of the backends that can run this case (tests parametrise over it)."""
    return [name for name in _REGISTRY
            if _can_run(get_backend(name), query, key, value, affinity, graph, dropout_p, return_lse)[0]]


def exact_backends(query: Tensor, key: Tensor, value: Tensor, affinity: Affinity, graph: Optional[Graph],
                   dropout_p: float = 0.0, return_lse: bool = False) -> list[str]:
    """The compatible backends that compute the op exactly (no approximation)."""
    return [name for name in compatible_backends(query, key, value, affinity, graph, dropout_p, return_lse)
            if getattr(get_backend(name), "EXACT", True)]


def select_backend(query: Tensor, key: Tensor, value: Tensor, affinity: Affinity, graph: Optional[Graph],
                   backend: str = "auto", dropout_p: float = 0.0,
                   return_lse: bool = False) -> tuple[str, ModuleType]:
    """Pick the backend: the forced one (with its exact reason if it cannot run), or the first able one."""
    if backend != "auto":
        mod = get_backend(backend)
        ok, reason = _can_run(mod, query, key, value, affinity, graph, dropout_p, return_lse)
        if not ok:
            raise BackendError(f"backend={backend!r} cannot run {_describe(query, key, value, affinity, graph)}: {reason}")
        return backend, mod
    reasons = []
    for name in _REGISTRY:
        mod = get_backend(name)
        ok, reason = _can_run(mod, query, key, value, affinity, graph, dropout_p, return_lse)
        if ok and _prefers(mod, query, key, value, affinity, graph, dropout_p):
            return name, mod
        reasons.append(f"{name}: {reason or 'not preferred for this size'}")
    raise BackendError(f"no backend can run {_describe(query, key, value, affinity, graph)}; " + "; ".join(reasons))
