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
lattices of the last few feature sets are cached: a dense CRF filters the same image at every
mean-field iteration, and every same-size image has the same position-only (smoothness) features.

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

__all__ = ["can_run", "prefer", "run", "Lattice", "build_lattice", "clear_cache", "MAX_FEATURE_DIM", "EXACT"]

EXACT = False
#: The lattice has (d + 1) vertices per point and d + 1 blur directions: cheap for small d only.
MAX_FEATURE_DIM = 16
#: Automatic dispatch takes the lattice for d <= AUTO_MAX_DIM and N * M >= AUTO_MIN_PAIRS only;
#: smaller problems are cheap to compute exactly.
AUTO_MAX_DIM = 8
AUTO_MIN_PAIRS = 1 << 22
_CACHE_SIZE = 4
#: Simplex sort keys combine (point code, rank digits) into one int64 while they fit in this many bits.
_ONE_KEY_BITS = 62


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

    splat: Tensor        # (V, B*M) CSR: key points (in splat_order) -> vertices
    splat_order: Tensor  # (B*M,) the key points grouped by simplex: splat's column j is point splat_order[j]
    splat_t: Tensor      # (B*M, V) CSR
    slice: Tensor        # (B*N, V) CSR: vertices -> query points (without alpha)
    slice_t: Tensor      # (V, B*N) CSR, columns in slice_t_order
    slice_t_order: Tensor
    blurs: list[Tensor]  # d + 1 CSR (V, V) matrices, symmetric
    alpha: float
    num_vertices: int

    def filter(self, values: Tensor, transpose: bool = False) -> Tensor:
        """values (B*M, e) -> (B*N, e); with ``transpose`` the adjoint map (B*N, e) -> (B*M, e)."""
        first, order, last, blurs = ((self.splat, self.splat_order, self.slice, self.blurs) if not transpose
                                     else (self.slice_t, self.slice_t_order, self.splat_t, self.blurs[::-1]))
        x = _csr_mm(first, values.index_select(0, order))
        for b in blurs:
            x = _csr_mm(b, x)
        return _csr_mm(last, x, alpha=self.alpha)


def _index_dtype(*sizes: int) -> torch.dtype:
    """CSR index width: 32 bits where every index and count fits (products run ~1.4x faster: MKL's native width)."""
    return torch.int32 if max(sizes) < 2**31 else torch.long


