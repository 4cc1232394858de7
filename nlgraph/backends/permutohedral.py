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

Written with tensor ops only (no Python loop over points), so the same code runs on CPU and CUDA:
lattice keys are packed into int64 codes, points grouped into simplices and simplex corners into
vertices by sorting codes, blur neighbours found in a dense code table (small code spaces) or by
``searchsorted``; splat, each blur direction and slice are CSR matrices built once per lattice
(the vertex-major ones by counting, without sorting the P (d+1) entries).
A batch index is part of each key, so one lattice (block diagonal) serves the whole batch. The
lattices of the last few feature sets are cached, keyed on the features' and the bandwidth's values
(see the cache section below): a dense CRF filters the same image at every mean-field iteration, and
every same-size image has the same position-only (smoothness) features.

Differentiable w.r.t. the values (the filter is linear; its adjoint is the same matrices
transposed, blurs in reverse order). Not differentiable w.r.t. the features: the lattice's
structure is piecewise constant in them, so ``can_run`` refuses inputs whose features require
gradients (the exact backends handle those).

Approximation: a few percent relative error against the exact Gaussian sum on typical CRF
features (measured in tests/test_permutohedral.py, reported in the README). Float32 points far from
the origin (lattice coordinates beyond 2^12) are elevated in float64, where float32 would no longer
resolve their barycentric weights; points beyond float64's reach or spanning more lattice cells than
int64 codes index raise a ValueError.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..affinity import Gaussian
from .common import compute_dtype

__all__ = ["can_run", "prefer", "run", "Lattice", "build_lattice", "clear_cache", "MAX_FEATURE_DIM", "EXACT",
           "RETURNS_LSE"]

EXACT = False
RETURNS_LSE = True
#: The lattice has (d + 1) vertices per point and d + 1 blur directions: cheap for small d only.
MAX_FEATURE_DIM = 16
#: Automatic dispatch takes the lattice for d <= AUTO_MAX_DIM and N * M >= AUTO_MIN_PAIRS only;
#: smaller problems are cheap to compute exactly.
AUTO_MAX_DIM = 8
AUTO_MIN_PAIRS = 1 << 22
_CACHE_SIZE = 4
#: Simplex sort keys combine (point code, rank digits) into one int64 while they fit in this many bits.
_ONE_KEY_BITS = 62
#: Points per block where a step runs block-wise to keep its temporaries small.
_BLOCK = 1 << 16
#: Code lookups use a dense table while the code space is at most this many times the number of lookups.
_DENSE_LOOKUP = 16
_DENSE_MAX = 1 << 24  # entries (64 MiB of int32) at most
#: Elevated (lattice) coordinates are computed in float32 while their magnitude is at most this: the
#: elevation rounds each coordinate once per term (<= d + 1 terms) and the barycentric weights are
#: differences of the residuals / (d + 1), so their absolute error is <= ~2 u |coordinate| = 2^-11 here
#: (u = 2^-24), well below the lattice's own approximation error. Beyond it, float64 (what pydensecrf's
#: float32 code loses there, this keeps); float64 resolves the weights to 2^-11 up to 2^41.
_FLOAT32_ELEVATED = 2.0 ** 12
_FLOAT64_ELEVATED = 2.0 ** 41


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
    """Splat/blur/slice operators of one lattice over a batch of query and key points.

    Vertex space has V + 2 rows: the V lattice vertices at 1..V and two empty border vertices, 0 and
    V + 1, that stand for absent blur neighbours (the reference code's zero vertex): no point splats
    onto them, so they stay 0 and every blur row is [below, self, above].
    """

    splat: Tensor        # (V+2, B*M) CSR: key points (in splat_order) -> vertices
    splat_order: Tensor  # (B*M,) the key points grouped by simplex: splat's column j is point splat_order[j]
    splat_t: Tensor      # (B*M, V+2) CSR
    slice: Tensor        # (B*N, V+2) CSR: vertices -> query points (without alpha)
    slice_t: Tensor      # (V+2, B*N) CSR, columns in slice_t_order
    slice_t_order: Tensor
    blurs: list[Tensor]  # d + 1 CSR (V+2, V+2) matrices, symmetric
    alpha: float
    num_vertices: int    # V

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


