"""Global context block (Cao, Xu, Lin, Wei and Hu, "GCNet: Non-local Networks Meet Squeeze-Excitation
Networks and Beyond", ICCV Workshops 2019).

GCNet observed that a trained non-local block's attention maps are nearly the same for every query,
and made that exact: one query-independent softmax over the positions pools one context vector,
which a bottleneck transform turns into a per-channel update added to every position::

    c   = sum_j softmax_j(w_k . x_j) x_j                          (context modelling)
    z_i = x_i + W_2 ReLU(LN(W_1 c))                               (transform + "add" fusion)

In the one op, c is ``aggregate(1, w_k . x, x, Softmax(scale=1))``: a single query node (of feature
1) attends to the N positions whose key is the one-channel logit w_k . x_j, so
f(., x_j) = exp(w_k . x_j), C = sum_j f, the graph joins one context node to all N positions (the
softmax is computed once, not once per query). Exact: no approximation. W_2 starts at zero (GCNet's
"last zero init"), so a new block is the identity.
"""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from .. import affinity as A
from ..core import aggregate
from ._common import check_features, positive_int, tokens

__all__ = ["GlobalContextBlock"]


class GlobalContextBlock(nn.Module):
    """GCNet's global context block over (B, C, L), (B, C, H, W) or (B, C, T, H, W) maps.

    Args:
        in_channels: C.
        reduction: bottleneck ratio r of the transform: its width is max(1, C // r) (GCNet: 16).

    Attributes:
        conv_mask: pointwise convolution C -> 1, the attention logit w_k . x_j (+ a bias, which the
            softmax cancels).
        transform: Linear(C, C / r) -> LayerNorm -> ReLU -> Linear(C / r, C), last layer zero.
        backend: the core op's backend ("auto").
    """

    def __init__(self, in_channels: int, reduction: int = 16):
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        planes = max(1, in_channels // positive_int("reduction", reduction))
        self.planes = planes
        self.conv_mask = nn.Conv1d(in_channels, 1, 1)
        self.transform = nn.Sequential(nn.Linear(in_channels, planes), nn.LayerNorm(planes), nn.ReLU(),
                                       nn.Linear(planes, in_channels))
        last = cast(nn.Linear, self.transform[-1])  # Sequential indexing is typed nn.Module
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.backend = "auto"

    def context(self, x: Tensor) -> Tensor:
        """The pooled context c (B, C): one softmax over the positions, shared by every query."""
        flat = x.flatten(2)
        logits = tokens(self.conv_mask(flat))  # (B, N, 1)
        one = flat.new_ones(flat.shape[0], 1, 1)  # the single query node
        c = aggregate(one, logits, tokens(flat), A.Softmax(scale=1.0), backend=self.backend)
        return c[:, 0]

    def forward(self, x: Tensor) -> Tensor:
        """z = x + transform(context(x)), broadcast over the positions."""
        check_features(x, self.in_channels)
        delta = self.transform(self.context(x))
        return x + delta.reshape(*delta.shape, *([1] * (x.dim() - 2)))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, planes={self.planes}"
