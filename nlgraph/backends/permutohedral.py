"""The ``permutohedral`` backend: approximate Gaussian filtering on the permutohedral lattice.

Adams, Baek and Davis, "Fast High-Dimensional Filtering Using the Permutohedral Lattice",
Eurographics 2010, in the variant Krähenbühl's dense-CRF code (and so pydensecrf) runs: the same
elevation, rounding and rank rules, barycentric splatting onto the d+1 vertices of the enclosing
simplex, one [1/2, 1, 1/2] blur along each of the d+1 lattice directions, and slicing with the
constant 1 / (1 + 2^-d). It computes, in O(N d^2 + M d e) instead of O(N^2 d),

    y_i ~= sum_j exp(-|q'_i - k'_j|^2 / 2) v_j        (Gaussian, C = 1, complete graph incl. j = i)

and, for ``Gaussian(normalize=True)``, that filter divided by the filter of ones.

Written with tensor ops only (no Python loop over points), so the same code runs on CPU and CUDA:
lattice keys are packed into int64 codes, vertices found with ``unique``, blur neighbours with
``searchsorted``; splat, each blur direction and slice are CSR matrices built once per lattice.
A batch index is part of each key, so one lattice (block diagonal) serves the whole batch. The
lattice of the last few feature tensors is cached (a dense CRF filters the same image at every
mean-field iteration).

Differentiable w.r.t. the values (the filter is linear; its adjoint is the same matrices
transposed, blurs in reverse order). Not differentiable w.r.t. the features: the lattice's
structure is piecewise constant in them, so ``can_run`` refuses inputs whose features require
gradients (the exact backends handle those).

Approximation: a few percent relative error against the exact Gaussian sum on typical CRF
features (measured in tests/test_permutohedral.py, reported in the README).
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..affinity import Gaussian
from .common import compute_dtype

__all__ = ["can_run", "prefer", "run", "Lattice", "build_lattice", "MAX_FEATURE_DIM", "EXACT"]

EXACT = False
#: The lattice has (d + 1) vertices per point and d + 1 blur directions: cheap for small d only.
MAX_FEATURE_DIM = 16
#: Automatic dispatch takes the lattice for d <= AUTO_MAX_DIM and N * M >= AUTO_MIN_PAIRS only;
#: smaller problems are cheap to compute exactly.
AUTO_MAX_DIM = 8
AUTO_MIN_PAIRS = 1 << 22
_CACHE_SIZE = 4


def can_run(query, key, value, affinity, graph) -> tuple[bool, str]:
    if type(affinity) is not Gaussian:
        return False, f"permutohedral filters Gaussian affinities only, not {affinity!r}"
    if graph is not None:
        return False, f"permutohedral filters over the complete graph (self included), not {graph!r}"
    d = query.shape[-1]
    if d > MAX_FEATURE_DIM:
        return False, f"permutohedral is for low-dimensional features (d <= {MAX_FEATURE_DIM}), got d={d}"
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or any(
            t.requires_grad for t in affinity.tensors())):
        return False, ("permutohedral is not differentiable w.r.t. the features or the bandwidth "
                       "(use an exact backend, or detach them)")
    return True, ""


def prefer(query, key, value, affinity, graph) -> bool:
    return query.shape[-1] <= AUTO_MAX_DIM and query.shape[-2] * key.shape[-2] >= AUTO_MIN_PAIRS


@dataclass
class Lattice:
    """Splat/blur/slice operators of one lattice over a batch of query and key points."""

    splat: Tensor        # (V, B*M) CSR: key points -> vertices
    splat_t: Tensor      # (B*M, V) CSR
    slice: Tensor        # (B*N, V) CSR: vertices -> query points (without alpha)
    slice_t: Tensor      # (V, B*N) CSR
    blurs: list[Tensor]  # d + 1 CSR (V, V) matrices, symmetric
    alpha: float
    num_vertices: int

    def filter(self, values: Tensor, transpose: bool = False) -> Tensor:
        """values (B*M, e) -> (B*N, e); with ``transpose`` the adjoint map (B*N, e) -> (B*M, e)."""
        if not transpose:
            x = self.splat @ values
            for b in self.blurs:
                x = b @ x
            return (self.slice @ x) * self.alpha
        x = self.slice_t @ values
        for b in reversed(self.blurs):
            x = b @ x
        return (self.splat_t @ x) * self.alpha


def _csr(rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    # indices are constructed in range; skip the invariant checks (and their warning)
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, shape, check_invariants=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.coalesce().to_sparse_csr()


def _elevate(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Points (P, d) -> (remainder-0 point (P, d+1), rank (P, d+1), barycentric weights (P, d+1))."""
    p, d = features.shape
    d1 = d + 1
    dev, dt = features.device, features.dtype
    i = torch.arange(d, device=dev, dtype=dt)
    scale = math.sqrt(2.0 / 3.0) * d1 / torch.sqrt((i + 2) * (i + 1))
    cf = features * scale
    suffix = torch.cat([cf.flip(-1).cumsum(-1).flip(-1), torch.zeros(p, 1, device=dev, dtype=dt)], dim=-1)
    elevated = torch.empty(p, d1, device=dev, dtype=dt)
    elevated[:, 0] = suffix[:, 0]
    elevated[:, 1:] = suffix[:, 1:] - torch.arange(1, d1, device=dev, dtype=dt) * cf
    # nearest remainder-0 point (ties go down, as the reference code rounds)
    v = elevated / d1
    up, down = torch.ceil(v) * d1, torch.floor(v) * d1
    rem0 = torch.where(up - elevated < elevated - down, up, down)
    total = torch.round(rem0.sum(-1) / d1).long()
    diff = elevated - rem0
    idx = torch.arange(d1, device=dev)
    upper = idx[:, None] < idx[None, :]
    di, dj = diff[:, :, None], diff[:, None, :]
    rank = ((di < dj) & upper).sum(-1) + ((dj >= di) & upper.T).sum(-1)
    rank = rank + total[:, None]
    wrap = (rank < 0).long() - (rank > d).long()
    rank = rank + d1 * wrap
    rem0 = rem0 + d1 * wrap.to(dt)
    val = (elevated - rem0) / d1
    bary = torch.zeros(p, d1 + 1, device=dev, dtype=dt)
    bary.scatter_add_(1, d - rank, val)
    bary.scatter_add_(1, d - rank + 1, -val)
    bary[:, 0] += 1.0 + bary[:, d1]
    return rem0.round().long(), rank, bary[:, :d1]


