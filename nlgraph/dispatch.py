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

When a module is first loaded it is checked once and described by a typed :class:`Backend` record
(its hooks, whether it takes dropout, returns the log-normaliser, is exact, and which options its
``run`` accepts, read from the signatures then): selection and :func:`nlgraph.aggregate` consult the
record, never the signatures again.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Mapping, Optional

from torch import Tensor

from ._optional import import_module
from .affinity import Affinity
from .graph import Graph

__all__ = ["register", "backend_names", "get_backend", "backend", "compatible_backends", "exact_backends",
           "select_backend", "fast_softmax", "Backend", "BackendError"]

_REGISTRY: dict[str, str] = {}  # name -> module path; insertion order is the automatic priority
_MODULES: dict[str, ModuleType] = {}  # name -> the loaded module
_RECORDS: dict[str, "Backend"] = {}  # name -> the record of the module in _MODULES

#: ``run`` keywords the dispatch itself passes (never user options).
_INTERNAL = ("dropout_p", "seed", "return_lse")


class BackendError(ValueError):
    """Raised when a requested backend cannot run the given combination."""


@dataclass(frozen=True)
class Backend:
    """A loaded backend: its module's hooks and what it declares, read once when it is loaded.

    Attributes:
        name: the registered name.
        module: the backend module.
        exact: False for an approximate backend (module attribute ``EXACT``).
        returns_lse: ``run`` takes ``return_lse=True`` (module attribute ``RETURNS_LSE``).
        dropout: ``can_run`` (and ``run``) take ``dropout_p``; otherwise the backend has no dropout.
        options: the keyword options ``run`` accepts besides the dispatch's own.
        any_options: ``run`` takes ``**options`` (every option is passed through).
        prefer_hook: the module's ``prefer`` or None (automatic selection takes it whenever it can run).
        prefer_dropout: ``prefer`` takes ``dropout_p``.
    """

    name: str
    module: ModuleType
    exact: bool
    returns_lse: bool
    dropout: bool
    options: tuple[str, ...]
    any_options: bool
    prefer_hook: Optional[Callable[..., bool]]
    prefer_dropout: bool

    def __getattr__(self, item: str) -> Any:
        """Anything else is the module's (``EXACT``, its helpers): the record stands in for the module
        :func:`select_backend` returned before it existed."""
        if item == "module" or item.startswith("__"):
            raise AttributeError(item)
        return getattr(self.module, item)

    @classmethod
    def from_module(cls, name: str, module: ModuleType) -> "Backend":
        """Check a backend module's protocol once and describe it; TypeError naming what is wrong."""
        for hook in ("can_run", "run"):
            if not callable(getattr(module, hook, None)):
                raise TypeError(f"backend {name!r} ({module.__name__}) must define a callable {hook}()")
        prefer = getattr(module, "prefer", None)
        if prefer is not None and not callable(prefer):
            raise TypeError(f"backend {name!r} ({module.__name__}): prefer must be callable, got "
                            f"{type(prefer).__name__}")
        flags = {}
        for attr, default in (("EXACT", True), ("RETURNS_LSE", False)):
            flags[attr] = getattr(module, attr, default)
            if not isinstance(flags[attr], bool):
                raise TypeError(f"backend {name!r} ({module.__name__}): {attr} must be a bool, got "
                                f"{flags[attr]!r}")
        params = list(inspect.signature(module.run).parameters.values())[5:]
        options = tuple(p.name for p in params
                        if p.kind is not inspect.Parameter.VAR_KEYWORD and p.name not in _INTERNAL)
        return cls(name=name, module=module, exact=flags["EXACT"], returns_lse=flags["RETURNS_LSE"],
                   dropout="dropout_p" in inspect.signature(module.can_run).parameters,
                   options=options, any_options=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params),
                   prefer_hook=prefer,
                   prefer_dropout=prefer is not None and "dropout_p" in inspect.signature(prefer).parameters)

    def can_run(self, query: Tensor, key: Tensor, value: Tensor, affinity: Affinity, graph: Optional[Graph],
                dropout_p: float = 0.0, return_lse: bool = False) -> tuple[bool, str]:
        """(able, reason): the module's answer, after what the record itself rules out."""
        if return_lse and not self.returns_lse:
            return False, "this backend cannot return the log-normaliser (return_lse=True)"
        if dropout_p > 0:
            if not self.dropout:
                return False, "this backend has no dropout"
            return self.module.can_run(query, key, value, affinity, graph, dropout_p=dropout_p)
        return self.module.can_run(query, key, value, affinity, graph)

    def prefer(self, query: Tensor, key: Tensor, value: Tensor, affinity: Affinity, graph: Optional[Graph],
               dropout_p: float = 0.0) -> bool:
        """Whether automatic selection takes this backend when it can run (True without a hook)."""
        if self.prefer_hook is None:
            return True
        if dropout_p > 0 and self.prefer_dropout:
            return self.prefer_hook(query, key, value, affinity, graph, dropout_p=dropout_p)
        return self.prefer_hook(query, key, value, affinity, graph)

    def check_options(self, options: Mapping[str, Any]) -> None:
        """TypeError naming the options ``run`` does not take (none when it takes ``**options``)."""
        unknown = sorted(set(options) - set(self.options))
        if unknown and not self.any_options:
            raise TypeError(f"backend {self.name!r} does not take option(s) {unknown}; it accepts "
                            f"{list(self.options)}")

    def run(self, query: Tensor, key: Tensor, value: Tensor, affinity: Affinity, graph: Optional[Graph],
            **kwargs: Any) -> Any:
        """The module's ``run``."""
        return self.module.run(query, key, value, affinity, graph, **kwargs)