def _segmented_arange(off: Tensor, run_start: Tensor, total: int, step: int, dtype: torch.dtype) -> Tensor:
    """``k * step + off[t]`` at every position k of run t, for runs laid end to end from ``run_start``.

    Built in one buffer without materialising per-run ranges: the steps, plus the jumps between
    consecutive runs' offsets at the runs' starts (empty runs share a start; their jumps telescope),
    summed up in place.
    """
    z = torch.full((total + 1,), step, dtype=dtype, device=off.device)
    z[0] = 0
    z.index_add_(0, run_start, torch.diff(off, prepend=off.new_zeros(1)).to(dtype))
    return z.cumsum_(0)[:total]


def _vertex_matrix(sel: Tensor, sid: Tensor, bary: Tensor, slot_s: Tensor, slot_r: Tensor, vertex_start: Tensor,
                   num_s: int, num_v: int) -> Tensor:
    """(V + 2, points) CSR splatting the points ``sel`` onto their simplices' corners, without a sort.

    ``sel``: point indices grouped by simplex (ascending within one), ``sid`` every point's simplex id,
    ``bary`` (P, d+1) the weights of each corner slot (s, r); ``slot_s``/``slot_r``: the slots'
    simplex and corner, sorted by vertex (stable); ``vertex_start``: where each vertex's run of slots
    begins in that order. Column j is point ``sel[j]`` (apply the matrix to ``values[sel]``): a
    vertex's row is the column ranges of its slots' simplices, in simplex order, so every row comes
    out sorted although the P (d+1) entries are never sorted. Rows 0 and V + 1 are the lattice's
    empty border vertices (see :class:`Lattice`).
    """
    d1 = bary.shape[1]
    q = sel.shape[0]
    nnz = q * d1
    small = _index_dtype(nnz * d1)  # every count, start and offset below fits
    cnt = torch.bincount(sid.index_select(0, sel), minlength=num_s).to(small)  # points per simplex
    start = cnt.cumsum(0, dtype=small).sub_(cnt)  # first column of each simplex
    run = cnt.index_select(0, slot_s)  # entries of each slot, in vertex order
    run_start = run.cumsum(0, dtype=small).sub_(run)
    off = start.index_select(0, slot_s).sub_(run_start)  # entry k of slot t: column k + off[t]
    # entry k of slot t = (s, r) is the weight bary[sel[column], r]: entry column * (d+1) + r of the
    # gathered weights; the column is that index // (d+1), computed in place afterwards (one buffer)
    flat = _segmented_arange(off * d1 + slot_r, run_start, nnz, d1, _index_dtype(nnz * d1))
    vals = bary.index_select(0, sel).view(-1).index_select(0, flat)
    cols = flat.div_(d1, rounding_mode="floor").to(_index_dtype(nnz, num_v + 2))
    del flat
    crow = torch.empty(num_v + 3, dtype=torch.long, device=sid.device)
    crow[0] = 0
    crow[1:-2] = run_start.masked_select(vertex_start)
    crow[-2:] = nnz
    return _csr(crow, cols, vals, (num_v + 2, q))


