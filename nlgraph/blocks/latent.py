"""Latent graph block (Zhang, He and Yan, "LatentGNN: Learning Efficient Non-local Relations for
Visual Recognition", ICML 2019).

The N visible positions exchange messages through K << N latent nodes: a bipartite graph visible ->
latent, a small complete graph among the latent nodes, and the bipartite graph back::

    u_i = normalize(BN(D_1 x_i)),  w_i = normalize(BN(D_2 x_i))          (unit d-vectors)
    a_ki = ReLU(BN(Psi_1 u_i))_k / ||ReLU(BN(Psi_1 u))_k||_N             (visible -> latent weights)
    b_ki = ReLU(BN(Psi_2 w_i))_k / ||ReLU(BN(Psi_2 w_i))||_K             (latent -> visible weights)
    z_k  = sum_i a_ki u_i                                                 (aggregation 1: N -> K)
    z'_k = sum_l softmax_l(zhat_k . zhat_l) z_l,  zhat = z / ||z||        (latent graph: K -> K)
    y_i  = sum_k b_ki z'_k                                                (aggregation 2: K -> N)
    out  = x + gamma * BN(U y)

as the authors' released code computes it (asymmetric mode, one kernel). In the one op the two
bipartite steps are ``aggregate(I_K, a, u, DotProduct(scale=N))`` and
``aggregate(b, I_K, z', DotProduct(scale=K))``: latent node k is the one-hot feature e_k, so
f(e_k, a_i) = a_ki, and the scale cancels the count normalisation (C = 1). Both run through the exact
``algebra`` backend in O(N K d): no N x N and no materialised N x K weighted sum. The latent step is
``aggregate(zhat, zhat, z, Softmax(scale=1))`` (K x K). Exact: the K latent nodes are the model, not
an approximation of a non-local block. gamma starts at zero (as in the authors' code), so a new block
is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import affinity as A
from ..core import aggregate
from ._common import check_features, inter_width, positive_int, tokens

__all__ = ["LatentGraphBlock"]


def _conv_bn(cin: int, cout: int, relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv1d(cin, cout, 1, bias=False), nn.BatchNorm1d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class LatentGraphBlock(nn.Module):
    """LatentGNN over (B, C, L), (B, C, H, W) or (B, C, T, H, W) maps.

    Args:
        in_channels: C.
        num_latent: K, the number of latent nodes (the paper uses 100 or fewer; K << N).
        inter_channels: d, the width of the visible features (default C // 4, the authors' channel stride 4).
        latent_graph: pass messages among the latent nodes (the authors' step 2; default True).

    Attributes:
        down_v2l, down_l2v: pointwise convolution C -> d + BN (the visible features u and w).
        psi_v2l, psi_l2v: pointwise convolution d -> K + BN + ReLU (the bipartite edge weights).
        up: pointwise convolution d -> C + BN.
        gamma: scalar residual weight, initialised to zero.
        backend: the core op's backend ("auto": algebra for the bipartite steps).
    """

    def __init__(self, in_channels: int, num_latent: int = 32, inter_channels: int | None = None,
                 latent_graph: bool = True):
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.num_latent = positive_int("num_latent", num_latent)
        d = inter_width(in_channels, inter_channels, 4)
        self.inter_channels = d
        self.latent_graph = bool(latent_graph)
        self.down_v2l = _conv_bn(in_channels, d, relu=False)
        self.down_l2v = _conv_bn(in_channels, d, relu=False)
        self.psi_v2l = _conv_bn(d, num_latent, relu=True)
        self.psi_l2v = _conv_bn(d, num_latent, relu=True)
        self.up = _conv_bn(d, in_channels, relu=False)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.backend = "auto"

    def forward(self, x: Tensor) -> Tensor:
        """out = x + gamma * BN(U y) with y the messages routed visible -> latent -> visible."""
        check_features(x, self.in_channels)
        flat = x.flatten(2)
        n, k = flat.shape[2], self.num_latent
        u = F.normalize(self.down_v2l(flat), dim=1)  # (B, d, N)
        w = F.normalize(self.down_l2v(flat), dim=1)
        a = F.normalize(self.psi_v2l(u), dim=2)  # (B, K, N): unit norm over the visible nodes
        b = F.normalize(self.psi_l2v(w), dim=1)  # (B, K, N): unit norm over the latent nodes
        latent = torch.eye(k, dtype=flat.dtype, device=flat.device)  # latent node k: feature e_k
        z = aggregate(latent, tokens(a), tokens(u), A.DotProduct(scale=float(n)), backend=self.backend)
        if self.latent_graph:
            zhat = F.normalize(z, dim=-1)
            z = aggregate(zhat, zhat, z, A.Softmax(scale=1.0), backend=self.backend)
        y = aggregate(tokens(b), latent, z, A.DotProduct(scale=float(k)), backend=self.backend)
        return x + self.gamma * self.up(y.transpose(1, 2)).reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_latent={self.num_latent}, "
                f"inter_channels={self.inter_channels}, latent_graph={self.latent_graph}")