def register(name: str, module: str) -> None:
    """Register a backend module under ``name`` (later registrations have lower priority)."""
    _REGISTRY[name] = module


def backend_names() -> list[str]:
    """All registered backends, in automatic-selection priority order."""
    return list(_REGISTRY)


def backend(name: str) -> Backend:
    """The record of backend ``name``, its module loaded (and checked) on first use."""
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {backend_names()}, got {name!r}")
    if name not in _MODULES:
        _MODULES[name] = import_module(_REGISTRY[name])  # compile-friendly
    module = _MODULES[name]
    rec = _RECORDS.get(name)
    if rec is None or rec.module is not module:  # first use, or the module was replaced (tests do)
        rec = _RECORDS[name] = Backend.from_module(name, module)
    return rec


_backend = backend  # for select_backend, whose ``backend`` argument shadows the function


def get_backend(name: str) -> ModuleType:
    """The module of backend ``name`` (loaded, and checked, on first use)."""
    return backend(name).module


def _describe(query: Tensor, key: Tensor, value: Tensor, affinity: Affinity, graph: Optional[Graph]) -> str:
    return (f"affinity={affinity!r}, graph={graph!r}, device={query.device.type}, dtype={query.dtype}, "
            f"query={tuple(query.shape)}, key={tuple(key.shape)}, value={tuple(value.shape)}")


def compatible_backends(query: Tensor, key: Tensor, value: Tensor, affinity: Affinity,
                        graph: Optional[Graph], dropout_p: float = 0.0,
                        return_lse: bool = False) -> list[str]:
    """Names of the backends that can run this case (tests parametrise over it)."""
    return [name for name in _REGISTRY
            if backend(name).can_run(query, key, value, affinity, graph, dropout_p, return_lse)[0]]


def exact_backends(query: Tensor, key: Tensor, value: Tensor, affinity: Affinity, graph: Optional[Graph],
                   dropout_p: float = 0.0, return_lse: bool = False) -> list[str]:
    """The compatible backends that compute the op exactly (no approximation)."""
    return [name for name in compatible_backends(query, key, value, affinity, graph, dropout_p, return_lse)
            if backend(name).exact]


def select_backend(query: Tensor, key: Tensor, value: Tensor, affinity: Affinity, graph: Optional[Graph],
                   backend: str = "auto", dropout_p: float = 0.0,
                   return_lse: bool = False) -> tuple[str, Backend]:
    """Pick the backend: the forced one (with its exact reason if it cannot run), or the first able one.

    Returns its name and its :class:`Backend` record (``record.run(...)`` runs it, ``record.module`` is
    the module)."""
    if backend != "auto":
        rec = _backend(backend)
        ok, reason = rec.can_run(query, key, value, affinity, graph, dropout_p, return_lse)
        if not ok:
            raise BackendError(f"backend={backend!r} cannot run "
                               f"{_describe(query, key, value, affinity, graph)}: {reason}")
        return backend, rec
    reasons = []
    for name in _REGISTRY:
        rec = _backend(name)
        ok, reason = rec.can_run(query, key, value, affinity, graph, dropout_p, return_lse)
        if ok and rec.prefer(query, key, value, affinity, graph, dropout_p):
            return name, rec
        reasons.append(f"{name}: {reason or 'not preferred for this size'}")
    raise BackendError(f"no backend can run {_describe(query, key, value, affinity, graph)}; "
                       + "; ".join(reasons))


#: Built-in backends registered ahead of ``sdpa`` that never run ``Softmax`` (so automatic selection
#: of a Softmax case on the complete graph reaches ``sdpa`` first).
_NO_SOFTMAX = ("algebra",)


def fast_softmax(query: Tensor, key: Tensor, value: Tensor, scale: Optional[float],
                 is_causal: bool) -> Optional[Tensor]:
    """Automatic selection's shortcut for plain softmax attention: the ``sdpa`` backend's ``fast_run``,
    or None (then :func:`select_backend` walks the registry as always).

    Taken only while ``sdpa`` is the first registered backend that can run ``Softmax`` (a backend
    registered ahead of it, or a replaced module without the hook, turns the shortcut off), and only
    where ``fast_run`` itself says the general path would pick it for exactly this call.
    """
    for name in _REGISTRY:
        if name == "sdpa":
            break
        if name not in _NO_SOFTMAX:
            return None
    else:
        return None
    hook = getattr(_backend("sdpa").module, "fast_run", None)
    return None if hook is None else hook(query, key, value, scale, is_causal)
