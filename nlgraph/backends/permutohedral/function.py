"""The lattice filter as a torch.autograd.Function (values -> filtered values)."""

from __future__ import annotations

import torch
from torch import Tensor

from .lattice import Lattice


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
