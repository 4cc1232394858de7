"""The lattice cache: the lattices of the last few feature sets, keyed on their values."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ...affinity import Gaussian
from .lattice import _FLOAT32_ELEVATED, Lattice, _elevation_bound, _numpy_view, build_lattice

_CACHE_SIZE = 4

# A lattice is determined by the scaled point sets, i.e. by the query and key VALUES, the bandwidth's
# VALUE, the broadcast batch shape, the compute dtype and whether key is query. The cache compares
# exactly these against private copies: never a repr, an identity or a version counter (a repr prints
# a tensor's shape only; ``x.data`` edits and writes through numpy-shared memory leave the version
# alone; inference tensors have none). One bitwise comparison of the features per call (measured
# ~0.5 ms per million floats at 512 x 512, about 1% of one filter of 2 labels) keeps the fast paths:
# a dense CRF filters the same features at every mean-field iteration, and every same-size image has
# the same position-only (smoothness) features.


@dataclass(eq=False)
class _CacheEntry:
    lead: tuple[int, ...]
    same: bool
    compute: torch.dtype
    query: Tensor                    # private copies of the caller's features (never a view of them)
    key: Optional[Tensor]            # None when key is query
    bandwidth: Union[float, Tensor]  # a float, or a private copy of the bandwidth tensor
    lattice: Lattice


_cache: list[_CacheEntry] = []
_cache_lock = threading.Lock()
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def clear_cache() -> None:
    """Forget every cached lattice (benchmarks use it to time cold builds)."""
    with _cache_lock:
        _cache.clear()


def _cached_tensors() -> list[Tensor]:
    """Every tensor the cache holds as a key (tests check that none shares memory with a caller's)."""
    with _cache_lock:
        entries = list(_cache)
    return [t for e in entries for t in (e.query, e.key, e.bandwidth) if isinstance(t, Tensor)]


def _bits_equal(stored: Tensor, t: Tensor) -> bool:
    """Bit-for-bit equality of a stored copy and a tensor (same shape, dtype and device required).

    Equal bits give the identical lattice; NaN and -0.0 need no special case. On the CPU through
    numpy (measured ~3x faster than ``torch.equal`` on (262144, 5) float32)."""
    if stored.shape != t.shape or stored.dtype != t.dtype or stored.device != t.device:
        return False
    view = _INT_VIEW[t.element_size()]
    a, b = stored.view(view), t.detach().view(view)
    if a.device.type == "cpu":
        return bool(np.array_equal(a.numpy(), b.numpy()))
    return torch.equal(a, b)


def _same_bandwidth(stored: Union[float, Tensor], b) -> bool:
    if isinstance(stored, Tensor) or isinstance(b, Tensor):
        return isinstance(stored, Tensor) and isinstance(b, Tensor) and _bits_equal(stored, b)
    return stored == float(b)


def _matches(e: _CacheEntry, query: Tensor, key: Tensor, same: bool, lead: tuple, cd: torch.dtype, b,
             corners: bool = False) -> bool:
    return (e.lead == lead and e.same == same and e.compute == cd
            and (not corners or e.lattice.corners is not None) and _same_bandwidth(e.bandwidth, b)
            and _bits_equal(e.query, query) and (same or (e.key is not None and _bits_equal(e.key, key))))


def _private(t: Tensor) -> Tensor:
    """A copy that shares no memory with ``t`` (strides kept where dense: comparisons stay fast).

    CPU float tensors are copied by numpy (one thread): torch's parallel copy left its OpenMP worker
    spinning on the other core for a few ms, while the next lattice build (a CRF's second term, right
    after this copy of the first term's features) started its second thread."""
    a = _numpy_view(t)
    if a is not None:
        return torch.from_numpy(np.array(a, order="K", copy=True))
    return t.detach().clone()


def _no_functorch():
    """Look up and build outside any torch.func transform: the lattice depends on the features' values
    only (their derivatives go through ``_LatticePointFilter``, not through the build), and sparse CSR
    tensors cannot be created inside one (they have no strides to wrap)."""
    disable = getattr(torch._C, "_DisableFuncTorch", None)
    return disable() if disable is not None else contextlib.nullcontext()


def _cached_lattice(query: Tensor, key: Tensor, same: bool, lead: tuple, cd: torch.dtype, affinity: Gaussian,
                    points, corners: bool = False, cache: bool = True) -> Lattice:
    """The lattice of (query, key) under ``affinity``'s bandwidth; ``points(dtype)`` gives the scaled
    point sets (B, N, d), (B, M, d) to build it from; ``corners``: one built with ``corners=True``
    (a cached one without them is rebuilt with them).

    Lookups compare against a snapshot of the entries (they are immutable) outside the lock; only
    list updates hold it. Two threads that miss on the same features both build (the same lattice);
    both entries are kept until evicted. Built outside inference mode, so a lattice (and the cache's
    copies) made under ``torch.inference_mode()`` also serves later calls that need gradients.
    ``cache=False``: a new lattice, neither looked up nor kept (the caller's own: it may scale it in
    place, :meth:`Lattice.scaled`).
    """
    b = affinity.bandwidth
    with _cache_lock:
        entries = list(_cache) if cache else []
    with _no_functorch():  # (a transform would wrap the compared views, which then have no storage)
        hit = next((e for e in entries if _matches(e, query, key, same, lead, cd, b, corners)), None)
    if hit is not None:
        with _cache_lock:
            if hit in _cache:  # identity (eq=False): still cached, move it to the front
                _cache.remove(hit)
                _cache.insert(0, hit)
        return hit.lattice
    with torch.inference_mode(False), _no_functorch():
        q, k = points(cd)
        if cd != torch.float64 and _elevation_bound(q, k) > _FLOAT32_ELEVATED:
            q, k = points(torch.float64)  # far from the origin: scale and elevate in float64
        lattice = build_lattice(q, k, same, dtype=cd, corners=corners)
        if not cache:
            return lattice
        entry = _CacheEntry(lead, same, cd, _private(query), None if same else _private(key),
                            _private(b) if isinstance(b, Tensor) else float(b), lattice)
    with _cache_lock:
        _cache.insert(0, entry)
        del _cache[_CACHE_SIZE:]
    return lattice
