"""Neighbourhood attention block: softmax attention restricted to a local window (Hassani, Walton, Li,
Li and Shi, "Neighborhood Attention Transformer", CVPR 2023; the window of non-local means, Buades,
Coll and Morel 2005).

Each position attends to the positions within Chebyshev distance r on its grid (clipped at the
borders)::

    y_i = sum_{j : |p_i - p_j|_inf <= r} softmax_j(q_i . k_j / sqrt(d_h)) v_j   (per head)
    z   = x + BN(W y)

One call of ``aggregate(q, k, v, Softmax(), LocalWindow(shape, r))`` with the heads as a leading dim:
f = exp, C = sum over the window, graph = the window. Exact. Unlike NATTEN's module this is a residual
block with BN's scale at zero (a new block is the identity), and the window is clipped at the border
rather than shifted inward.
"""

from __future__ import annotations

from typing import Sequence, Union

from torch import Tensor, nn

from .. import affinity as A
from .. import graph as G
from ..core import aggregate
from ._common import ZeroInitOutput, check_features, inter_width, positive_int

__all__ = ["NeighborhoodAttention"]


class NeighborhoodAttention(nn.Module):
    """Windowed multi-head attention over (B, C, L), (B, C, H, W) or (B, C, T, H, W) maps.

    Args:
        in_channels: C.
        radius: r, an int or one int per spatial axis (window side 2 r + 1).
        num_heads: H; must divide ``inter_channels``.
        inter_channels: d, the width of queries/keys/values over all heads (default C // 2).

    Attributes:
        query, key, value: pointwise convolutions C -> d.
        W: the zero-initialised output (convolution d -> C + BatchNorm).
        backend: the core op's backend ("auto").
    """

    def __init__(self, in_channels: int, radius: Union[int, Sequence[int]] = 3, num_heads: int = 1,
                 inter_channels: int | None = None):
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        d = inter_width(in_channels, inter_channels, 2)
        self.num_heads = positive_int("num_heads", num_heads)
        if d % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide inter_channels ({d})")
        if isinstance(radius, int):
            r: tuple = (radius,)
        else:
            r = tuple(radius) if isinstance(radius, (tuple, list)) else ()
        valid = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r)
        if not 1 <= len(r) <= 3 or not valid:
            raise ValueError(f"radius must be an int >= 0 or 1-3 of them (one per spatial axis), "
                             f"got {radius!r}")
        self.radius = radius if isinstance(radius, int) else r
        self.inter_channels = d
        self.query = nn.Conv1d(in_channels, d, 1)
        self.key = nn.Conv1d(in_channels, d, 1)
        self.value = nn.Conv1d(in_channels, d, 1)
        self.W = ZeroInitOutput(d, in_channels)
        self.backend = "auto"

    def forward(self, x: Tensor) -> Tensor:
        """z = x + BN(W y), y attending within the window of every position."""
        check_features(x, self.in_channels)
        spatial = tuple(x.shape[2:])
        if not isinstance(self.radius, int) and len(self.radius) != len(spatial):
            raise ValueError(f"radius {self.radius} has {len(self.radius)} entries but x {tuple(x.shape)} "
                             f"has {len(spatial)} spatial axes")
        b, h = x.shape[0], self.num_heads
        flat = x.flatten(2)
        dh = self.inter_channels // h
        heads = lambda conv: conv(flat).reshape(b, h, dh, -1).transpose(2, 3)  # noqa: E731  (B, H, N, d_h)
        y = aggregate(heads(self.query), heads(self.key), heads(self.value), A.Softmax(),
                      G.LocalWindow(spatial, self.radius), backend=self.backend)  # (B, H, N, d / H)
        y = y.transpose(2, 3).reshape(b, self.inter_channels, -1)
        return x + self.W(y).reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, radius={self.radius}, num_heads={self.num_heads}, "
                f"inter_channels={self.inter_channels}")
