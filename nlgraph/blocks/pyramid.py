"""Asymmetric pyramid non-local block (Zhu, Xu, Bai, Huang and Bai, "Asymmetric Non-local Neural
Networks for Semantic Segmentation", ICCV 2019: APNB).

The queries are all N positions; the keys and values are the projected map average-pooled to a few
pyramid grids (scales (1, 3, 6, 8): 1 + 9 + 36 + 64 = 110 cells on an image), so the graph is the
complete bipartite graph from N queries to M << N pooled cells::

    q = k_proj(x),  k = P(k_proj(x)),  v = P(v_proj(x))           (P: pyramid pooling, concatenated)
    y_i = sum_m softmax_m(q_i . k_m / sqrt(d)) v_m                  (f = exp, C = sum f)
    z = x + BN(W y)

As in the paper (and mmsegmentation's APNB) the query and key projections are shared. One call of
``aggregate(q, k, v, Softmax(1 / sqrt(d)))`` over N x M pairs instead of N x N; exact (the pooling is
part of the model, not an approximation of it). The paper fuses y with x by concatenation and a
1x1 convolution; this block uses the residual sum of the non-local block with BN's scale at zero,
so a new block is the identity. Clips pool (T, H, W) to min(s, size) per axis.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import affinity as A
from ..core import aggregate
from ._common import ZeroInitOutput, check_features, inter_width, positive_int, tokens

__all__ = ["PyramidNonLocal", "pyramid_cells"]

# (input, output size with one entry per spatial axis) -> pooled; the stubs spell the size as a
# different fixed-length tuple per dimensionality, hence Callable[..., Tensor]
_POOL: dict[int, Callable[..., Tensor]] = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d,
                                           3: F.adaptive_avg_pool3d}


def pyramid_cells(spatial: Sequence[int], scales: Sequence[int]) -> int:
    """M, the number of pooled keys: sum over scales s of prod over axes of min(s, size)."""
    return sum(math.prod(min(s, n) for n in spatial) for s in scales)


class PyramidNonLocal(nn.Module):
    """ANN's asymmetric pyramid non-local block (APNB), residual form.

    Args:
        in_channels: C.
        inter_channels: d, the width of queries/keys and values (default C // 2).
        pool_scales: the pyramid's grid sizes (default (1, 3, 6, 8), the paper's).
        use_scale: divide the logits by sqrt(d) (the paper's and mmsegmentation's ``matmul_norm``).

    Attributes:
        key_query: pointwise convolution C -> d shared by the queries and the keys.
        value: pointwise convolution C -> d.
        W: the zero-initialised output (convolution d -> C + BatchNorm).
        backend: the core op's backend ("auto").
    """

    def __init__(self, in_channels: int, inter_channels: int | None = None,
                 pool_scales: Sequence[int] = (1, 3, 6, 8), use_scale: bool = True):
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        d = inter_width(in_channels, inter_channels, 2)
        self.inter_channels = d
        scales = tuple(pool_scales) if isinstance(pool_scales, (tuple, list)) else None
        if not scales or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in scales):
            raise ValueError(f"pool_scales must be a non-empty sequence of positive ints, "
                             f"got {pool_scales!r}")
        self.pool_scales = scales
        self.use_scale = bool(use_scale)
        self.key_query = nn.Conv1d(in_channels, d, 1)
        self.value = nn.Conv1d(in_channels, d, 1)
        self.W = ZeroInitOutput(d, in_channels)
        self.backend = "auto"

    def pyramid(self, t: Tensor) -> Tensor:
        """``(B, d, *spatial) -> (B, M, d)``: average pools at every scale, cells concatenated."""
        spatial = t.shape[2:]
        pool = _POOL[len(spatial)]
        cells = [pool(t, tuple(min(s, n) for n in spatial)).flatten(2) for s in self.pool_scales]
        return tokens(torch.cat(cells, dim=2))

    def forward(self, x: Tensor) -> Tensor:
        """z = x + BN(W y) with y the attention from every position to the pooled cells."""
        check_features(x, self.in_channels)
        b, spatial = x.shape[0], x.shape[2:]
        flat = x.flatten(2)
        q = self.key_query(flat)
        v = self.value(flat)
        keys = self.pyramid(q.reshape(b, self.inter_channels, *spatial))
        values = self.pyramid(v.reshape(b, self.inter_channels, *spatial))
        scale = self.inter_channels ** -0.5 if self.use_scale else 1.0
        y = aggregate(tokens(q), keys, values, A.Softmax(scale=scale), backend=self.backend)
        return x + self.W(y.transpose(1, 2)).reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, inter_channels={self.inter_channels}, "
                f"pool_scales={self.pool_scales}, use_scale={self.use_scale}")
