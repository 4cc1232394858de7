"""Non-local blocks (Wang, Girshick, Gupta and He, "Non-local Neural Networks", CVPR 2018).

``z = BN(W y) + x`` with ``y_i = (1 / C_i) sum_j f(x_i, x_j) g(x_j)`` over all positions j (all
of space for images, all of space-time for clips). The block builds theta/phi/g as 1x1(x1)
convolutions and calls :func:`nlgraph.aggregate`; it carries no aggregation of its own.

Modes (sec. 3.2 of the paper):

==================== ============================== ========== ===============================
mode                 f(x_i, x_j)                    C_i        core op
==================== ============================== ========== ===============================
gaussian             exp(x_i . x_j)                 sum_j f    ``Softmax(scale=1)``
embedded_gaussian    exp(theta(x_i) . phi(x_j))     sum_j f    ``Softmax(scale=1 or 1/sqrt(d))``
dot_product          theta(x_i) . phi(x_j)          N keys     ``DotProduct()``: exact O(N d^2)
concatenation        ReLU(w . [theta_i, phi_j])     N keys     ``Concatenation(w)``: sorted prefix sums
==================== ============================== ========== ===============================

All four are exact (no approximation): ``dot_product`` and ``concatenation`` go through the
``algebra`` backend by default, so a block on a 64x64 map never builds a 4096 x 4096 matrix.
``sub_sample`` max-pools the keys and values (phi and g) by 2 in space (also in time for 1d/2d:
there is no time axis; 3d pools (1, 2, 2), as the paper does for video). W (or BN's scale when
``bn_layer``) starts at zero, so a new block is exactly the identity.

Context parallelism: with ``process_group=`` each rank passes its shard of the input along the
first spatial axis (L, H or T: whole rows or frames, in rank order) and gets its shard of z; the
aggregation runs on :func:`nlgraph.distributed.aggregate`, exactly the single-process block's. With
``sub_sample`` the 1d/2d shards must have an even length along that axis (a pooling window must
not straddle two ranks). BatchNorm statistics in training are per rank, as under DDP without
SyncBatchNorm.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import affinity as A
from .core import aggregate

__all__ = ["NonLocal1d", "NonLocal2d", "NonLocal3d", "MODES"]

MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: lambda: nn.MaxPool1d(2), 2: lambda: nn.MaxPool2d(2), 3: lambda: nn.MaxPool3d((1, 2, 2))}
_LAYOUT = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, T, H, W)"}


class _NonLocalNd(nn.Module):
    dim = 0

    def __init__(self, in_channels: int, inter_channels: Optional[int] = None,
                 mode: str = "embedded_gaussian", sub_sample: bool = True, bn_layer: bool = True,
                 use_scale: bool = False, *, process_group=None, distributed_method: str = "ring"):
        super().__init__()
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if inter_channels is None:
            inter_channels = max(1, in_channels // 2)
        if not isinstance(inter_channels, int) or isinstance(inter_channels, bool) or inter_channels < 1:
            raise ValueError(f"inter_channels must be a positive int (or None for in_channels // 2), "
                             f"got {inter_channels!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.in_channels, self.inter_channels, self.mode = in_channels, inter_channels, mode
        self.sub_sample, self.bn_layer, self.use_scale = bool(sub_sample), bool(bn_layer), bool(use_scale)
        conv = _CONV[self.dim]
        self.g = conv(in_channels, inter_channels, 1)
        if mode != "gaussian":
            self.theta = conv(in_channels, inter_channels, 1)
            self.phi = conv(in_channels, inter_channels, 1)
        if mode == "concatenation":
            # w of ReLU(w . [theta(x_i), phi(x_j)]): the first half acts on theta, the second on phi
            self.concat_project = nn.Parameter(torch.empty(2 * inter_channels))
            nn.init.normal_(self.concat_project, std=(2 * inter_channels) ** -0.5)
        self.pool = _POOL[self.dim]() if self.sub_sample else nn.Identity()
        # zero-initialised (BN's affine part, else the conv): a new block is the identity
        project = conv(inter_channels, in_channels, 1)
        self.W: nn.Module
        if self.bn_layer:
            norm = _BN[self.dim](in_channels)
            nn.init.zeros_(norm.weight)
            nn.init.zeros_(norm.bias)
            self.W = nn.Sequential(project, norm)
        else:
            nn.init.zeros_(project.weight)
            if project.bias is not None:  # always (a conv with bias); narrows the Optional
                nn.init.zeros_(project.bias)
            self.W = project
        #: backend of the core op ("auto": algebra for dot_product/concatenation, chunked otherwise)
        self.backend = "auto"
        #: a torch.distributed process group: the input is this rank's shard (module docstring)
        self.process_group = process_group
        self.distributed_method = distributed_method

    def affinity(self) -> A.Affinity:
        """The core op's affinity for this block's mode."""
        if self.mode == "gaussian":
            return A.Softmax(scale=1.0)
        if self.mode == "embedded_gaussian":
            return A.Softmax(scale=1.0 / math.sqrt(self.inter_channels) if self.use_scale else 1.0)
        if self.mode == "dot_product":
            return A.DotProduct()
        return A.Concatenation(self.concat_project)

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(queries (B, N, d), keys (B, M, d), values (B, M, inter)) as token matrices."""
        tokens = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731
        v = tokens(self.pool(self.g(x)))
        if self.mode == "gaussian":
            return tokens(x), tokens(self.pool(x)), v
        return tokens(self.theta(x)), tokens(self.pool(self.phi(x))), v

    def forward(self, x: Tensor) -> Tensor:
        """z = W(y) (+ BN) + x for x of shape (B, C, ...)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() != self.dim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape {_LAYOUT[self.dim]} with C = {self.in_channels}, got "
                             f"{tuple(x.shape)}")
        if self.sub_sample and min(x.shape[-2:] if self.dim > 1 else x.shape[-1:]) < 2:
            raise ValueError(f"sub_sample halves the spatial size, which must be >= 2, got {tuple(x.shape)}")
        q, k, v = self.embed(x)
        if self.process_group is None:
            y = aggregate(q, k, v, self.affinity(), backend=self.backend)
        else:
            if self.sub_sample and self.dim < 3 and x.shape[2] % 2:
                raise ValueError(f"with process_group and sub_sample, each rank's shard must have an even "
                                 f"length along the first spatial axis (pooling windows must not straddle "
                                 f"ranks), got {tuple(x.shape)}")
            from . import distributed

            y = distributed.aggregate(q, k, v, self.affinity(), group=self.process_group,
                                      method=self.distributed_method, backend=self.backend)
        y = y.transpose(1, 2).reshape(x.shape[0], self.inter_channels, *x.shape[2:])
        return self.W(y) + x

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, inter_channels={self.inter_channels}, mode={self.mode!r}, "
                f"sub_sample={self.sub_sample}, bn_layer={self.bn_layer}, use_scale={self.use_scale}")


class NonLocal1d(_NonLocalNd):
    """Non-local block over sequences (B, C, L). See the module docstring."""

    dim = 1


class NonLocal2d(_NonLocalNd):
    """Non-local block over images (B, C, H, W). See the module docstring."""

    dim = 2


class NonLocal3d(_NonLocalNd):
    """Non-local block over clips (B, C, T, H, W): space-time, keys pooled (1, 2, 2).

    See the module docstring.
    """

    dim = 3
