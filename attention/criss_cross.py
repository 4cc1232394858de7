"""Criss-cross attention (Huang et al., "CCNet: Criss-Cross Attention for Semantic Segmentation", ICCV 2019).

Each pixel attends to the pixels in its own row and column (itself once):
``y_i = gamma * sum_{j in row(i) u col(i)} softmax_j(q_i . k_j) v_j + x_i``, which is
``nlgraph.aggregate(q, k, v, Softmax(scale=1), CrissCross((H, W)))``. Exact (no approximation);
gamma starts at zero so a new module is the identity. CCNet applies the module R = 2 times
(recurrent) to reach every pixel; call it twice for that.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

import nlgraph
from nlgraph import graph as G

__all__ = ["CrissCrossAttention"]


class CrissCrossAttention(nn.Module):
    """CCNet's criss-cross attention over (B, C, H, W) feature maps.

    Args:
        in_channels: C.
        reduction: query/key width is max(1, C // reduction) (CCNet and mmcv use 8).
        key_channels: the query/key width itself (overrides ``reduction``), e.g. read from weights.

    Attributes:
        query_conv, key_conv, value_conv: 1x1 convolutions (value keeps C channels).
        gamma: scalar residual weight, initialised to 0.
        backend: the core op's backend ("auto").
    """

    def __init__(self, in_channels: int, reduction: int = 8, key_channels: Optional[int] = None):
        super().__init__()
        sizes = (("in_channels", in_channels), ("reduction", reduction), ("key_channels", key_channels))
        for name, val in sizes:
            if val is None and name == "key_channels":
                continue
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        d = max(1, in_channels // reduction) if key_channels is None else key_channels
        self.in_channels = in_channels
        self.query_conv = nn.Conv2d(in_channels, d, 1)
        self.key_conv = nn.Conv2d(in_channels, d, 1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = nn.Parameter(self.value_conv.weight.new_zeros(1))
        self.backend = "auto"

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, C, H, W) with C = {self.in_channels}, "
                             f"got {tuple(x.shape)}")
        b, c, h, w = x.shape
        convs = (self.query_conv, self.key_conv, self.value_conv)
        q, k, v = (conv(x).flatten(2).transpose(1, 2) for conv in convs)  # (B, H*W, channels) tokens
        y = nlgraph.aggregate(q, k, v, nlgraph.Softmax(scale=1.0), G.CrissCross((h, w)), backend=self.backend)
        return self.gamma * y.transpose(1, 2).reshape(b, c, h, w) + x
