"""The ``permutohedral`` backend: approximate Gaussian filtering on the permutohedral lattice.

Adams, Baek and Davis, "Fast High-Dimensional Filtering Using the Permutohedral Lattice",
Eurographics 2010, in the variant Krähenbühl's dense-CRF code (and so pydensecrf) runs: the same
elevation, rounding and rank rules, barycentric splatting onto the d+1 vertices of the enclosing
simplex, one [1/2, 1, 1/2] blur along each of the d+1 lattice directions, and slicing with the
constant 1 / (1 + 2^-d). It computes, in O(N d^2 + M d e) instead of O(N^2 d),

    y_i ~= sum_j exp(-|q'_i - k'_j|^2 / 2) v_j        (Gaussian, C = 1, complete graph incl. j = i)

and, for ``Gaussian(normalize=True)``, that filter divided by the filter of ones. With
``return_lse`` the log-normaliser is the log of that filtered ones (the lattice's approximate C_i),
or 0 for C = 1.

Two builders make the same lattice (matrix for matrix, tested): on the CPU, kernels compiled by
numba (:mod:`._jit`: a hash table of vertex codes per part of the points, the parts run on torch's
thread count, numba's LLVM comes in its wheel: no compiler on the user's machine); on CUDA, or
where numba does not install, tensor ops only (no Python loop over points: lattice keys packed into
int64 codes, points grouped into simplices and simplex corners into vertices by sorting codes, blur
neighbours found in a dense code table or by ``searchsorted``). Splat, each blur direction and slice
are CSR matrices built once per lattice (the vertex-major ones by counting, without sorting the
P (d+1) entries).
A batch index is part of each key, so one lattice (block diagonal) serves the whole batch. The
lattices of the last few feature sets are cached, keyed on the features' and the bandwidth's values
(see :mod:`.cache`): a dense CRF filters the same image at every mean-field iteration, and
every same-size image has the same position-only (smoothness) features.

Differentiable w.r.t. the values (the filter is linear; its adjoint is the same matrices
transposed, blurs in reverse order) and w.r.t. the features and a tensor bandwidth (through the
scaled points): the exact derivative of the lattice's own output, whose splat and slice weights are
linear in the points inside each simplex (see :mod:`.function`; first order, reverse mode). That is
not the exact Gaussian's derivative: automatic dispatch sends features that need gradients to an
exact backend; ``backend="permutohedral"`` asks for the lattice's.

Approximation: a few percent relative error against the exact Gaussian sum on typical CRF
features (measured in tests/test_permutohedral.py, reported in the README). Float32 points far from
the origin (lattice coordinates beyond 2^12) are elevated in float64, where float32 would no longer
resolve their barycentric weights; points beyond float64's reach or spanning more lattice cells than
int64 codes index raise a ValueError.

Layout: this module is the backend glue (``can_run``, ``prefer``, ``run``); :mod:`.lattice` builds
lattices, :mod:`.csr` holds the sparse-matrix helpers, :mod:`.cache` the lattice cache and
:mod:`.function` the autograd Function.
"""

from __future__ import annotations

import math
import sys
import types

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ...affinity import Gaussian
from ..common import call, compute_dtype
from . import cache as _cache_module
from . import lattice as _lattice_module
from .cache import _bits_equal as _bits_equal  # (re-exported: tests reach these private names here)
from .cache import _cache as _cache
from .cache import _cached_lattice, clear_cache
from .cache import _cached_tensors as _cached_tensors
from .csr import _csr_mm as _csr_mm
from .csr import _segmented_arange as _segmented_arange
from .function import _LatticeFilter as _LatticeFilter
from .function import _LatticePointFilter
from .lattice import _DENSE_LOOKUP as _DENSE_LOOKUP
from .lattice import _DENSE_MAX as _DENSE_MAX
from .lattice import _ONE_KEY_BITS as _ONE_KEY_BITS
from .lattice import Lattice, build_lattice

__all__ = ["can_run", "prefer", "run", "Lattice", "build_lattice", "lattice_of", "clear_cache",
           "release_buffers", "MAX_FEATURE_DIM", "EXACT", "RETURNS_LSE"]