def _csr_mm(a: Tensor, x: Tensor, alpha: float = 1.0) -> Tensor:
    """a @ x (a sparse CSR) written straight into a fresh output (``a @ x`` zero-fills and copies: ~1.5x slower)."""
    out = torch.empty(a.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    return torch.addmm(out, a, x, beta=0.0, alpha=alpha, out=out)


def _find_codes(uniq: Tensor, codes: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """(position of each code in the sorted unique codes ``uniq`` (any where absent), present?).

    Small code spaces (``num_codes``, e.g. 2-d position features) use a dense table (a fill, a
    scatter and a gather: ~5x faster than binary search); others a binary search.
    """
    if num_codes <= min(_DENSE_LOOKUP * codes.shape[0], _DENSE_MAX):
        table = torch.full((num_codes,), -1, dtype=_index_dtype(uniq.shape[0]), device=uniq.device)
        table.index_copy_(0, uniq, torch.arange(uniq.shape[0], dtype=table.dtype, device=uniq.device))
        pos = table.index_select(0, codes).long()
        return pos, pos >= 0
    pos = torch.searchsorted(uniq, codes).clamp_max_(uniq.shape[0] - 1)
    return pos, uniq.index_select(0, pos) == codes


def _lex_sort(keys: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """(the permutation sorting rows by (keys[0], keys[1], ...) lexicographically (stable), the keys in that order)."""
    if len(keys) == 1:
        ordered, order = torch.sort(keys[0], stable=True)
        return order, [ordered]
    order = None
    for k in reversed(keys):
        order = (torch.sort(k, stable=True)[1] if order is None
                 else order.index_select(0, torch.sort(k.index_select(0, order), stable=True)[1]))
    return order, [k.index_select(0, order) for k in keys]


def _group_ids(order: Tensor, ordered_keys: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Dense ids of equal keys from a lexicographic sort: (id of each row, where each group starts in the order)."""
    first = torch.zeros(order.shape[0], dtype=torch.bool, device=order.device)
    first[0] = True
    for k in ordered_keys:
        first[1:] |= k[1:] != k[:-1]
    ids = torch.empty_like(order)
    ids.index_copy_(0, order, first.cumsum(0) - 1)
    return ids, first


def _elevate(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Points (P, d) -> (remainder-0 point (d+1, P), rank (d+1, P), barycentric weights (P, d+1)).

    The reference code's arithmetic, step for step (float32 products with the bandwidth scale computed
    in double, rounding by ``* 1/(d+1)``, its tie rules), written over coordinate rows: operations run
    over long contiguous rows (~2x faster than (P, d+1)), in blocks of points whose temporaries stay
    small and cache-resident (fresh memory costs page faults). The rank is returned as whole floats
    (half the memory of int64; exact).
    """
    p, d = features.shape
    d1 = d + 1
    dev, dt = features.device, features.dtype
    rem0 = torch.empty(d1, p, device=dev, dtype=dt)
    rank = torch.empty(d1, p, device=dev, dtype=dt)
    bary = torch.empty(p, d1, device=dev, dtype=dt)
    scale = [math.sqrt(2.0 / 3.0) * d1 / math.sqrt((c + 1) * c) for c in range(1, d + 1)]  # scale[c - 1]
    ft = features.t()
    for s in range(0, p, _BLOCK):
        e = min(p, s + _BLOCK)
        _elevate_block(ft[:, s:e], scale, rem0[:, s:e], rank[:, s:e], bary[s:e])
    return rem0, rank, bary


def _elevate_block(ft: Tensor, scale: list[float], rem0: Tensor, rank: Tensor, bary: Tensor) -> None:
    """:func:`_elevate` of the points ``ft`` (d, n), into the (d+1, n) / (n, d+1) output views."""
    d, n = ft.shape
    d1 = d + 1
    # elevated[d] = -d cf[d-1]; elevated[c] = sum_{j >= c} cf_j - c cf[c-1]; elevated[0] = sum_j cf_j,
    # the sum accumulated from the last coordinate, as the reference does
    el = torch.empty(d1, n, device=ft.device, dtype=ft.dtype)
    acc = None
    for c in range(d, 0, -1):
        cf = ft[c - 1] * scale[c - 1]
        if acc is None:
            torch.mul(cf, -c, out=el[c])
            acc = cf
        else:
            torch.sub(acc, cf * c, out=el[c])
            acc.add_(cf)
    el[0] = acc
    # nearest remainder-0 point: up = down + d + 1 where up - elevated < elevated - down, else down
    torch.mul(el, 1.0 / d1, out=rem0).floor_().mul_(d1)
    below = el - rem0
    up_gap = torch.add(rem0, d1, out=rank).sub_(el)  # rank's buffer, free until the rank
    rem0.add_(up_gap < below, alpha=d1)
    total = rem0.sum(0).mul_(1.0 / d1).round_()
    # rank[i] = position of coordinate i when the residuals are sorted in decreasing order, ties
    # broken by index (the reference's pairwise rule: for i < j, d_i < d_j ranks i later, else j)
    diff = el.sub_(rem0)
    rank.copy_(total.expand(d1, n))
    for j in range(d1):
        if j:
            rank[:j] += torch.gt(diff[j], diff[:j], out=below[:j])
        if j < d:
            rank[j + 1:] += torch.ge(diff[j], diff[j + 1:], out=below[j + 1:])
    # wrap ranks into [0, d], moving the remainder-0 point by -+(d+1) accordingly
    shift = torch.div(rank, d1, out=below).floor_().mul_(d1)  # exact: an integer's quotient is exact when whole
    rank.sub_(shift)
    rem0.sub_(shift)
    val = diff.add_(shift).mul_(1.0 / d1)  # (elevated - rem0) / (d + 1) with the moved rem0
    # barycentric weights: with v the residuals ordered by rank (v[d - rank_i] = val_i),
    # bary[k] = v[k] - v[k-1] for k = 1..d and bary[0] = v[0] + 1 - v[d]; every (slot, point) written once
    v = below.scatter_(0, rank.long().neg_().add_(d), val)
    torch.sub(v[1:], v[:-1], out=bary.t()[1:])
    torch.add(v[0], 1.0, out=bary[:, 0]).sub_(v[d])


def _elevation_gain(d: int) -> float:
    """A bound on max |elevated coordinate| / max |feature| (see :func:`_elevate_block`):
    |el_c| <= sum_{j > c} |cf_j| + c |cf_c| with cf_j = f_j scale_j."""
    scale = [math.sqrt(2.0 / 3.0) * (d + 1) / math.sqrt((c + 1) * c) for c in range(1, d + 1)]
    return sum(scale) + d * max(scale)


def _elevation_bound(*points: Tensor) -> float:
    """A bound on the magnitude of the lattice coordinates of point sets (..., d) (inf if not finite)."""
    return max(float(p.detach().abs().amax()) for p in points) * _elevation_gain(points[0].shape[-1])


def build_lattice(query: Tensor, key: Tensor, same: bool, dtype: Optional[torch.dtype] = None) -> Lattice:
    """Build the lattice of query points (B, N, d) and key points (B, M, d) (same=True: one point set).

    Args:
        query, key: the points (features divided by the bandwidth).
        same: key is query (one point set).
        dtype: the dtype of the filter's matrices (default: the points' dtype). Points of a float32
            (or lower) dtype whose lattice coordinates exceed ``_FLOAT32_ELEVATED`` are elevated in
            float64 (float32 would not resolve their barycentric weights).

    Raises:
        ValueError: points too far from the origin for float64 (|lattice coordinate| > 2^41), or
            spanning more lattice cells than int64 vertex codes can index.
    """
    b, n, d = query.shape
    m = key.shape[1]
    d1 = d + 1
    dev, dt = query.device, (query.dtype if dtype is None else dtype)
    pts = query.reshape(-1, d) if same else torch.cat([query.reshape(-1, d), key.reshape(-1, d)])
    batch = None  # the batch index of each point (None: one image)
    if b > 1:
        batch = torch.arange(b, device=dev).repeat_interleave(n)
        if not same:
            batch = torch.cat([batch, torch.arange(b, device=dev).repeat_interleave(m)])
    # the range check runs in floating point, before any coordinate is converted to int64 (1e23 does
    # not fit one: it used to wrap around and pass the code-space check below)
    bound = _elevation_bound(pts)
    if not bound <= _FLOAT64_ELEVATED:  # also NaN / Inf
        limit = _FLOAT64_ELEVATED / _elevation_gain(d)
        raise ValueError(
            f"permutohedral: the query/key features divided by the bandwidth reach |x| = "
            f"{bound / _elevation_gain(d):.3g}; the lattice resolves points (in float64) only up to |x| = "
            f"{limit:.3g} for d = {d}: centre or rescale the features, or use an exact backend")
    if pts.dtype != torch.float64 and bound > _FLOAT32_ELEVATED:
        pts = pts.double()
    rem0, rank, bary = _elevate(pts)  # (d + 1, P) each
    bary = bary.to(dt)
    # Lattice points are packed into int64 codes  sum_i (key[i] - lo[i]) * stride[i] + batch * stride[d]
    rem_d = rem0[:d]
    lo = rem_d.amin(1).long() - 2 * d1  # room for the -d1 of canonical and the +-d1 of blur neighbours
    span = rem_d.amax(1).long() + 2 * d1 - lo + 1
    sizes = torch.cat([span, torch.tensor([b], device=dev)])
    code_bits = float(torch.log2(sizes.double()).sum())
    if code_bits >= 62:
        raise ValueError(f"permutohedral: the query/key features divided by the bandwidth span too wide a "
                         f"range to index the lattice (lattice coordinate spans {sizes.tolist()[:-1]}, "
                         f"batch {b}: {code_bits:.1f} bits of 62); rescale the features or use an exact "
                         f"backend")
    strides = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long, device=dev), sizes[:-1]]), 0)
    s_d = strides[:d]
    stride_list = strides.tolist()
    # the point codes, one coordinate row at a time
    pcode = rem_d[0].long().mul_(stride_list[0]).sub_(int((lo * s_d).sum()))
    for i in range(1, d):
        pcode.add_(rem_d[i].long(), alpha=stride_list[i])
    if batch is not None:
        pcode.add_(batch, alpha=stride_list[d])

    # 1. Simplices. Points with the same remainder-0 point and rank lie in the same simplex and share
    # its d + 1 vertices; there are far fewer simplices than points (a quarter on a 512x512 photo), so
    # vertices are found per simplex. (rank[d] and rem0[d] follow from the first d entries.)
    per = max(1, int(62 // math.log2(d1)))  # rank digits per int64 sort key
    rank_keys = []
    for i in range(0, d, per):
        k = rank[i].long()
        for t in range(1, min(per, d - i)):
            k.add_(rank[i + t].long(), alpha=d1 ** t)
        rank_keys.append(k)
    if len(rank_keys) == 1 and code_bits + d * math.log2(d1) < _ONE_KEY_BITS:  # (point code, rank digits) in one key
        keys = [torch.mul(pcode, d1 ** d).add_(rank_keys[0])]
    else:  # several keys, sorted lexicographically
        keys = [pcode] + rank_keys
    order, ordered = _lex_sort(keys)
    sid, new_s = _group_ids(order, ordered)
    rep = order.masked_select(new_s)  # one point per simplex
    num_s = rep.shape[0]
    # vertex r of a simplex: key[i] = rem0[i] + canonical[r, rank[i]] with canonical[r, j] = r - d1 [j > d - r];
    # the [rank > d - r] part is a cumulative sum over r of each coordinate's stride, scattered at r = d - rank + 1
    srank = torch.stack([rank[i].index_select(0, rep) for i in range(d)], 1).long()
    del rem0, rem_d, rank, rank_keys, keys, ordered  # free the big temporaries early (less heap growth)
    steps = torch.zeros(num_s, d1 + 1, dtype=torch.long, device=dev)
    steps.scatter_add_(1, d - srank + 1, s_d.expand_as(srank).contiguous())
    r = torch.arange(d1, device=dev)
    corner0 = pcode.index_select(0, rep)
    codes = corner0[:, None] + r * s_d.sum() - d1 * steps.cumsum(1)[:, :d1]  # (S, d1)
    perm, (sorted_codes,) = _lex_sort([codes.reshape(-1)])
    slot_vertex, first = _group_ids(perm, [sorted_codes])
    slot_vertex = slot_vertex.reshape(num_s, d1)  # vertex id of each simplex corner
    uniq = sorted_codes.masked_select(first)
    num_v = uniq.shape[0]
    del pcode, corner0, codes, sorted_codes, steps, srank

    # 2. Blur neighbours along each of the d + 1 lattice directions. Codes are linear in the key (the
    # margins in lo/span keep neighbours inside the coordinate ranges), so the neighbours of vertex u
    # along direction j are code(u) -+ delta_j, delta_j the code of the step (1, ..., 1, -d at j, 1, ...).
    # Only the + neighbours are searched; the - neighbours are their inverse. Matrix indices are vertex
    # ids + 1: index 0 and V + 1 are empty border vertices (always 0, as in the reference code) that
    # stand for an absent neighbour below / above, so every row of a blur is [below, self, above].
    steps_j = torch.ones(d1, d, dtype=torch.long, device=dev)
    steps_j[torch.arange(d, device=dev), torch.arange(d, device=dev)] = -d  # direction d: all ones
    delta = (steps_j * s_d).sum(1)  # never 0: codes are injective
    up, found = _find_codes(uniq, (uniq[:, None] + delta).view(-1), stride_list[d] * b)
    up, found = up.view(num_v, d1), found.view(num_v, d1)
    ascending = (delta > 0).tolist()  # + neighbour above (higher index) in direction j
    vid = torch.arange(1, num_v + 1, device=dev)
    plus = torch.where(found, up + 1, torch.where(delta > 0, num_v + 1, 0))
    minus = torch.where(delta > 0, 0, num_v + 1).expand(num_v + 2, d1).contiguous()
    minus.scatter_(0, plus, vid[:, None].expand(num_v, d1))  # absent + neighbours write a border row
    minus = minus[1:-1]
    idx = _index_dtype(3 * num_v + 1, num_v + 2)
    crow = torch.cat([torch.zeros(1, dtype=idx, device=dev),
                      torch.arange(0, 3 * num_v + 1, 3, dtype=idx, device=dev),
                      torch.full((1,), 3 * num_v, dtype=idx, device=dev)])
    weights = torch.tensor([0.5, 1.0, 0.5], dtype=dt, device=dev).repeat(num_v)
    blurs = []
    for j in range(d1):
        below, above = (minus[:, j], plus[:, j]) if ascending[j] else (plus[:, j], minus[:, j])
        cols = torch.stack([below, vid, above], 1).view(-1)
        blurs.append(_csr(crow, cols, weights, (num_v + 2, num_v + 2)))

    # 3. Splat and slice. Vertex-major matrices first, then the point-major ones (so the temporaries
    # of each never coexist with the other's results: a smaller peak, fewer page faults).
    nq = b * n
    slot_dtype = _index_dtype(perm.shape[0])
    slot_s = torch.div(perm, d1, rounding_mode="floor").to(slot_dtype)
    vm = dict(sid=sid, bary=bary, slot_s=slot_s, slot_r=(perm - slot_s * d1).to(slot_dtype), vertex_start=first,
              num_s=num_s, num_v=num_v)
    if same:
        slice_t_order = splat_order = order
        splat = slice_t = _vertex_matrix(order, **vm)
    else:
        is_q = order < nq
        slice_t_order, splat_order = order.masked_select(is_q), order.masked_select(~is_q)
        slice_t = _vertex_matrix(slice_t_order, **vm)
        splat = _vertex_matrix(splat_order, **vm)
        splat_order = splat_order - nq
    del vm, slot_s, perm, first
    # Point-major rows: the point's simplex corners, sorted per simplex once.
    corner_cols, corner_order = torch.sort(slot_vertex, dim=1)
    num_p = pts.shape[0]
    pt_cols = corner_cols.add_(1).to(_index_dtype(num_v + 2, num_p * d1)).index_select(0, sid)
    # each point's weights in its sorted corners' order: a flat gather (32-bit indices where they fit)
    flat_dtype = _index_dtype(num_p * d1)
    flat = corner_order.to(flat_dtype).index_select(0, sid)
    del corner_cols, corner_order, sid
    flat += torch.arange(0, num_p * d1, d1, dtype=flat_dtype, device=dev)[:, None]
    pt_vals = bary.view(-1).index_select(0, flat.view(-1)).view(num_p, d1)
    del flat, bary
    slice_ = _point_matrix(pt_cols[:nq], pt_vals[:nq], num_v + 2)
    splat_t = slice_ if same else _point_matrix(pt_cols[nq:], pt_vals[nq:], num_v + 2)
    return Lattice(splat, splat_order, splat_t, slice_, slice_t, slice_t_order, blurs, 1.0 / (1.0 + 2.0 ** (-d)),
                   num_v)


class _LatticeFilter(torch.autograd.Function):
    """``lattice.filter(values, transpose)`` as an autograd Function (``setup_context`` style, so
    ``torch.func`` transforms apply). The filter is linear in the values: its VJP is the transposed
    filter, its JVP the filter itself, and a batch of value sets is one filter over more columns
    (the vmap rule), so every derivative is again this Function (any order, under vmap too)."""

    @staticmethod
    def forward(values: Tensor, lattice: Lattice, transpose: bool) -> Tensor:
        return lattice.filter(values, transpose=transpose)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, ctx.lattice, ctx.transpose = inputs

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _LatticeFilter.apply(grad.contiguous(), ctx.lattice, not ctx.transpose), None, None

    @staticmethod
    def jvp(ctx, values_tangent: Tensor, *_):
        return _LatticeFilter.apply(values_tangent.contiguous(), ctx.lattice, ctx.transpose)

    @staticmethod
    def vmap(info, in_dims, values: Tensor, lattice: Lattice, transpose: bool):
        bdim = in_dims[0]
        if bdim is None:
            return _LatticeFilter.apply(values, lattice, transpose), None
        x = values.movedim(bdim, -1)  # (P, e, batch): the batch becomes more value columns
        p, e, nb = x.shape
        y = _LatticeFilter.apply(x.reshape(p, e * nb).contiguous(), lattice, transpose)
        return y.reshape(y.shape[0], e, nb), 2


# ----------------------------------------------------------------------------- the lattice cache
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


def _matches(e: _CacheEntry, query: Tensor, key: Tensor, same: bool, lead: tuple, cd: torch.dtype, b) -> bool:
    return (e.lead == lead and e.same == same and e.compute == cd and _same_bandwidth(e.bandwidth, b)
            and _bits_equal(e.query, query) and (same or _bits_equal(e.key, key)))


def _private(t: Tensor) -> Tensor:
    """A copy that shares no memory with ``t`` (strides kept where dense: comparisons stay fast)."""
    return t.detach().clone()


def _no_functorch():
    """Look up and build outside any torch.func transform: the lattice depends on the features only,
    which those transforms never wrap here (the backend refuses features that need gradients), and
    sparse CSR tensors cannot be created inside one (they have no strides to wrap)."""
    disable = getattr(torch._C, "_DisableFuncTorch", None)
    return disable() if disable is not None else contextlib.nullcontext()


def _cached_lattice(query: Tensor, key: Tensor, same: bool, lead: tuple, cd: torch.dtype, affinity: Gaussian,
                    points) -> Lattice:
    """The lattice of (query, key) under ``affinity``'s bandwidth; ``points(dtype)`` gives the scaled
    point sets (B, N, d), (B, M, d) to build it from.

    Lookups compare against a snapshot of the entries (they are immutable) outside the lock; only
    list updates hold it. Two threads that miss on the same features both build (the same lattice);
    both entries are kept until evicted. Built outside inference mode, so a lattice (and the cache's
    copies) made under ``torch.inference_mode()`` also serves later calls that need gradients.
    """
    b = affinity.bandwidth
    with _cache_lock:
        entries = list(_cache)
    with _no_functorch():  # (a transform would wrap the compared views, which then have no storage)
        hit = next((e for e in entries if _matches(e, query, key, same, lead, cd, b)), None)
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
        lattice = build_lattice(q, k, same, dtype=cd)
        entry = _CacheEntry(lead, same, cd, _private(query), None if same else _private(key),
                            _private(b) if isinstance(b, Tensor) else float(b), lattice)
    with _cache_lock:
        _cache.insert(0, entry)
        del _cache[_CACHE_SIZE:]
    return lattice


def run(query: Tensor, key: Tensor, value: Tensor, affinity: Gaussian, graph, *, return_lse: bool = False):
    lead = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
    n, m, d, e = query.shape[-2], key.shape[-2], query.shape[-1], value.shape[-1]
    cd = compute_dtype(query.dtype)
    if math.prod(lead) == 0:  # an empty batch: nothing to filter
        y = value.new_zeros(*lead, n, e)
        return (y, torch.full((*lead, n), -math.inf, dtype=cd, device=value.device)) if return_lse else y
    same = query is key

    def points(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        q, k = affinity.scaled(query.detach().to(dtype), key.detach().to(dtype))  # fresh tensors: ours alone
        # no .contiguous(): the lattice reads coordinate rows, so coordinate-major (d, N) storage is
        # as good as or better than (N, d), and a transposing copy costs ~1 ms per 262k points
        q = q.expand(*lead, n, d).reshape(-1, n, d)
        k = q if same else k.expand(*lead, m, d).reshape(-1, m, d)
        return q, k

    with torch.no_grad():
        lattice = _cached_lattice(query, key, same, lead, cd, affinity, points)
    v = value.to(cd).expand(*lead, m, e).reshape(-1, e)
    if affinity.normalize:
        v = torch.cat([v, torch.ones(v.shape[0], 1, dtype=cd, device=v.device)], dim=-1)
    y = _LatticeFilter.apply(v.contiguous(), lattice, False)
    lse = None
    if affinity.normalize:
        c = y[:, e:].clamp_min(torch.finfo(cd).tiny)
        y = y[:, :e] / c
        if return_lse:
            lse = torch.log(c.detach()).reshape(*lead, n)  # C depends on the features only (no gradient here)
    y = y.reshape(*lead, n, e).to(query.dtype)
    if not return_lse:
        return y
    return y, (lse if lse is not None else torch.zeros(*lead, n, dtype=cd, device=value.device))
