"""Compact generalized non-local block (Yue, Sun, Yuan, Zhou, Ding and Xu, "Compact Generalized
Non-local Network", NeurIPS 2018: CGNL).

CGNL relates every (channel, position) pair with every other one: within each of G channel groups
the nodes are the (d / G) * N scalars t_n = theta(x), p_m = phi(x), g_m = g(x), and::

    y_n = sum_m f(t_n, p_m) g_m        (C = 1; or C = sqrt(M) with ``use_scale``)
    z   = x + GN(W y)                   (W: grouped pointwise convolution, GN's scale at zero)

An N x M matrix over all channel-positions is out of the question (M = d N / G), so CGNL expands the
kernel in a Taylor series whose terms factor into per-node features; the sum then needs no pairwise
matrix at all. With alpha_r(u) = sqrt((2 gamma)^r / r!) u^r, for order P:

* ``kernel="dot"``: f(t, p) = t p, exact.
* ``kernel="gaussian"``: f(t, p) = exp(-gamma (t - p)^2)
  = exp(-gamma t^2) exp(-gamma p^2) sum_r (2 gamma t p)^r / r!, truncated after r = P. With
  ``prefactor="constant"`` (CGNL's released code, which found the exact factors hard to train)
  exp(-gamma (t^2 + p^2)) is replaced by the constant exp(-2 gamma); with ``prefactor="exact"`` they are
  kept and only the series is truncated (error at most exp(-gamma (t^2 + p^2)) (2 gamma |t p|)^(P+1)
  exp(2 gamma |t p|) / (P+1)!, Lagrange's remainder).

Either way f(t_n, p_m) = psi(t_n) . psi(p_m) with the (P + 1)-vector psi(u) = (c(u) alpha_r(u))_r
(c(u) = exp(-gamma) or exp(-gamma u^2)), so the sum is one
``aggregate(psi(t), psi(p), g, DotProduct(scale=M))`` (the scale cancels the count normalisation),
which the exact ``algebra`` backend computes as psi(t) (psi(p)^T g) in O(M P): never N x M. GN's
scale and shift start at zero (CGNL's zero-initialised GroupNorm), so a new block is the identity.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import affinity as A
from ..core import aggregate
from ._common import check_features, inter_width, positive_int

__all__ = ["CompactNonLocal", "taylor_features"]

KERNELS = ("gaussian", "dot")
PREFACTORS = ("constant", "exact")


def taylor_features(u: Tensor, order: int, gamma: float, prefactor: str = "constant") -> Tensor:
    """(..., M) scalars -> (..., M, order + 1) features whose dot products are the Taylor kernel.

    Args:
        u: node scalars.
        order: P, the last power kept.
        gamma: the Gaussian's gamma in exp(-gamma (t - p)^2).
        prefactor: "constant" (exp(-2 gamma), CGNL's code) or "exact" (exp(-gamma u^2) per node).
    """
    powers = [torch.ones_like(u)]
    for _ in range(order):
        powers.append(powers[-1] * u)
    coef = torch.tensor([math.sqrt((2.0 * gamma) ** r / math.factorial(r)) for r in range(order + 1)],
                        dtype=u.dtype, device=u.device)
    feats = torch.stack(powers, dim=-1) * coef
    if prefactor == "exact":
        return feats * torch.exp(-gamma * u * u)[..., None]
    return feats * math.exp(-gamma)  # sqrt(exp(-2 gamma)) on each side


class CompactNonLocal(nn.Module):
    """CGNL over (B, C, L), (B, C, H, W) or (B, C, T, H, W) maps.

    Args:
        in_channels: C.
        inter_channels: d, the width of theta/phi/g (default C // 2); divisible by ``groups``.
        groups: G, channel groups (each an independent aggregation); must divide C and d.
        kernel: "gaussian" (Taylor-expanded, default) or "dot".
        order: P, the Taylor order of the Gaussian kernel (CGNL: 2).
        gamma: the Gaussian's gamma (CGNL: 1e-4).
        prefactor: "constant" (CGNL's code, default) or "exact" (see the module docstring).
        use_scale: divide the sums by sqrt(M), M = d N / G (CGNL's ``use_scale``).

    Attributes:
        t, p, g: pointwise convolutions C -> d without bias (theta, phi, g).
        z: grouped pointwise convolution d -> C without bias; gn: GroupNorm(G, C), zero-initialised.
        backend: the core op's backend ("auto": algebra).
    """

    def __init__(self, in_channels: int, inter_channels: int | None = None, groups: int = 1,
                 kernel: str = "gaussian", order: int = 2, gamma: float = 1e-4, prefactor: str = "constant",
                 use_scale: bool = False):
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        d = inter_width(in_channels, inter_channels, 2)
        self.groups = positive_int("groups", groups)
        if d % groups or in_channels % groups:
            raise ValueError(f"groups ({groups}) must divide in_channels ({in_channels}) and "
                             f"inter_channels ({d})")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if not isinstance(order, int) or isinstance(order, bool) or order < 0:
            raise ValueError(f"order must be an int >= 0, got {order!r}")
        if (isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma)
                or gamma <= 0):
            raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
        if prefactor not in PREFACTORS:
            raise ValueError(f"prefactor must be one of {PREFACTORS}, got {prefactor!r}")
        self.inter_channels, self.kernel, self.order, self.gamma = d, kernel, order, float(gamma)
        self.prefactor, self.use_scale = prefactor, bool(use_scale)
        self.t = nn.Conv1d(in_channels, d, 1, bias=False)
        self.p = nn.Conv1d(in_channels, d, 1, bias=False)
        self.g = nn.Conv1d(in_channels, d, 1, bias=False)
        self.z = nn.Conv1d(d, in_channels, 1, groups=groups, bias=False)
        self.gn = nn.GroupNorm(groups, in_channels)
        nn.init.zeros_(self.gn.weight)
        nn.init.zeros_(self.gn.bias)
        self.backend = "auto"

    def node_features(self, u: Tensor) -> Tensor:
        """(B, G, M) node scalars -> (B, G, M, e) features with f(t, p) = features(t) . features(p)."""
        if self.kernel == "dot":
            return u[..., None]
        return taylor_features(u, self.order, self.gamma, self.prefactor)

    def forward(self, x: Tensor) -> Tensor:
        """z = x + GN(W y), y summed over every (channel, position) node of each group."""
        check_features(x, self.in_channels)
        b, g = x.shape[0], self.groups
        flat = x.flatten(2)
        nodes = lambda conv: conv(flat).reshape(b, g, -1)  # noqa: E731  (B, G, M): channel-major in a group
        t, p, v = nodes(self.t), nodes(self.p), nodes(self.g)
        m = t.shape[-1]
        scale = math.sqrt(m) if self.use_scale else float(m)  # DotProduct's C = M: the sum / sqrt(M) or raw
        y = aggregate(self.node_features(t), self.node_features(p), v[..., None], A.DotProduct(scale=scale),
                      backend=self.backend)
        y = y.reshape(b, self.inter_channels, -1)
        return x + self.gn(self.z(y)).reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, inter_channels={self.inter_channels}, "
                f"groups={self.groups}, kernel={self.kernel!r}, order={self.order}, gamma={self.gamma}, "
                f"prefactor={self.prefactor!r}, use_scale={self.use_scale}")