EXACT = False
RETURNS_LSE = True
#: The lattice has (d + 1) vertices per point and d + 1 blur directions: cheap for small d only.
MAX_FEATURE_DIM = 16
#: Automatic dispatch takes the lattice for d <= AUTO_MAX_DIM and N * M >= AUTO_MIN_PAIRS only;
#: smaller problems are cheap to compute exactly.
AUTO_MAX_DIM = 8
AUTO_MIN_PAIRS = 1 << 22
#: Names re-exported here whose module-level value the code reads in a submodule: assigning them
#: on this package (a test's ``monkeypatch.setattr(P, ...)``) assigns them where they are read.
_FORWARDED = {"_ONE_KEY_BITS": _lattice_module, "_DENSE_LOOKUP": _lattice_module,
              "_DENSE_MAX": _lattice_module,
              "build_lattice": _cache_module, "_bits_equal": _cache_module}


def can_run(query, key, value, affinity, graph) -> tuple[bool, str]:
    if type(affinity) is not Gaussian:
        return False, f"permutohedral filters Gaussian affinities only, not {affinity!r}"
    if affinity.offset:
        return False, "permutohedral filters plain Gaussians; Gaussian(offset > 0) needs an exact backend"
    if affinity.cutoff is not None:
        return False, "permutohedral filters plain Gaussians; Gaussian(cutoff=...) needs an exact backend"
    if graph is not None:
        return False, f"permutohedral filters over the complete graph (self included), not {graph!r}"
    d = query.shape[-1]
    if d > MAX_FEATURE_DIM:
        return False, f"permutohedral is for low-dimensional features (d <= {MAX_FEATURE_DIM}), got d={d}"
    return True, ""


def _points_need_grad(query: Tensor, key: Tensor, affinity: Gaussian) -> bool:
    """Do the points need a derivative: reverse mode (requires_grad) or forward mode (a dual tangent,
    which the lattice's point derivative refuses clearly rather than dropping)?"""
    ts = (query, key, *affinity.tensors())
    return ((torch.is_grad_enabled() and any(t.requires_grad for t in ts))
            or any(fwAD.unpack_dual(t).tangent is not None for t in ts))


def prefer(query, key, value, affinity, graph) -> bool:
    """Large, low-dimensional problems whose features need no gradient (the lattice's derivative is
    not the Gaussian's: features that need one go to an exact backend unless asked for by name)."""
    return (query.shape[-1] <= AUTO_MAX_DIM and query.shape[-2] * key.shape[-2] >= AUTO_MIN_PAIRS
            and not _points_need_grad(query, key, affinity))


