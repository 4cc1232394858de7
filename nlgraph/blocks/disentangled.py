"""Disentangled non-local block (Yin, Yao, Cao, Li, Zhang, Lin and Hu, "Disentangled Non-Local Neural
Networks", ECCV 2020: DNL).

DNL splits the embedded-Gaussian attention into a whitened pairwise term, which models how two
positions relate, and a unary term, which models which positions matter to everyone (GCNet's
query-independent attention)::

    q_i = theta(x_i) - mean_i theta(x_i),   k_j = phi(x_j) - mean_j phi(x_j)      (whitening)
    y_i = sum_j [softmax_j(q_i . k_j / (sqrt(d) tau)) + softmax_j(w_m . x_j)] g(x_j)
    z   = x + BN(W y)

Two calls of the one op: ``aggregate(q, k, g, Softmax(1 / (sqrt(d) tau)))`` (the pairwise term) and
``aggregate(1, w_m . x, g, Softmax(1))`` (one query node: the unary softmax computed once and
broadcast). Exact. BN's scale starts at zero, so a new block is the identity. Defaults follow
mmsegmentation's DNLHead (temperature tau = 0.05, logits divided by sqrt(d)).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .. import affinity as A
from ..core import aggregate
from ._common import ZeroInitOutput, check_features, inter_width, positive_int, tokens

__all__ = ["DisentangledNonLocal"]


class DisentangledNonLocal(nn.Module):
    """DNL over (B, C, L), (B, C, H, W) or (B, C, T, H, W) maps.

    Args:
        in_channels: C.
        inter_channels: d, the width of theta/phi/g (default C // 2).
        temperature: tau, the pairwise softmax's temperature (default 0.05).
        use_scale: also divide the pairwise logits by sqrt(d) (default True).

    Attributes:
        theta, phi, g: pointwise convolutions C -> d.
        conv_mask: pointwise convolution C -> 1, the unary logit w_m . x_j.
        W: the zero-initialised output (convolution d -> C + BatchNorm).
        backend: the core op's backend ("auto").
    """

    def __init__(self, in_channels: int, inter_channels: int | None = None, temperature: float = 0.05,
                 use_scale: bool = True):
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        d = inter_width(in_channels, inter_channels, 2)
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                or not math.isfinite(temperature) or temperature <= 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.inter_channels, self.temperature, self.use_scale = d, float(temperature), bool(use_scale)
        self.theta = nn.Conv1d(in_channels, d, 1)
        self.phi = nn.Conv1d(in_channels, d, 1)
        self.g = nn.Conv1d(in_channels, d, 1)
        self.conv_mask = nn.Conv1d(in_channels, 1, 1)
        self.W = ZeroInitOutput(d, in_channels)
        self.backend = "auto"

    def pairwise_scale(self) -> float:
        """The pairwise logit scale 1 / (sqrt(d) tau) (1 / tau without ``use_scale``)."""
        return (self.inter_channels ** -0.5 if self.use_scale else 1.0) / self.temperature

    def forward(self, x: Tensor) -> Tensor:
        """z = x + BN(W (pairwise + unary))."""
        check_features(x, self.in_channels)
        flat = x.flatten(2)
        q, k, v = tokens(self.theta(flat)), tokens(self.phi(flat)), tokens(self.g(flat))
        q = q - q.mean(dim=1, keepdim=True)
        k = k - k.mean(dim=1, keepdim=True)
        pairwise = aggregate(q, k, v, A.Softmax(scale=self.pairwise_scale()), backend=self.backend)
        one = flat.new_ones(flat.shape[0], 1, 1)
        unary = aggregate(one, tokens(self.conv_mask(flat)), v, A.Softmax(scale=1.0), backend=self.backend)
        return x + self.W((pairwise + unary).transpose(1, 2)).reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, inter_channels={self.inter_channels}, "
                f"temperature={self.temperature}, use_scale={self.use_scale}")
