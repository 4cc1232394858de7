"""The lattice filter as torch.autograd Functions: of the values (:class:`_LatticeFilter`), and of the
values and the points (:class:`_LatticePointFilter`).

The derivative w.r.t. the points is that of the lattice's own output, not of the exact Gaussian.
The filter is y = alpha S_q B S_k v: S_k splats key point j onto the d+1 corners of its simplex with
barycentric weights b_j, B is the fixed product of the d+1 blurs, S_q slices likewise with the query
points' weights. Which simplex (hence which vertices) is piecewise constant in the points; inside
one, the weights are linear in them (Adams et al. 2010, section 3.1): with el = E p the elevated point
(E: :func:`.lattice._elevation_matrix`), the residuals r_c = (el_c - rem0_c) / (d+1) sorted in
decreasing order v_0 >= ... >= v_d (coordinate c sits at position m_c = d - rank_c), the weights are
b_k = v_k - v_{k-1} (k = 1..d) and b_0 = 1 + v_0 - v_d. So db_k / del_c = ([k = m_c] - [k = m_c + 1
mod d+1]) / (d+1), and for a loss L with G_k = dL/db_k,

    dL/del_c = (G[m_c] - G[(m_c + 1) mod (d+1)]) / (d+1),      dL/dp = E^T dL/del.

G of a query point i at corner k (vertex u): alpha <dL/dy_i, (B S_k v)_u>; of a key point j at
corner k: <v_j, (B^T alpha S_q^T dL/dy)_u>. The derivative exists wherever no point lies on a
simplex boundary (a measure-zero set where the lattice output is continuous but kinked).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .cache import _no_functorch
from .csr import _csr_mm
from .lattice import _BLOCK, Lattice, _elevation_matrix, gather


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


def _corner_grads(corners: Tensor, field: Tensor, weights: Tensor, scale: float) -> Tensor:
    """G (P, d+1): ``scale * <weights_p, field[corners[p, k]]>`` for each point p and corner k, block-wise
    (the gathered (block, d+1, e) rows stay small)."""
    p, d1 = corners.shape
    out = torch.empty(p, d1, dtype=field.dtype, device=field.device)
    for s in range(0, p, _BLOCK):
        e = min(p, s + _BLOCK)
        rows = field.index_select(0, corners[s:e].reshape(-1)).view(e - s, d1, -1)
        torch.bmm(rows, weights[s:e, :, None], out=out[s:e, :, None])
    return out.mul_(scale) if scale != 1.0 else out


def _point_grads(g: Tensor, positions: Tensor, elevation: Tensor) -> Tensor:
    """dL/dp (P, d) from the corner gradients G (P, d+1) (see the module docstring)."""
    d1 = g.shape[1]
    m = positions.long()
    grad_el = g.gather(1, m).sub_(g.gather(1, (m + 1) % d1)).mul_(1.0 / d1)
    return grad_el @ elevation


class _LatticePointFilter(torch.autograd.Function):
    """``lattice.filter(values)`` as a function of the values AND the query/key points the lattice was
    built from (``query_points`` (B*N, d), ``key_points`` (B*M, d): the same tensor when key is query),
    for a lattice built with ``corners=True``. The lattice itself is not rebuilt: the output's
    derivative w.r.t. the points is the module docstring's (the simplices held fixed, which is exact
    away from simplex boundaries). First order only: a second derivative, forward mode (jvp) and
    vmap raise."""

    @staticmethod
    def forward(values: Tensor, query_points: Tensor, key_points: Tensor, lattice: Lattice) -> Tensor:
        return lattice.filter(values)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        values, query_points, key_points, ctx.lattice = inputs
        ctx.same = query_points is key_points
        ctx.save_for_backward(values)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        with _no_functorch():  # (torch.func.grad: sparse CSR operands cannot be wrapped by a transform)
            return _LatticePointFilter._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: Tensor):
        (values,) = ctx.saved_tensors
        lat: Lattice = ctx.lattice
        grad = grad.contiguous()
        need_v, need_q, need_k = ctx.needs_input_grad[:3]
        grad_v = lat.filter(grad, transpose=True) if need_v else None
        if not (need_q or need_k):
            return grad_v, None, None, None
        if lat.corners is None or lat.positions is None:
            raise RuntimeError("permutohedral: the lattice was built without corners=True; its points' "
                               "gradient needs them")
        d1 = lat.corners.shape[1]
        elevation = _elevation_matrix(d1 - 1, grad.dtype, grad.device)
        nq = grad.shape[0]
        grad_q = grad_k = None
        if need_q or ctx.same:
            w = _csr_mm(lat.splat, gather(values, lat.splat_order))  # B S_k v, in vertex space
            for b in lat.blurs:
                w = _csr_mm(b, w)
            grad_q = _point_grads(_corner_grads(lat.corners[:nq], w, grad, lat.alpha), lat.positions[:nq],
                                  elevation)
            del w
        if need_k or ctx.same:
            z = _csr_mm(lat.slice_t, gather(grad, lat.slice_t_order), alpha=lat.alpha)
            for b in lat.blurs[::-1]:
                z = _csr_mm(b, z)  # B^T alpha S_q^T grad
            rows = slice(0, nq) if ctx.same else slice(nq, None)
            grad_k = _point_grads(_corner_grads(lat.corners[rows], z, values, 1.0), lat.positions[rows],
                                  elevation)
        if ctx.same:  # one point set: both roles' derivatives (autograd adds the two returned for it)
            return grad_v, grad_q, grad_k, None
        return grad_v, grad_q if need_q else None, grad_k if need_k else None, None

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError("permutohedral: forward-mode derivatives (jvp) w.r.t. the features are not "
                                  "implemented; use reverse mode, or an exact backend")

    @staticmethod
    def vmap(info, in_dims, *args):
        raise NotImplementedError("permutohedral: vmap over a lattice filter whose features need gradients "
                                  "is not supported; loop over the batch, or use an exact backend")
