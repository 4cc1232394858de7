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
    if affinity.offset:
        return False, "permutohedral filters plain Gaussians; Gaussian(offset > 0) needs an exact backend"
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


def _point_matrix(vertex: Tensor, bary: Tensor, num_v: int) -> Tensor:
    """(points, vertices) CSR with each point's d + 1 barycentric weights, built without a sort of all entries."""
    p, d1 = vertex.shape
    cols, order = torch.sort(vertex, dim=1)  # a point's d + 1 vertices are distinct
    vals = torch.gather(bary, 1, order)
    crow = torch.arange(0, p * d1 + 1, d1, device=vertex.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols.reshape(-1), vals.reshape(-1), (p, num_v), check_invariants=False)


def _vertex_matrix(vid: Tensor, points: Tensor, vals: Tensor, num_v: int, num_points: int) -> Tensor:
    """(vertices, points) CSR from entries already sorted by vertex (a CSC layout would be ~10x slower)."""
    crow = torch.zeros(num_v + 1, dtype=torch.long, device=vid.device)
    crow[1:] = torch.bincount(vid, minlength=num_v).cumsum(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, points, vals, (num_v, num_points), check_invariants=False)


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
    # rank[i] = position of coordinate i when the residuals are sorted in decreasing order, ties
    # broken by index (the reference's pairwise rule: for i < j, d_i < d_j ranks i later, else j)
    diff = elevated - rem0
    order = torch.argsort(diff, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(d1, device=dev).expand_as(order).contiguous())
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
    # Vertex r of point p has key[i] = rem0[p, i] + canonical[r, rank[p, i]] (i < d), where
    # canonical[r, j] = r - d1 * [j > d - r]. Keys are packed into int64 codes
    #   code = sum_i (key[i] - lo[i]) * stride[i] + batch * stride[d]
    # computed without materialising the (P, d1, d) keys: the [rank > d - r] part is a cumulative
    # sum over r of each coordinate's stride, scattered at r = d - rank + 1.
    rem_d, rank_d = rem0[:, :d], rank[:, :d]
    lo = rem_d.amin(0) - 2 * d1  # room for the -d1 of canonical and the +-d1 of blur neighbours
    span = rem_d.amax(0) + 2 * d1 - lo + 1
    sizes = torch.cat([span, torch.tensor([b], device=dev)])
    if float(torch.log2(sizes.double()).sum()) >= 62:
        raise ValueError(f"permutohedral: feature range too large to index the lattice (coordinate spans "
                         f"{sizes.tolist()}); rescale the features or use an exact backend")
    strides = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long, device=dev), sizes[:-1]]), 0)
    s_d = strides[:d]

    def code(k: Tensor, bidx: Tensor) -> Tensor:
        return ((k - lo) * s_d).sum(-1) + bidx * strides[d]

    steps = torch.zeros(pts.shape[0], d1 + 1, dtype=torch.long, device=dev)
    steps.scatter_add_(1, d - rank_d + 1, s_d.expand_as(rank_d).contiguous())
    r = torch.arange(d1, device=dev)
    codes = code(rem_d, batch)[:, None] + r * s_d.sum() - d1 * steps.cumsum(1)[:, :d1]  # (P, d1)
    # one stable sort of all (point, vertex) entries gives the vertex ids, a representative entry per
    # vertex and the vertex-major order of the splat matrix (points ascending within a vertex)
    sorted_codes, perm = torch.sort(codes.reshape(-1), stable=True)
    first = torch.ones_like(sorted_codes, dtype=torch.bool)
    first[1:] = sorted_codes[1:] != sorted_codes[:-1]
    vid_sorted = first.cumsum(0) - 1
    uniq = sorted_codes[first]
    num_v = uniq.shape[0]
    vertex = torch.empty_like(vid_sorted)
    vertex[perm] = vid_sorted
    vertex = vertex.reshape(-1, d1)
    rep = perm[first]
    rp, rr = rep // d1, rep % d1
    ukeys = rem_d[rp] + rr[:, None] - d1 * (rank_d[rp] > d - rr[:, None]).long()
    ubatch = batch[rp]

    # blur neighbours along each of the d + 1 lattice directions
    rows_v = torch.arange(num_v, device=dev)
    blur_vals = torch.tensor([1.0, 0.5, 0.5], dtype=dt, device=dev).expand(num_v, 3)
    blurs = []
    for j in range(d1):
        # row i of blur j: itself (weight 1) and its two neighbours along direction j (1/2 each, if present)
        shift = torch.ones(d, dtype=torch.long, device=dev)
        if j < d:
            shift[j] = -d
        cols, present = [rows_v], [torch.ones(num_v, dtype=torch.bool, device=dev)]
        for sign in (-1, 1):
            c = code(ukeys + sign * shift, ubatch)
            pos = torch.searchsorted(uniq, c).clamp_max(num_v - 1)
            cols.append(pos)
            present.append(uniq[pos] == c)
        cols_t, present_t = torch.stack(cols, 1), torch.stack(present, 1)
        crow = torch.zeros(num_v + 1, dtype=torch.long, device=dev)
        crow[1:] = present_t.sum(1).cumsum(0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            blurs.append(torch.sparse_csr_tensor(crow, cols_t[present_t], blur_vals[present_t], (num_v, num_v),
                                                 check_invariants=False))

    nq = b * n
    entry_point = perm // d1
    entry_bary = bary.reshape(-1)[perm]
    slice_ = _point_matrix(vertex[:nq], bary[:nq], num_v)
    if same:
        splat_t = slice_
        splat = slice_t = _vertex_matrix(vid_sorted, entry_point, entry_bary, num_v, nq)
    else:
        splat_t = _point_matrix(vertex[nq:], bary[nq:], num_v)
        is_q = entry_point < nq
        slice_t = _vertex_matrix(vid_sorted[is_q], entry_point[is_q], entry_bary[is_q], num_v, nq)
        splat = _vertex_matrix(vid_sorted[~is_q], entry_point[~is_q] - nq, entry_bary[~is_q], num_v,
                               vertex.shape[0] - nq)
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


def _cached_lattice(query: Tensor, key: Tensor, same: bool, points, tag: str) -> Lattice:
    """The lattice of (query, key), reused while they are the same, unmodified tensors.

    ``points()`` gives the scaled, flattened (q, k) point sets; it runs only when a lattice is built.
    """
    sig = (tag, query.data_ptr(), query._version, tuple(query.shape), key.data_ptr(), key._version,
           tuple(key.shape), query.dtype, query.device)
    for entry in _cache:
        s, qref, kref, lat = entry
        if s == sig and qref() is query and (kref() if kref is not None else key) is key:
            return lat
    lat = build_lattice(*points(), same)
    _cache.insert(0, (sig, weakref.ref(query), None if same else weakref.ref(key), lat))
    del _cache[_CACHE_SIZE:]
    return lat


def run(query: Tensor, key: Tensor, value: Tensor, affinity: Gaussian, graph) -> Tensor:
    lead = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
    n, m, d, e = query.shape[-2], key.shape[-2], query.shape[-1], value.shape[-1]
    cd = compute_dtype(query.dtype)
    same = query is key
    def points() -> tuple[Tensor, Tensor]:
        form = affinity.form(query.detach().to(cd), key.detach().to(cd))
        q = form.query.expand(*lead, n, d).reshape(-1, n, d).contiguous()
        k = q if same else form.key.expand(*lead, m, d).reshape(-1, m, d).contiguous()
        return q, k

    with torch.no_grad():
        lattice = _cached_lattice(query, key, same, points, repr(affinity))
    v = value.to(cd).expand(*lead, m, e).reshape(-1, e)
    if affinity.normalize:
        v = torch.cat([v, torch.ones(v.shape[0], 1, dtype=cd, device=v.device)], dim=-1)
    y = _LatticeFilter.apply(v.contiguous(), lattice)
    if affinity.normalize:
        y = y[:, :e] / y[:, e:].clamp_min(torch.finfo(cd).tiny)
    return y.reshape(*lead, n, e).to(query.dtype)