def _csr(crow: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR matrix, with 32-bit indices where they fit (see :func:`_index_dtype`)."""
    idx = _index_dtype(cols.shape[0], *shape)
    crow, cols = crow.to(idx), cols.to(idx)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, vals, shape, check_invariants=False)


def _point_matrix(cols: Tensor, vals: Tensor, num_v: int) -> Tensor:
    """(points, vertices) CSR from each point's d + 1 (column-sorted) vertices and barycentric weights."""
    p, d1 = cols.shape
    crow = torch.arange(0, p * d1 + 1, d1, device=cols.device, dtype=cols.dtype)
    return _csr(crow, cols.reshape(-1), vals.reshape(-1), (p, num_v))


def _vertex_matrix(sel: Tensor, sid: Tensor, bary: Tensor, slot_order: Tensor, vertex_start: Tensor,
                   num_s: int, num_v: int) -> Tensor:
    """(vertices, points) CSR splatting the points ``sel`` onto their simplices' corners, without a sort.

    ``sel``: point indices grouped by simplex (ascending within one), ``sid`` their simplex ids,
    ``bary`` (P, d+1) the weights of each corner slot (s, r); ``slot_order``: the slots s (d+1) + r
    sorted by vertex (stable), ``vertex_start``: where each vertex's run begins in that order. Column
    j is point ``sel[j]``: a vertex's row is then the runs of its corner slots' simplices, in simplex
    order, so every row comes out sorted although the P (d+1) entries are never sorted (apply the
    matrix to ``values[sel]``).
    """
    d1 = bary.shape[1]
    dev = sid.device
    q = sel.shape[0]
    ssid = sid[sel]  # non-decreasing
    cnt = torch.bincount(ssid, minlength=num_s)
    start = cnt.cumsum(0) - cnt
    run = cnt.repeat_interleave(d1)[slot_order]  # run lengths of the slots, in vertex order
    run_start = run.cumsum(0) - run
    slot_start = torch.empty_like(run_start)
    slot_start[slot_order] = run_start
    j = torch.arange(q, device=dev)
    pos = (slot_start.view(num_s, d1).index_select(0, ssid) + (j - start[ssid])[:, None]).reshape(-1)
    idx = _index_dtype(q * d1, num_v)
    cols = torch.empty(q * d1, dtype=idx, device=dev)
    cols[pos] = j.to(idx).repeat_interleave(d1)
    vals = torch.empty(q * d1, dtype=bary.dtype, device=dev)
    vals[pos] = bary.index_select(0, sel).reshape(-1)
    crow = torch.empty(num_v + 1, dtype=torch.long, device=dev)
    crow[:-1] = run_start[vertex_start]
    crow[-1] = q * d1
    return _csr(crow, cols, vals, (num_v, q))


def _csr_mm(a: Tensor, x: Tensor, alpha: float = 1.0) -> Tensor:
    """a @ x (a sparse CSR) written straight into a fresh output (``a @ x`` zero-fills and copies: ~1.5x slower)."""
    out = torch.empty(a.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    return torch.addmm(out, a, x, beta=0.0, alpha=alpha, out=out)


def _lex_sort(keys: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """(the permutation sorting rows by (keys[0], keys[1], ...) lexicographically (stable), the keys in that order)."""
    if len(keys) == 1:
        ordered, order = torch.sort(keys[0], stable=True)
        return order, [ordered]
    order = None
    for k in reversed(keys):
        order = torch.sort(k, stable=True)[1] if order is None else order[torch.sort(k[order], stable=True)[1]]
    return order, [k[order] for k in keys]


def _group_ids(order: Tensor, ordered_keys: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Dense ids of equal keys from a lexicographic sort: (id of each row, where each group starts in the order)."""
    first = torch.zeros(order.shape[0], dtype=torch.bool, device=order.device)
    first[0] = True
    for k in ordered_keys:
        first[1:] |= k[1:] != k[:-1]
    ids = torch.empty_like(order)
    ids[order] = first.cumsum(0) - 1
    return ids, first


def _elevate(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Points (P, d) -> (remainder-0 point (P, d+1), rank (P, d+1), barycentric weights (P, d+1)).

    Computed coordinate-major ((d+1, P): every operation runs over long contiguous rows, ~2x faster
    than (P, d+1)); the results are (P, d+1) views of it.
    """
    p, d = features.shape
    d1 = d + 1
    dev, dt = features.device, features.dtype
    i = torch.arange(d, device=dev, dtype=dt)
    scale = math.sqrt(2.0 / 3.0) * d1 / torch.sqrt((i + 2) * (i + 1))
    cf = features.t() * scale[:, None]  # (d, P)
    # elevated[0] = sum_j cf_j, elevated[c] = sum_{j >= c} cf_j - c cf_{c-1}: suffix sums accumulated
    # from the last coordinate, in the reference code's order
    suffix = cf.flip(0).cumsum(0).flip(0)
    elevated = torch.zeros(d1, p, device=dev, dtype=dt)
    elevated[:d] = suffix
    elevated[1:] -= torch.arange(1, d1, device=dev, dtype=dt)[:, None] * cf
    # nearest remainder-0 point (ties go down, as the reference code rounds)
    down = torch.floor(elevated / d1).mul_(d1)
    # rem0 = up (= down + d + 1) where up - elevated < elevated - down, else down; in place
    rem0 = down.add_((down + d1).sub_(elevated).lt_(elevated - down).mul_(d1))
    total = torch.round(rem0.sum(0) / d1).int()
    # rank[i] = position of coordinate i when the residuals are sorted in decreasing order, ties
    # broken by index (the reference's pairwise rule: for i < j, d_i < d_j ranks i later, else j)
    diff = elevated.sub_(rem0)
    rank = total.expand(d1, p).clone()
    for j in range(d1):
        rank[:j] += diff[j] > diff[:j]
        rank[j + 1:] += diff[j] >= diff[j + 1:]
    # wrap ranks into [0, d], moving the remainder-0 point by -+(d+1) accordingly
    wrapped = torch.remainder(rank, d1)
    shift = (rank - wrapped).to(dt)
    rem0 -= shift
    val = diff.add_(shift).div_(d1)  # (elevated - rem0) / d1 with the moved rem0
    rank = wrapped.long()
    # barycentric weights: with v the residuals ordered by rank (v[d - rank_i] = val_i),
    # bary[k] = v[k] - v[k-1] for k = 1..d and bary[0] = v[0] + 1 - v[d]
    v = torch.empty(d1, p, device=dev, dtype=dt).scatter_(0, d - rank, val)
    bary = torch.empty(d1, p, device=dev, dtype=dt)
    torch.sub(v[1:], v[:-1], out=bary[1:])
    bary[0] = v[0] + (1.0 - v[d])
    return rem0.long().t(), rank.t(), bary.t()


def build_lattice(query: Tensor, key: Tensor, same: bool) -> Lattice:
    """Build the lattice of query points (B, N, d) and key points (B, M, d) (same=True: one point set)."""
    b, n, d = query.shape
    m = key.shape[1]
    d1 = d + 1
    dev, dt = query.device, query.dtype
    pts = query.reshape(-1, d) if same else torch.cat([query.reshape(-1, d), key.reshape(-1, d)])
    batch = None  # the batch index of each point (None: one image)
    if b > 1:
        batch = torch.arange(b, device=dev).repeat_interleave(n)
        if not same:
            batch = torch.cat([batch, torch.arange(b, device=dev).repeat_interleave(m)])
    rem0, rank, bary = _elevate(pts)
    # Lattice points are packed into int64 codes  sum_i (key[i] - lo[i]) * stride[i] + batch * stride[d]
    rem_d, rank_d = rem0[:, :d], rank[:, :d]
    lo = rem_d.amin(0) - 2 * d1  # room for the -d1 of canonical and the +-d1 of blur neighbours
    span = rem_d.amax(0) + 2 * d1 - lo + 1
    sizes = torch.cat([span, torch.tensor([b], device=dev)])
    code_bits = float(torch.log2(sizes.double()).sum())
    if code_bits >= 62:
        raise ValueError(f"permutohedral: feature range too large to index the lattice (coordinate spans "
                         f"{sizes.tolist()}); rescale the features or use an exact backend")
    strides = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long, device=dev), sizes[:-1]]), 0)
    s_d = strides[:d]

    base = (lo * s_d).sum()

    def code(k: Tensor, bidx: Optional[Tensor]) -> Tensor:
        c = (k * s_d).sum(-1) - base
        return c if bidx is None else c + bidx * strides[d]

    # 1. Simplices. Points with the same remainder-0 point and rank lie in the same simplex and share
    # its d + 1 vertices; there are far fewer simplices than points (a quarter on a 512x512 photo), so
    # vertices are found per simplex. (rank[d] and rem0[d] follow from the first d entries.)
    per = max(1, int(62 // math.log2(d1)))  # rank digits per int64 sort key
    digits = d1 ** torch.arange(per, device=dev)
    rank_keys = [(rank_d[:, i:i + per] * digits[:min(per, d - i)]).sum(-1) for i in range(0, d, per)]
    pcode = code(rem_d, batch)
    if len(rank_keys) == 1 and code_bits + d * math.log2(d1) < _ONE_KEY_BITS:  # (point code, rank digits) in one key
        keys = [pcode * d1 ** d + rank_keys[0]]
    else:  # several keys, sorted lexicographically
        keys = [pcode] + rank_keys
    order, ordered = _lex_sort(keys)
    sid, new_s = _group_ids(order, ordered)
    rep = order[new_s]  # one point per simplex
    num_s = rep.shape[0]
    # vertex r of a simplex: key[i] = rem0[i] + canonical[r, rank[i]] with canonical[r, j] = r - d1 [j > d - r];
    # the [rank > d - r] part is a cumulative sum over r of each coordinate's stride, scattered at r = d - rank + 1
    srank = rank_d[rep]
    steps = torch.zeros(num_s, d1 + 1, dtype=torch.long, device=dev)
    steps.scatter_add_(1, d - srank + 1, s_d.expand_as(srank).contiguous())
    r = torch.arange(d1, device=dev)
    corner0 = code(rem_d[rep], None if batch is None else batch[rep])
    codes = corner0[:, None] + r * s_d.sum() - d1 * steps.cumsum(1)[:, :d1]  # (S, d1)
    perm, (sorted_codes,) = _lex_sort([codes.reshape(-1)])
    slot_vertex, first = _group_ids(perm, [sorted_codes])
    slot_vertex = slot_vertex.reshape(num_s, d1)  # vertex id of each simplex corner
    uniq = sorted_codes[first]
    num_v = uniq.shape[0]

    # 2. Blur neighbours along each of the d + 1 lattice directions. Codes are linear in the key (the
    # margins in lo/span keep neighbours inside the coordinate ranges), so the neighbours of vertex u
    # along direction j are code(u) -+ delta_j, delta_j the code of the step (1, ..., 1, -d at j, 1, ...).
    steps_j = torch.ones(d1, d, dtype=torch.long, device=dev)
    steps_j[torch.arange(d, device=dev), torch.arange(d, device=dev)] = -d  # direction d: all ones
    delta = (steps_j * s_d).sum(1)
    neigh = torch.stack([uniq[:, None] - delta, uniq[:, None] + delta], 2)  # (V, d+1, 2)
    pos = torch.searchsorted(uniq, neigh.reshape(-1)).clamp_max_(num_v - 1).view(num_v, d1, 2)
    pos = torch.where(uniq[pos] == neigh, pos, num_v)  # absent neighbour: column num_v
    # row i of blur j: itself (weight 1) and its neighbours along direction j (1/2 each, if present),
    # column-sorted (a CSR invariant) by min / middle / max of the three; absent ones sort last
    self_ = torch.arange(num_v, device=dev)[:, None].expand(num_v, d1)
    lo_, hi_ = torch.minimum(pos[..., 0], pos[..., 1]), torch.maximum(pos[..., 0], pos[..., 1])
    first_c, last_c = torch.minimum(self_, lo_), torch.maximum(self_, hi_)
    cols3 = torch.stack([first_c, self_ + lo_ + hi_ - first_c - last_c, last_c], 2)  # (V, d+1, 3)
    vals3 = torch.where(cols3 == self_[..., None], 1.0, 0.5).to(dt)
    keep3 = cols3 < num_v
    counts = keep3.sum(2)  # (V, d+1)
    blurs = []
    for j in range(d1):
        crow = torch.zeros(num_v + 1, dtype=torch.long, device=dev)
        crow[1:] = counts[:, j].cumsum(0)
        keep = keep3[:, j]
        blurs.append(_csr(crow, cols3[:, j][keep], vals3[:, j][keep], (num_v, num_v)))

    # 3. Splat and slice. Point-major rows: the point's simplex corners, sorted per simplex once.
    bary = bary.contiguous()  # point-major from here on (gathers of rows)
    corner_cols, corner_order = torch.sort(slot_vertex, dim=1)
    corner_cols = corner_cols.to(_index_dtype(num_v, pts.shape[0] * d1))
    pt_cols = corner_cols.index_select(0, sid)
    pt_vals = torch.gather(bary, 1, corner_order.index_select(0, sid))
    nq = b * n
    slice_ = _point_matrix(pt_cols[:nq], pt_vals[:nq], num_v)
    vm = dict(sid=sid, bary=bary, slot_order=perm, vertex_start=first, num_s=num_s, num_v=num_v)
    if same:
        splat_t, slice_t_order = slice_, order
        splat = slice_t = _vertex_matrix(order, **vm)
        splat_order = order
    else:
        splat_t = _point_matrix(pt_cols[nq:], pt_vals[nq:], num_v)
        is_q = order < nq
        slice_t_order, splat_order = order[is_q], order[~is_q]
        slice_t = _vertex_matrix(slice_t_order, **vm)
        splat = _vertex_matrix(splat_order, **vm)
        splat_order = splat_order - nq
    return Lattice(splat, splat_order, splat_t, slice_, slice_t, slice_t_order, blurs, 1.0 / (1.0 + 2.0 ** (-d)),
                   num_v)


class _LatticeFilter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, lattice):
        ctx.lattice = lattice
        return lattice.filter(values)

    @staticmethod
    def backward(ctx, grad):
        return ctx.lattice.filter(grad.contiguous(), transpose=True), None


@dataclass
class _CacheEntry:
    sig: tuple                    # identity of the last (query, key) tensors that used this lattice
    query_ref: weakref.ref
    key_ref: Optional[weakref.ref]
    points: tuple[Tensor, Optional[Tensor]]  # copies of the scaled point sets the lattice was built on
    lattice: Lattice


_cache: list[_CacheEntry] = []


def clear_cache() -> None:
    """Forget every cached lattice (benchmarks use it to time cold builds)."""
    _cache.clear()


def _cached_lattice(query: Tensor, key: Tensor, same: bool, points, tag: str) -> Lattice:
    """The lattice of (query, key), reused for the same features.

    Two levels: the same unmodified tensors (identity and version: free), then equal point sets
    (one comparison against a stored copy: e.g. the position-only smoothness features of every
    same-size image in a dataset). ``points()`` gives the scaled, flattened (q, k) point sets.
    """
    sig = (tag, query.data_ptr(), query._version, tuple(query.shape), key.data_ptr(), key._version,
           tuple(key.shape), query.dtype, query.device)
    for entry in _cache:
        if entry.sig == sig and entry.query_ref() is query and (
                entry.key_ref() if entry.key_ref is not None else key) is key:
            return entry.lattice
    q, k = points()
    hit = next((e for e in _cache if e.sig[0] == tag and (e.points[1] is None) == same
                and e.points[0].shape == q.shape and e.points[0].dtype == q.dtype and e.points[0].device == q.device
                and torch.equal(e.points[0], q) and (same or (e.points[1].shape == k.shape
                                                             and torch.equal(e.points[1], k)))), None)
    if hit is not None:
        _cache.remove(hit)
        lat, stored = hit.lattice, hit.points
    else:
        lat, stored = build_lattice(q, k, same), (q.clone(), None if same else k.clone())
    _cache.insert(0, _CacheEntry(sig, weakref.ref(query), None if same else weakref.ref(key), stored, lat))
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
