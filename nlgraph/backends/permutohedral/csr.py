"""CSR helpers of the permutohedral lattice: building the splat/slice/blur matrices and applying them.

Splat, each blur direction and slice are sparse CSR matrices built once per lattice; the
vertex-major ones (:func:`_vertex_matrix`) by counting, without sorting their P (d+1) entries.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor


def _index_dtype(*sizes: int) -> torch.dtype:
    """CSR index width: 32 bits where every index and count fits (products run ~1.4x faster: MKL's
    native width)."""
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


def _vertex_matrix(sel: Tensor, sid: Tensor, bary: Tensor, slot_s: Tensor, slot_r: Tensor,
                   vertex_start: Tensor, num_s: int, num_v: int) -> Tensor:
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


def _csr_mm(a: Tensor, x: Tensor, alpha: float = 1.0, out: Optional[Tensor] = None) -> Tensor:
    """alpha a @ x (a sparse CSR) written straight into ``out`` (nothing of it is read) or a fresh
    output (``a @ x`` zero-fills and copies: ~1.5x slower)."""
    if out is None:
        out = torch.empty(a.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    return torch.addmm(out, a, x, beta=0.0, alpha=alpha, out=out)