def build_lattice(query: Tensor, key: Tensor, same: bool) -> Lattice:
    """Build the lattice of query points (B, N, d) and key points (B, M, d) (same=True: one point set)."""
    b, n, d = query.shape
    m = key.shape[1]
    d1 = d + 1
    dev, dt = query.device, query.dtype
    pts = query.reshape(-1, d) if same else torch.cat([query.reshape(-1, d), key.reshape(-1, d)])
    batch = torch.arange(b, device=dev).repeat_interleave(n)
    if not same:
        batch = torch.cat([batch, torch.arange(b, device=dev).repeat_interleave(m)])
    rem0, rank, bary = _elevate(pts)
    # vertex keys: key[p, r, i] = rem0[p, i] + canonical[r, rank[p, i]], for the first d coordinates
    r = torch.arange(d1, device=dev)
    canonical = torch.where(torch.arange(d1, device=dev)[None, :] <= d - r[:, None], r[:, None], r[:, None] - d1)
    keys = rem0[:, None, :d] + canonical[:, rank[:, :d]].permute(1, 0, 2)  # (P, d1, d)
    # pack (key coordinates, batch) into one int64 code; leave room for the +-d1 neighbour offsets
    lo = keys.amin(dim=(0, 1)) - d1
    span = keys.amax(dim=(0, 1)) + d1 - lo + 1
    sizes = torch.cat([span, torch.tensor([b], device=dev)])
    if float(torch.log2(sizes.double()).sum()) >= 62:
        raise ValueError(f"permutohedral: feature range too large to index the lattice (coordinate spans "
                         f"{sizes.tolist()}); rescale the features or use an exact backend")
    strides = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long, device=dev), sizes[:-1]]), 0)

    def code(k: Tensor, bidx: Tensor) -> Tensor:
        return ((k - lo) * strides[:d]).sum(-1) + bidx * strides[d]

    codes = code(keys, batch[:, None])  # (P, d1)
    uniq, vertex = torch.unique(codes.reshape(-1), return_inverse=True)
    num_v = uniq.shape[0]
    vertex = vertex.reshape(-1, d1)

    # blur neighbours along each of the d + 1 lattice directions
    ukeys = torch.empty(num_v, d, dtype=torch.long, device=dev)
    ukeys[vertex.reshape(-1)] = keys.reshape(-1, d)
    ubatch = torch.empty(num_v, dtype=torch.long, device=dev)
    ubatch[vertex.reshape(-1)] = batch[:, None].expand(-1, d1).reshape(-1)
    rows_v = torch.arange(num_v, device=dev)
    blurs = []
    for j in range(d1):
        shift = torch.ones(d, dtype=torch.long, device=dev)
        if j < d:
            shift[j] = -d
        rows, cols = [rows_v], [rows_v]
        vals = [torch.ones(num_v, dtype=dt, device=dev)]
        for sign in (-1, 1):
            c = code(ukeys + sign * shift, ubatch)
            pos = torch.searchsorted(uniq, c).clamp_max(num_v - 1)
            found = uniq[pos] == c
            rows.append(rows_v[found])
            cols.append(pos[found])
            vals.append(torch.full((int(found.sum()),), 0.5, dtype=dt, device=dev))
        blurs.append(_csr(torch.cat(rows), torch.cat(cols), torch.cat(vals), (num_v, num_v)))

    nq = b * n
    q_vertex, q_bary = vertex[:nq], bary[:nq]
    k_vertex, k_bary = (vertex, bary) if same else (vertex[nq:], bary[nq:])
    k_points = torch.arange(k_vertex.shape[0], device=dev)[:, None].expand(-1, d1).reshape(-1)
    q_points = torch.arange(nq, device=dev)[:, None].expand(-1, d1).reshape(-1)
    splat = _csr(k_vertex.reshape(-1), k_points, k_bary.reshape(-1), (num_v, k_vertex.shape[0]))
    splat_t = _csr(k_points, k_vertex.reshape(-1), k_bary.reshape(-1), (k_vertex.shape[0], num_v))
    slice_ = _csr(q_points, q_vertex.reshape(-1), q_bary.reshape(-1), (nq, num_v))
    slice_t = _csr(q_vertex.reshape(-1), q_points, q_bary.reshape(-1), (num_v, nq))
    return Lattice(splat, splat_t, slice_, slice_t, blurs, 1.0 / (1.0 + 2.0 ** (-d)), num_v)


