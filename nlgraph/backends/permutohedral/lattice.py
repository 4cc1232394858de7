"""Lattice construction: elevation onto the permutohedral lattice, simplices, vertices, blur neighbours.

:func:`build_lattice` turns point sets into a :class:`Lattice` (its splat, blur and slice CSR
matrices, see :mod:`.csr`). On the CPU it runs the compiled kernels of :mod:`._jit` where numba
imports (:data:`USE_JIT`); otherwise (CUDA, no numba) tensor ops only (no Python loop over points):
lattice keys are packed into int64 codes, points grouped into simplices and simplex corners into
vertices by sorting codes, blur neighbours found in a dense code table (small code spaces) or by
``searchsorted``. Both number vertices in order of first touch (scanning the points in order, each
point's corners 0..d: the vertices of neighbouring points get neighbouring ids, so the products read
and write nearby rows) and build the same matrices. A batch index is
part of each key, so one lattice (block diagonal) serves the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..._optional import optional
from ..._values import untransformed
from .csr import _csr, _csr_mm, _index_dtype, _point_matrix, _vertex_matrix

#: Simplex sort keys combine (point code, rank digits) into one int64 while they fit in this many bits.
_ONE_KEY_BITS = 62
#: Points per block where a step runs block-wise to keep its temporaries small.
_BLOCK = 1 << 16
#: Code lookups use a dense table while the code space is at most this many times the number of lookups.
_DENSE_LOOKUP = 16
_DENSE_MAX = 1 << 24  # entries (64 MiB of int32) at most
#: Keys longer than this are sorted through int32 where their range fits (see :func:`_sort`).
_NARROW_SORT_MIN = 1 << 12
#: Elevated (lattice) coordinates are computed in float32 while their magnitude is at most this: the
#: elevation rounds each coordinate once per term (<= d + 1 terms) and the barycentric weights are
#: differences of the residuals / (d + 1), so their absolute error is <= ~2 u |coordinate| = 2^-11 here
#: (u = 2^-24), well below the lattice's own approximation error. Beyond it, float64 (what pydensecrf's
#: float32 code loses there, this keeps); float64 resolves the weights to 2^-11 up to 2^41.
_FLOAT32_ELEVATED = 2.0 ** 12
_FLOAT64_ELEVATED = 2.0 ** 41


@dataclass
class Lattice:
    """Splat/blur/slice operators of one lattice over a batch of query and key points.

    Vertex space has V + 2 rows: the V lattice vertices at 1..V and two empty border vertices, 0 and
    V + 1, that stand for absent blur neighbours (the reference code's zero vertex): no point splats
    onto them, so they stay 0 and every blur row is [below, self, above].
    """

    splat: Tensor        # (V+2, B*M) CSR: key points (in splat_order) -> vertices
    splat_order: Optional[Tensor]  # (B*M,) the key points grouped by simplex: splat's column j is point
    #                                splat_order[j] (None: column j is point j)
    splat_t: Tensor      # (B*M, V+2) CSR
    slice: Tensor        # (B*N, V+2) CSR: vertices -> query points (without alpha)
    slice_t: Tensor      # (V+2, B*N) CSR, columns in slice_t_order
    slice_t_order: Optional[Tensor]
    blurs: list[Tensor]  # d + 1 CSR (V+2, V+2) matrices, symmetric
    alpha: float
    num_vertices: int    # V
    # Only built with ``corners=True`` (what the feature gradient needs), over the points in
    # build order (the B*N query points, then, unless same, the B*M key points):
    corners: Optional[Tensor] = None    # (P, d+1) matrix index (vertex id + 1) of each point's corner r
    positions: Optional[Tensor] = None  # (P, d+1) uint8: d - rank of each lattice coordinate, i.e.
    #                                     where its residual sits among the sorted residuals
    # Products derived from this lattice alone, kept with it by their makers under a key of their own
    # (e.g. a dense CRF's kernel normalisation and its scaled lattice on a cached lattice: every
    # same-size image's positions term): never copied into another lattice (``scaled`` makes a new one)
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def filter(self, values: Tensor, transpose: bool = False, *, scale: float = 1.0,
               add: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
        """values (B*M, e) -> (B*N, e); with ``transpose`` the adjoint map (B*N, e) -> (B*M, e).

        ``scale * K(values) + add``: the scale and the addition (``add``: the output's shape; may be
        ``out``) are folded into the slice's product, no pass of their own; written into ``out`` (the
        output's shape and dtype, contiguous) if given, else a fresh tensor."""
        first, order, last, blurs = ((self.splat, self.splat_order, self.slice, self.blurs) if not transpose
                                     else (self.slice_t, self.slice_t_order, self.splat_t, self.blurs[::-1]))
        x = _csr_mm(first, gather(values, order))
        for b in blurs:
            x = _csr_mm(b, x)
        alpha = self.alpha * scale
        if add is not None:
            return torch.addmm(add, last, x, alpha=alpha, out=out)
        return _csr_mm(last, x, alpha=alpha, out=out)

    def scaled(self, rows: Optional[Tensor] = None, cols: Optional[Tensor] = None, *,
               inplace: bool = False) -> "Lattice":
        """The lattice of ``diag(rows) K diag(cols)``: ``scaled(r, c).filter(v) == r[:, None] *
        filter(c[:, None] * v)`` (and its adjoint ``diag(c) K^T diag(r)`` with ``transpose``), the
        scalings folded into the splat's and the slice's weights (no pass over the values of their own:
        what a dense CRF's kernel normalisation costs at every iteration otherwise).

        ``rows``: (B*N,) one factor per query point; ``cols``: (B*M,) one per key point (None: 1), in
        the matrices' dtype. The result shares the index arrays and blurs; it filters values only (no
        ``corners``: the points' derivative is the unscaled lattice's). ``inplace``: scale this
        lattice's own weights where every use of a matrix takes the same factor (one point set scaled
        alike on both sides, or a cross lattice), new ones elsewhere; for a lattice nothing else holds
        (``lattice_of(..., cache=False)``), which must not be filtered on afterwards.
        """
        nq, nk = self.slice.shape[0], self.splat_t.shape[0]
        for name, t, n in (("rows", rows, nq), ("cols", cols, nk)):
            if t is not None and (t.shape != (n,) or t.dtype != self.slice.dtype):
                raise ValueError(f"Lattice.scaled: {name} must be ({n},) {self.slice.dtype}, got "
                                 f"{tuple(t.shape)} {t.dtype}")
        # each matrix's uses: (matrix, its factor, point-major?, the column order); a matrix may serve
        # two (one point set: slice is splat_t and splat is slice_t)
        uses = [(self.splat, cols, False, self.splat_order), (self.splat_t, cols, True, None),
                (self.slice, rows, True, None), (self.slice_t, rows, False, self.slice_t_order)]
        done: dict[tuple[int, int], Tensor] = {}
        out = []
        for m, factor, point_major, order in uses:
            if factor is None:
                out.append(m)
                continue
            if (id(m), id(factor)) not in done:  # one scaled matrix per (matrix, factor)
                alike = all(f is factor for m2, f, _, _ in uses if m2 is m)
                own = inplace and alike and not m.values().requires_grad
                done[id(m), id(factor)] = (_scale_point_rows(m, factor, own) if point_major
                                           else _scale_columns(m, gather(factor, order), own))
            out.append(done[id(m), id(factor)])
        splat, splat_t, slice_, slice_t = out
        return Lattice(splat, self.splat_order, splat_t, slice_, slice_t, self.slice_t_order, self.blurs,
                       self.alpha, self.num_vertices)


def _scale_point_rows(a: Tensor, s: Tensor, inplace: bool = False) -> Tensor:
    """diag(s) a for a point-major CSR matrix a (d + 1 entries in every row, as both builders make
    them): the same index arrays, new values (``inplace``: a's own, scaled)."""
    vals = a.values().view(a.shape[0], -1)
    if inplace:
        vals.mul_(s[:, None])
        return a
    return _csr(a.crow_indices(), a.col_indices(), (vals * s[:, None]).view(-1), (a.shape[0], a.shape[1]))


def _scale_columns(a: Tensor, s: Tensor, inplace: bool = False) -> Tensor:
    """a diag(s) for a CSR matrix a (the same index arrays, new values; ``inplace``: a's own, scaled);
    on the CPU by the compiled one-pass kernel where it runs (:func:`._jit.column_scaled`), else a
    gather and a product."""
    cols, vals = a.col_indices(), a.values()
    plain = (vals.device.type == "cpu" and vals.dtype in (torch.float32, torch.float64) and untransformed()
             and not vals.requires_grad and not s.requires_grad)
    jit = _jit_module() if plain else None
    if jit is not None:
        v = vals.numpy()
        scaled = torch.from_numpy(jit.column_scaled(v, cols.numpy(), s.contiguous().numpy(),
                                                    torch.get_num_threads(), out=v if inplace else None))
    else:
        scaled = vals.mul_(s.index_select(0, cols)) if inplace else vals * s.index_select(0, cols)
    return a if inplace else _csr(a.crow_indices(), cols, scaled, (a.shape[0], a.shape[1]))


def gather(values: Tensor, order: Optional[Tensor]) -> Tensor:
    """The rows of ``values`` in a lattice's column order (``order`` None: as they are)."""
    return values if order is None else values.index_select(0, order)


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


def _sort(key: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.sort(key, stable=True)`` of an int64 key: (sorted key, permutation). A key whose range
    fits 32 bits is sorted as int32 offsets from its minimum: torch sorts int32 faster, and each lattice
    build of the README's 64x128x128 volume takes 6-17% less time (the README's snippet, issue 18)."""
    if key.shape[0] > _NARROW_SORT_MIN:
        lo, hi = (int(v) for v in torch.aminmax(key))
        if hi - lo < 2**31:
            ordered, perm = torch.sort((key - lo).to(torch.int32), stable=True)
            return ordered.long().add_(lo), perm
    return torch.sort(key, stable=True)


def _lex_sort(keys: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """(the permutation sorting rows by (keys[0], keys[1], ...) lexicographically (stable), the keys in
    that order)."""
    if len(keys) == 1:
        ordered, perm = _sort(keys[0])
        return perm, [ordered]
    order: Optional[Tensor] = None
    for k in reversed(keys):
        order = (_sort(k)[1] if order is None
                 else order.index_select(0, _sort(k.index_select(0, order))[1]))
    assert order is not None  # two keys or more here
    return order, [k.index_select(0, order) for k in keys]


def _group_ids(order: Tensor, ordered_keys: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Dense ids of equal keys from a lexicographic sort: (id of each row, where each group starts in
    the order)."""
    first = torch.zeros(order.shape[0], dtype=torch.bool, device=order.device)
    first[0] = True
    for k in ordered_keys:
        first[1:] |= k[1:] != k[:-1]
    ids = torch.empty_like(order)
    ids.index_copy_(0, order, first.cumsum(0) - 1)
    return ids, first


def _scales(d: int) -> list[float]:
    """The elevation's diagonal scale factors, scale[c - 1] for coordinates c = 1..d, as the reference
    code rounds them: ``float inv_std_dev = sqrt(2/3) (d+1)`` (float32), ``scale_factor[c-1] =
    1 / sqrt(c (c+1)) * inv_std_dev`` (a double product stored in a float32 array). Rounding them
    otherwise moves some elevated coordinates by an ulp, which flips rank ties on grid features (e.g.
    three position axes of a volume) and so changes simplices."""
    inv_std_dev = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
    return [float(np.float32(1.0 / math.sqrt(c * (c + 1)) * inv_std_dev)) for c in range(1, d + 1)]


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
    scale = _scales(d)
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
    acc: Optional[Tensor] = None
    for c in range(d, 0, -1):
        cf = ft[c - 1] * scale[c - 1]
        if acc is None:
            torch.mul(cf, -c, out=el[c])
            acc = cf
        else:
            torch.sub(acc, cf * c, out=el[c])
            acc.add_(cf)
    if acc is None:  # d = 0 (the core op pads featureless inputs to d = 1 before they get here)
        raise ValueError("the permutohedral lattice needs features with d >= 1 dims")
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
    # exact: an integer's quotient is exact when whole
    shift = torch.div(rank, d1, out=below).floor_().mul_(d1)
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
    scale = _scales(d)
    return sum(scale) + d * max(scale)


def _elevation_bound(*points: Tensor) -> float:
    """A bound on the magnitude of the lattice coordinates of point sets (..., d) (inf if not finite)."""
    return max(_magnitude(p) for p in points) * _elevation_gain(points[0].shape[-1])


def _numpy_view(t: Tensor) -> Optional[np.ndarray]:
    """``t``'s memory as a numpy array where numpy can work on it in place of torch (one thread: no
    wake-up of torch's OpenMP workers, which then spin on the other core while a lattice build
    starts): a CPU float32/float64 tensor outside torch.func transforms; None otherwise (also for a
    tensor with a lazy negation or conjugation bit)."""
    t = t.detach()
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or not untransformed():
        return None
    try:
        return t.numpy()
    except (RuntimeError, TypeError):
        return None


def _magnitude(p: Tensor) -> float:
    """max |p| (NaN if p holds one): on the CPU by numpy's min and max (:func:`_numpy_view`; no
    temporary the size of the points, as abs() makes)."""
    a = _numpy_view(p) if p.numel() else None
    if a is not None:
        return max(-float(a.min()), float(a.max()))
    p = p.detach()
    lo, hi = torch.aminmax(p)
    return max(-float(lo), float(hi))


def _elevation_matrix(d: int, dtype: torch.dtype, device) -> Tensor:
    """E (d+1, d): the elevation :func:`_elevate_block` computes, elevated = E @ point, as a matrix:
    E[c, j] = scale_j ([j + 1 > c] - c [j + 1 == c]) (coordinate c' = j + 1 of the reference code)."""
    scale = torch.tensor(_scales(d), dtype=torch.float64)
    c = torch.arange(d + 1, dtype=torch.float64)[:, None]
    j1 = torch.arange(1, d + 1, dtype=torch.float64)[None, :]
    e = ((j1 > c).double() - c * (j1 == c).double()) * scale
    return e.to(dtype=dtype, device=device)


def _code_layout(lo: list[int], hi: list[int], b: int) -> tuple[list[int], int]:
    """Packing of lattice keys into int64 codes sum_i (key_i - lo'_i) stride_i + batch stride_d for
    remainder-0 coordinates in [lo_i, hi_i] (lo'_i = lo_i - 2(d+1): room for the canonical simplex's
    -(d+1) and the blur neighbours' +-(d+1)): (the d + 1 strides, the offset sum_i lo'_i stride_i).

    Raises:
        ValueError: more lattice cells than 62 bits of code index.
    """
    d1 = len(lo) + 1
    los = [v - 2 * d1 for v in lo]
    sizes = [h + 2 * d1 - v + 1 for v, h in zip(los, hi, strict=True)] + [b]
    code_bits = sum(math.log2(s) for s in sizes)
    if code_bits >= 62:
        raise ValueError(f"permutohedral: the query/key features divided by the bandwidth span too wide a "
                         f"range to index the lattice (lattice coordinate spans {sizes[:-1]}, "
                         f"batch {b}: {code_bits:.1f} bits of 62); rescale the features or use an exact "
                         f"backend")
    strides = [1]
    for size in sizes[:-1]:
        strides.append(strides[-1] * size)
    return strides, sum(v * st for v, st in zip(los, strides, strict=False))


def _blur_rows(plus: Tensor, minus: Tensor, num_v: int, dt: torch.dtype) -> tuple[list[Tensor], list[Tensor]]:
    """Each direction's blur rows from the vertices' + and - neighbours (V, d+1) (ids, -1: absent):
    (cols, weights), 3V each per direction, row u the matrix indices (id + 1) of u and its two
    neighbours in increasing order, weight 1 at u and 1/2 at each neighbour. An absent neighbour is
    an empty border vertex: 0 (below every vertex) for the first absent one, V + 1 (above every
    vertex) for a second (the compiled ``_jit._blur_cols``' rule)."""
    a, c = minus + 1, plus + 1  # 0: absent
    gone = c == 0
    a, c = torch.where(gone, 0, a), torch.where(gone, torch.where(a > 0, a, num_v + 1), c)
    u = torch.arange(1, num_v + 1, device=plus.device)[:, None].expand_as(a)
    cols, where = torch.stack([a, u, c], -1).sort(-1)  # three distinct indices per row
    weights = torch.tensor([0.5, 1.0, 0.5], dtype=dt, device=plus.device).expand(*where.shape)
    weights = weights.gather(-1, where)
    return ([cols[:, j].reshape(-1) for j in range(cols.shape[1])],
            [weights[:, j].reshape(-1) for j in range(cols.shape[1])])


def _blur_csr(cols: list[Tensor], weights: list[Tensor], num_v: int, dt: torch.dtype, dev) -> list[Tensor]:
    """The d + 1 blur matrices (V+2, V+2) from each direction's rows (3V columns and weights, three per
    row: see :func:`_blur_rows`): rows 0 and V + 1 (the border vertices) are empty."""
    idx = _index_dtype(3 * num_v + 1, num_v + 2)
    crow = torch.cat([torch.zeros(1, dtype=idx, device=dev),
                      torch.arange(0, 3 * num_v + 1, 3, dtype=idx, device=dev),
                      torch.full((1,), 3 * num_v, dtype=idx, device=dev)])
    return [_csr(crow, c, w.to(dt), (num_v + 2, num_v + 2)) for c, w in zip(cols, weights, strict=True)]


#: Build CPU lattices with the compiled kernels of :mod:`._jit` where numba imports (False: the tensor
#: path everywhere, e.g. to compare the two).
USE_JIT = True


def _jit_module() -> Any:
    """:mod:`._jit` where it can run (numba importable, :data:`USE_JIT`), else None."""
    if not USE_JIT or optional("numba") is None:
        return None
    from . import _jit
    return _jit


def _np_index_dtype(*sizes: int) -> Any:
    """:func:`.csr._index_dtype` as a numpy dtype."""
    return np.int32 if _index_dtype(*sizes) == torch.int32 else np.int64


def _build_jit(jit: Any, pts: Tensor, b: int, n: int, m: int, same: bool, dt: torch.dtype,
               corners: bool, bound: float) -> Lattice:
    """:func:`build_lattice` by the compiled CPU kernels (see :mod:`._jit`)."""
    d = pts.shape[1]
    d1 = d + 1
    nq = b * n
    out = jit.build(pts.detach().numpy(), _scales(d), nq, n, m, same, torch.get_num_threads(),
                    lambda lo, hi: _code_layout(lo, hi, b), _np_index_dtype, bound, corners)
    num_v = int(out["num_v"])

    def vals(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a).to(dt)

    pt_cols, pt_vals = torch.from_numpy(out["point_cols"]), vals(out["point_vals"])
    slice_ = _point_matrix(pt_cols[:nq], pt_vals[:nq], num_v + 2)
    splat_t = slice_ if same else _point_matrix(pt_cols[nq:], pt_vals[nq:], num_v + 2)
    vm = [_csr(torch.from_numpy(crow), torch.from_numpy(c), vals(v), (num_v + 2, c.shape[0] // d1))
          for crow, c, v in out["vertex"]]
    slice_t, splat = vm[0], vm[-1]
    blurs = _blur_csr(list(torch.from_numpy(out["cols"]).unbind(0)),
                      list(torch.from_numpy(out["blur_vals"]).unbind(0)), num_v, dt, pts.device)
    point_corners = positions = None
    if corners:
        point_corners = torch.from_numpy(out["corner_vid"]).long().add_(1)
        positions = torch.from_numpy(out["rank"]).neg().add_(d).to(torch.uint8)
    return Lattice(splat, None, splat_t, slice_, slice_t, None, blurs, 1.0 / (1.0 + 2.0 ** (-d)), num_v,
                   point_corners, positions)


def build_lattice(query: Tensor, key: Tensor, same: bool, dtype: Optional[torch.dtype] = None,
                  corners: bool = False) -> Lattice:
    """Build the lattice of query points (B, N, d) and key points (B, M, d) (same=True: one point set).

    Args:
        query, key: the points (features divided by the bandwidth).
        same: key is query (one point set).
        dtype: the dtype of the filter's matrices (default: the points' dtype). Points of a float32
            (or lower) dtype whose lattice coordinates exceed ``_FLOAT32_ELEVATED`` are elevated in
            float64 (float32 would not resolve their barycentric weights).
        corners: also keep each point's simplex corners and residual order (``Lattice.corners``,
            ``Lattice.positions``): what the derivative w.r.t. the points needs.

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
    jit = _jit_module() if dev.type == "cpu" and pts.dtype in (torch.float32, torch.float64) else None
    if jit is not None:
        return _build_jit(jit, pts, b, n, m, same, dt, corners, bound)
    rem0, rank, bary = _elevate(pts)  # (d + 1, P) each
    bary = bary.to(dt)
    # Lattice points are packed into int64 codes  sum_i (key[i] - lo[i]) * stride[i] + batch * stride[d]
    rem_d = rem0[:d]
    stride_list, offset = _code_layout(rem_d.amin(1).long().tolist(), rem_d.amax(1).long().tolist(), b)
    code_bits = math.log2(stride_list[d] * b)  # the code space
    strides = torch.tensor(stride_list, dtype=torch.long, device=dev)
    s_d = strides[:d]
    # the point codes, one coordinate row at a time
    pcode = rem_d[0].long().mul_(stride_list[0]).sub_(offset)
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
    if len(rank_keys) == 1 and code_bits + d * math.log2(d1) < _ONE_KEY_BITS:  # (code, rank digits): one key
        keys = [torch.mul(pcode, d1 ** d).add_(rank_keys[0])]
    else:  # several keys, sorted lexicographically
        keys = [pcode] + rank_keys
    order, ordered = _lex_sort(keys)
    sid, new_s = _group_ids(order, ordered)
    rep = order.masked_select(new_s)  # one point per simplex
    num_s = rep.shape[0]
    # vertex r of a simplex: key[i] = rem0[i] + canonical[r, rank[i]] with
    # canonical[r, j] = r - d1 [j > d - r]; the [rank > d - r] part is a cumulative sum over r of each
    # coordinate's stride, scattered at r = d - rank + 1
    srank = torch.stack([rank[i].index_select(0, rep) for i in range(d)], 1).long()
    positions = (d - rank.t()).to(torch.uint8) if corners else None
    del rem0, rem_d, rank, rank_keys, keys, ordered  # free the big temporaries early (less heap growth)
    steps = torch.zeros(num_s, d1 + 1, dtype=torch.long, device=dev)
    steps.scatter_add_(1, d - srank + 1, s_d.expand_as(srank).contiguous())
    r = torch.arange(d1, device=dev)
    corner0 = pcode.index_select(0, rep)
    codes = corner0[:, None] + r * s_d.sum() - d1 * steps.cumsum(1)[:, :d1]  # (S, d1)
    perm, (sorted_codes,) = _lex_sort([codes.reshape(-1)])
    slot_vertex, first = _group_ids(perm, [sorted_codes])
    slot_vertex = slot_vertex.reshape(num_s, d1)  # vertex of each simplex corner, numbered in code order
    uniq = sorted_codes.masked_select(first)
    num_v = uniq.shape[0]
    del pcode, corner0, codes, sorted_codes, steps
    # Renumber the vertices in order of first touch (the compiled builder's numbering: scanning the
    # points in order, corners 0..d each): vertex v's first touch is the least p (d+1) + r over the
    # corners r = v of the simplices of points p, a simplex's least point being rep (a stable sort)
    touch = (rep[:, None] * d1 + r).reshape(-1)
    first_touch = torch.full((num_v,), pts.shape[0] * d1, dtype=torch.long, device=dev)
    first_touch.scatter_reduce_(0, slot_vertex.reshape(-1), touch, "amin")
    by_touch = torch.argsort(first_touch)  # distinct keys: new vertex u is code-order vertex by_touch[u]
    renumber = torch.empty_like(by_touch)
    renumber[by_touch] = torch.arange(num_v, device=dev)
    slot_vertex = renumber.index_select(0, slot_vertex.reshape(-1)).reshape(num_s, d1)
    # the corner slots grouped by (new) vertex, stably: the vertex-major matrices' rows
    sorted_vertex, perm = torch.sort(slot_vertex.reshape(-1), stable=True)
    first = torch.ones_like(sorted_vertex, dtype=torch.bool)
    first[1:] = sorted_vertex[1:] != sorted_vertex[:-1]
    del touch, first_touch, sorted_vertex, srank

    # 2. Blur neighbours along each of the d + 1 lattice directions. Codes are linear in the key (the
    # margins in lo/span keep neighbours inside the coordinate ranges), so the neighbours of vertex u
    # along direction j are code(u) -+ delta_j, delta_j the code of the step (1, ..., 1, -d at j, 1, ...).
    # Only the + neighbours are searched; the - neighbours are their inverse. Matrix indices are vertex
    # ids + 1: index 0 and V + 1 are empty border vertices (always 0, as in the reference code) that
    # stand for an absent neighbour below / above, so every row of a blur is [below, self, above].
    steps_j = torch.ones(d1, d, dtype=torch.long, device=dev)
    steps_j[torch.arange(d, device=dev), torch.arange(d, device=dev)] = -d  # direction d: all ones
    delta = (steps_j * s_d).sum(1)  # never 0: codes are injective
    nbr_codes = (uniq.index_select(0, by_touch)[:, None] + delta).view(-1)  # of new vertex u, row u
    up, found = _find_codes(uniq, nbr_codes, stride_list[d] * b)
    up = renumber.index_select(0, up.clamp_(0, num_v - 1))  # (any id where absent: masked below)
    plus = torch.where(found, up, -1).view(num_v, d1)  # vertex ids, -1: absent
    minus = torch.full((num_v + 1, d1), -1, dtype=torch.long, device=dev)  # (row num_v: absent + ones')
    minus.scatter_(0, torch.where(plus < 0, num_v, plus),
                   torch.arange(num_v, device=dev)[:, None].expand(num_v, d1))
    blurs = _blur_csr(*_blur_rows(plus, minus[:-1], num_v, dt), num_v, dt, dev)
    del by_touch, renumber, uniq

    # 3. Splat and slice. Vertex-major matrices first, then the point-major ones (so the temporaries
    # of each never coexist with the other's results: a smaller peak, fewer page faults).
    nq = b * n
    slot_dtype = _index_dtype(perm.shape[0])
    slot_s = torch.div(perm, d1, rounding_mode="floor").to(slot_dtype)
    vm: dict[str, Any] = dict(sid=sid, bary=bary, slot_s=slot_s, slot_r=(perm - slot_s * d1).to(slot_dtype),
                              vertex_start=first, num_s=num_s, num_v=num_v)
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
    point_corners = (slot_vertex + 1).index_select(0, sid) if corners else None
    del corner_cols, corner_order, sid
    flat += torch.arange(0, num_p * d1, d1, dtype=flat_dtype, device=dev)[:, None]
    pt_vals = bary.view(-1).index_select(0, flat.view(-1)).view(num_p, d1)
    del flat, bary
    slice_ = _point_matrix(pt_cols[:nq], pt_vals[:nq], num_v + 2)
    splat_t = slice_ if same else _point_matrix(pt_cols[nq:], pt_vals[nq:], num_v + 2)
    return Lattice(splat, splat_order, splat_t, slice_, slice_t, slice_t_order, blurs,
                   1.0 / (1.0 + 2.0 ** (-d)), num_v, point_corners, positions)