def _lattice(query: Tensor, key: Tensor, affinity: Gaussian, lead: tuple, cd: torch.dtype,
             corners: bool, cache: bool = True) -> Lattice:
    """The (cached) lattice of the scaled points over the broadcast batch ``lead``, matrices in ``cd``."""
    n, m, d = query.shape[-2], key.shape[-2], query.shape[-1]
    same = query is key
    unit = not isinstance(affinity.bandwidth, Tensor) and float(affinity.bandwidth) == 1.0

    def points(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if unit:  # (the build only reads the points: no divided copy of them)
            q, k = query.detach().to(dtype), key.detach().to(dtype)
        else:
            with torch.no_grad():  # (a bandwidth that needs gradients: the build is not differentiated)
                q, k = affinity.scaled(query.detach().to(dtype), key.detach().to(dtype))
        # no .contiguous(): the lattice reads coordinate rows, so coordinate-major (d, N) storage is
        # as good as or better than (N, d), and a transposing copy costs ~1 ms per 262k points
        q = q.expand(*lead, n, d).reshape(-1, n, d)
        k = q if same else k.expand(*lead, m, d).reshape(-1, m, d)
        return q, k

    with torch.no_grad():
        return _cached_lattice(query, key, same, lead, cd, affinity, points, corners=corners, cache=cache)


def release_buffers() -> None:
    """Free the CPU lattice builder's idle recycled memory.

    The compiled builder (numba) puts its arrays on buffers it keeps: once nothing refers to a
    lattice's arrays any more, their memory serves the next build (fresh memory costs a page fault per
    4 kB page on first touch), up to ``_jit.POOL_BYTES`` (128 MB) of idle buffers. This hands the idle
    ones back; buffers still in use are unaffected. :func:`clear_cache` does not do it (it forgets
    lattices; a later build then reuses their memory)."""
    jit = _lattice_module._jit_module()
    if jit is not None:
        jit.BUFFERS.release()


def lattice_of(query: Tensor, key: Tensor, affinity: Gaussian, *, cache: bool = True) -> Lattice:
    """The lattice this backend filters ``aggregate(query, key, v, affinity)`` on, for a caller that
    applies one lattice many times with scalings folded in (:meth:`Lattice.scaled`,
    :meth:`Lattice.filter`'s ``scale`` / ``add``): a dense CRF's mean-field iterations.

    The same (cached) lattice as the core op's, so ``lattice_of(q, k, a).filter(v.reshape(-1, e))``
    equals ``aggregate(q, k, v, a, backend="permutohedral")`` for ``Gaussian(normalize=False)``;
    query (..., N, d) and key (..., M, d) float tensors whose batch dims broadcast, the values of the
    filter (B*M, e) in ``compute_dtype`` of the query's dtype (float32 for float32). No gradient
    flows through it (``run`` is the differentiable path).

    ``cache=False``: a lattice of the caller's own (the same matrices), neither looked up in nor added
    to the cache (no copy of the features kept, no lattice held for features that will not come
    again), which :meth:`Lattice.scaled` may then scale in place.
    """
    if type(affinity) is not Gaussian or affinity.offset or affinity.cutoff is not None:
        raise ValueError(f"lattice_of: the lattice filters plain Gaussians, got {affinity!r}")
    for name, t in (("query", query), ("key", key)):
        if not isinstance(t, Tensor) or t.dim() < 2 or not t.is_floating_point():
            raise TypeError(f"lattice_of: {name} must be a floating (..., N, d) tensor, got "
                            f"{getattr(t, 'shape', type(t).__name__)}")
    if query.shape[-1] != key.shape[-1] or query.shape[-1] > MAX_FEATURE_DIM:
        raise ValueError(f"lattice_of: query {tuple(query.shape)} and key {tuple(key.shape)} need one "
                         f"feature dim d <= {MAX_FEATURE_DIM}")
    try:
        lead = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2]))
    except RuntimeError:
        raise ValueError(f"lattice_of: query {tuple(query.shape)} and key {tuple(key.shape)} batch dims do "
                         f"not broadcast") from None
    return _lattice(query, key, affinity, lead, compute_dtype(query.dtype), False, cache=bool(cache))


def run(query: Tensor, key: Tensor, value: Tensor, affinity: Gaussian, graph, *, return_lse: bool = False):
    lead = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
    n, m, d, e = query.shape[-2], key.shape[-2], query.shape[-1], value.shape[-1]
    cd = compute_dtype(query.dtype)
    if math.prod(lead) == 0:  # an empty batch: nothing to filter
        y = value.new_zeros(*lead, n, e)
        return (y, torch.full((*lead, n), -math.inf, dtype=cd, device=value.device)) if return_lse else y
    same = query is key
    grad_points = _points_need_grad(query, key, affinity)
    lattice = _lattice(query, key, affinity, lead, cd, grad_points)
    v = value.to(cd).expand(*lead, m, e).reshape(-1, e)
    if affinity.normalize:
        v = torch.cat([v, torch.ones(v.shape[0], 1, dtype=cd, device=v.device)], dim=-1)
    if grad_points:  # the same points as ``points`` builds from, now tracked by autograd
        qg, kg = affinity.scaled(query.to(cd), key.to(cd))
        qg = qg.expand(*lead, n, d).reshape(-1, d)
        kg = qg if same else kg.expand(*lead, m, d).reshape(-1, d)
        y = call(_LatticePointFilter, v.contiguous(), qg, kg, lattice)
    else:
        y = call(_LatticeFilter, v.contiguous(), lattice, False)
    lse = None
    if affinity.normalize:
        c = y[:, e:].clamp_min(torch.finfo(cd).tiny)
        y = y[:, :e] / c
        if return_lse:  # C depends on the features only (differentiable through them when they need it)
            lse = torch.log(c).reshape(*lead, n)
    y = y.reshape(*lead, n, e).to(query.dtype)
    if not return_lse:
        return y
    return y, (lse if lse is not None else torch.zeros(*lead, n, dtype=cd, device=value.device))


class _Package(types.ModuleType):
    """This package's module type: see ``_FORWARDED``."""

    def __setattr__(self, name: str, value) -> None:
        home = _FORWARDED.get(name)
        if home is not None:
            setattr(home, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