class _LatticeFilter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, lattice):
        ctx.lattice = lattice
        return lattice.filter(values)

    @staticmethod
    def backward(ctx, grad):
        return ctx.lattice.filter(grad.contiguous(), transpose=True), None


_cache: list[tuple[tuple, weakref.ref, Optional[weakref.ref], Lattice]] = []


def _cached_lattice(query: Tensor, key: Tensor, same: bool, q: Tensor, k: Tensor, tag: str) -> Lattice:
    sig = (tag, query.data_ptr(), query._version, tuple(query.shape), key.data_ptr(), key._version,
           tuple(key.shape), query.dtype, query.device)
    for entry in _cache:
        s, qref, kref, lat = entry
        if s == sig and qref() is query and (kref() if kref is not None else key) is key:
            return lat
    lat = build_lattice(q, k, same)
    _cache.insert(0, (sig, weakref.ref(query), None if same else weakref.ref(key), lat))
    del _cache[_CACHE_SIZE:]
    return lat


def run(query: Tensor, key: Tensor, value: Tensor, affinity: Gaussian, graph) -> Tensor:
    lead = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
    n, m, d, e = query.shape[-2], key.shape[-2], query.shape[-1], value.shape[-1]
    cd = compute_dtype(query.dtype)
    same = query is key
    with torch.no_grad():
        form = affinity.form(query.detach().to(cd), key.detach().to(cd))
        q = form.query.expand(*lead, n, d).reshape(-1, n, d)
        k = q if same else form.key.expand(*lead, m, d).reshape(-1, m, d)
        lattice = _cached_lattice(query, key, same, q.contiguous(), k.contiguous(), repr(affinity))
    v = value.to(cd).expand(*lead, m, e).reshape(-1, e)
    if affinity.normalize:
        v = torch.cat([v, torch.ones(v.shape[0], 1, dtype=cd, device=v.device)], dim=-1)
    y = _LatticeFilter.apply(v.contiguous(), lattice)
    if affinity.normalize:
        y = y[:, :e] / y[:, e:].clamp_min(torch.finfo(cd).tiny)
    return y.reshape(*lead, n, e).to(query.dtype)
