"""Fully connected CRF with Gaussian edge potentials: differentiable mean-field inference.

Krähenbühl and Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge
Potentials", NIPS 2011; trainable as a recurrent layer as in Zheng et al., "Conditional Random
Fields as Recurrent Neural Networks", ICCV 2015.

One mean-field step is

    m_i(l)  = sum_k w_k sum_{j != i} exp(-|f^k_i - f^k_j|^2 / 2) Q_j(l)        (the message)
    Q_i(l) ∝ exp(logit_i(l) - sum_l' mu(l, l') m_i(l'))

with the appearance kernel f^1 = (p / theta_alpha, I / theta_beta) and the smoothness kernel
f^2 = p / theta_gamma (p: pixel position, I: colour; for clips p includes the frame index scaled by
``theta_time``). The message is ``nlgraph.aggregate(f, f, Q, Gaussian(1, normalize=False), ExcludeSelf())``, computed
as the complete-graph sum minus the exact self term Q_i (the same number for exact backends, and a
form the permutohedral lattice can run): this module builds the features and the update, the core
op does the sums.
``mu`` is the Potts model (mu(l, l') = [l != l']) or a learned L x L compatibility.

Exact vs approximate: the default ``permutohedral`` backend filters approximately in O(N) per
kernel (a few percent relative error per message, see the README); with an exact backend
(``chunked``, ``reference``) every step is exact, O(N^2) per kernel.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

import nlgraph
from nlgraph.core import all_finite

__all__ = ["DenseCRF", "crf_features"]


def crf_features(image: Tensor, theta_pos: float, theta_col: Optional[float] = None,
                 theta_time: Optional[float] = None, origin: int = 0) -> Tensor:
    """Per-pixel kernel features (B, N, D): scaled positions (and scaled colours).

    Args:
        image: (B, C, H, W) or (B, C, T, H, W).
        theta_pos: spatial bandwidth (pixels).
        theta_col: colour bandwidth, or None for a position-only kernel.
        theta_time: temporal bandwidth (frames) for clips; defaults to ``theta_pos``.
        origin: position of the image's first row (frame, for clips) in a larger one: a shard's
            offset under context parallelism.
    """
    b, spatial = image.shape[0], image.shape[2:]
    axes = [torch.arange(s, dtype=image.dtype, device=image.device) for s in spatial]
    axes[0] = axes[0] + origin
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(spatial))
    scale = torch.full((len(spatial),), 1.0 / theta_pos, dtype=image.dtype, device=image.device)
    if len(spatial) == 3:
        scale[0] = 1.0 / (theta_pos if theta_time is None else theta_time)
    feats = [(grid * scale).expand(b, -1, -1)]
    if theta_col is not None:
        feats.append(image.flatten(2).transpose(1, 2) / theta_col)
    return torch.cat(feats, dim=-1)


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


class DenseCRF(nn.Module):
    """Mean-field inference of a dense CRF on batches of images or clips.

    Args:
        num_labels: L.
        theta_alpha: appearance kernel's spatial bandwidth (pixels), pydensecrf's ``sxy`` (80).
        theta_beta: appearance kernel's colour bandwidth, pydensecrf's ``srgb`` (13).
        theta_gamma: smoothness kernel's spatial bandwidth, pydensecrf's Gaussian ``sxy`` (3).
        w_appearance: appearance kernel weight w1 (10); 0 disables the kernel.
        w_smoothness: smoothness kernel weight w2 (3); 0 disables the kernel.
        compatibility: "potts" or an (L, L) tensor mu(l, l') (energy; larger = less compatible).
        num_iterations: mean-field steps (5).
        trainable: make w1, w2 and the compatibility parameters (CRF-as-RNN).
        theta_time: temporal bandwidth (frames) of both kernels for clips; default = the spatial one.

    Attributes:
        backend: the core op's backend for the messages: "permutohedral" (default, approximate,
            O(N)) or an exact one ("chunked", "reference"; O(N^2)), or "auto".
        process_group: a ``torch.distributed`` group for context parallelism (default None): each
            rank passes its shard of unary and image along the first spatial axis (rows, or frames
            for clips; rank order) and gets its shard of Q. The messages then run exactly
            (:func:`nlgraph.distributed.aggregate` with ``chunked``, or ``backend`` if it is an
            exact one), so Q equals the single-process CRF with an exact backend.
    """

    def __init__(self, num_labels: int, theta_alpha: float = 80.0, theta_beta: float = 13.0,
                 theta_gamma: float = 3.0, w_appearance: float = 10.0, w_smoothness: float = 3.0,
                 compatibility: Union[str, Tensor] = "potts", num_iterations: int = 5, trainable: bool = False,
                 theta_time: Optional[float] = None):
        super().__init__()
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 2:
            raise ValueError(f"num_labels must be an int >= 2, got {num_labels!r}")
        if not isinstance(num_iterations, int) or num_iterations < 0:
            raise ValueError(f"num_iterations must be an int >= 0, got {num_iterations!r}")
        self.num_labels = num_labels
        self.theta_alpha = _positive("theta_alpha", theta_alpha)
        self.theta_beta = _positive("theta_beta", theta_beta)
        self.theta_gamma = _positive("theta_gamma", theta_gamma)
        self.theta_time = None if theta_time is None else _positive("theta_time", theta_time)
        for name, w in (("w_appearance", w_appearance), ("w_smoothness", w_smoothness)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
        if isinstance(compatibility, str):
            if compatibility != "potts":
                raise ValueError(f"compatibility must be 'potts' or an (L, L) tensor, got {compatibility!r}")
            mu = 1.0 - torch.eye(num_labels)
        elif isinstance(compatibility, Tensor):
            if compatibility.shape != (num_labels, num_labels) or not compatibility.is_floating_point():
                raise ValueError(f"compatibility must be a float ({num_labels}, {num_labels}) tensor, got "
                                 f"{compatibility.dtype} {tuple(compatibility.shape)}")
            if not all_finite(compatibility.detach()):
                raise ValueError(f"compatibility must be finite, got a ({num_labels}, {num_labels}) tensor "
                                 f"with NaN or Inf entries")
            mu = compatibility.detach().clone()
        else:
            raise TypeError(f"compatibility must be 'potts' or a float ({num_labels}, {num_labels}) tensor, "
                            f"got {type(compatibility).__name__} {compatibility!r}")
        weights = torch.tensor([float(w_appearance), float(w_smoothness)])
        if trainable:
            self.kernel_weights = nn.Parameter(weights)
            self.compatibility = nn.Parameter(mu)
        else:
            self.register_buffer("kernel_weights", weights)
            self.register_buffer("compatibility", mu)
        self.num_iterations = num_iterations
        self.backend = "permutohedral"
        self.process_group = None
        self.distributed_method = "ring"

    def _check(self, unary: Tensor, image: Tensor) -> None:
        for name, t in (("unary", unary), ("image", image)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if unary.dim() not in (4, 5) or unary.shape[1] != self.num_labels:
            raise ValueError(f"unary must be (B, L, H, W) or (B, L, T, H, W) with L = {self.num_labels}, got "
                             f"{tuple(unary.shape)}")
        if image.dim() != unary.dim() or image.shape[0] != unary.shape[0] or image.shape[2:] != unary.shape[2:]:
            raise ValueError(f"image must be (B, C, ...) with the unary's batch and spatial size "
                             f"{(unary.shape[0], '*', *unary.shape[2:])}, got {tuple(image.shape)}")
        for name, t in (("unary", unary), ("image", image)):
            if not all_finite(t):
                raise ValueError(f"{name} contains NaN or Inf (shape {tuple(t.shape)})")
        if unary.dtype != image.dtype or unary.device != image.device:
            raise ValueError(f"unary ({unary.dtype}, {unary.device}) and image ({image.dtype}, {image.device}) "
                             f"must share dtype and device")

    def message(self, q: Tensor, features: list[tuple[Tensor, Tensor]]) -> Tensor:
        """sum_k w_k sum_{j != i} k_k(f_i, f_j) q_j for q (B, N, L): one core-op call per kernel."""
        total = None
        for feat, w in features:
            # complete graph minus the self term k(i, i) = 1: exact backends give the j != i sum exactly,
            # and the lattice (which filters over all points) can serve the same call
            if self.process_group is None:
                m = nlgraph.aggregate(feat, feat, q, nlgraph.Gaussian(1.0, normalize=False),
                                      backend=self.backend)
            else:
                from nlgraph import distributed

                backend = "chunked" if self.backend in ("permutohedral", "auto") else self.backend
                m = distributed.aggregate(feat, feat, q, nlgraph.Gaussian(1.0, normalize=False), None,
                                          group=self.process_group, method=self.distributed_method,
                                          backend=backend)
            m = m - q
            total = w * m if total is None else total + w * m
        return torch.zeros_like(q) if total is None else total

    def forward(self, unary: Tensor, image: Tensor) -> Tensor:
        """Marginals Q (B, L, ...) from unary logits (B, L, ...) (= -unary energy) and an image (B, C, ...)."""
        self._check(unary, image)
        kw = self.kernel_weights.to(unary.dtype)
        origin = 0
        if self.process_group is not None:
            import torch.distributed as dist

            from nlgraph import distributed

            first, _ = distributed.global_sizes(unary.shape[2], unary.shape[2], self.process_group)
            origin = sum(first[:dist.get_rank(self.process_group)])
        feats = []
        if self.kernel_weights.requires_grad or float(self.kernel_weights[0]) != 0:
            feat = crf_features(image, self.theta_alpha, self.theta_beta, self.theta_time, origin)
            feats.append((feat, kw[0]))
        if self.kernel_weights.requires_grad or float(self.kernel_weights[1]) != 0:
            feats.append((crf_features(image, self.theta_gamma, None, self.theta_time, origin), kw[1]))
        logits = unary.flatten(2).transpose(1, 2)  # (B, N, L)
        mu = self.compatibility.to(unary.dtype)
        q = torch.softmax(logits, dim=-1)
        for _ in range(self.num_iterations):
            q = torch.softmax(logits - self.message(q, feats) @ mu.T, dim=-1)
        # contiguous, like a convolution's output (some losses' backward, e.g. nll_loss 2-D, require it)
        return q.transpose(1, 2).reshape(unary.shape).contiguous()

    def extra_repr(self) -> str:
        return (f"num_labels={self.num_labels}, theta_alpha={self.theta_alpha}, theta_beta={self.theta_beta}, "
                f"theta_gamma={self.theta_gamma}, num_iterations={self.num_iterations}, "
                f"trainable={isinstance(self.kernel_weights, nn.Parameter)}")
