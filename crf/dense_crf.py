"""Fully connected CRF with Gaussian edge potentials: differentiable mean-field inference.

Krähenbühl and Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge
Potentials", NIPS 2011; trainable as a recurrent layer as in Zheng et al., "Conditional Random
Fields as Recurrent Neural Networks", ICCV 2015.

One mean-field step is

    m_i(l)  = sum_k w_k sum_{j != i} exp(-|f^k_i - f^k_j|^2 / 2) Q_j(l)        (the message)
    Q_i(l) ∝ exp(logit_i(l) - sum_l' mu(l, l') m_i(l'))

with the appearance kernel f^1 = (p / theta_alpha, I / theta_beta) and the smoothness kernel
f^2 = p / theta_gamma (p: pixel position times the pixel ``spacing``, I: the image's C channels, any
C >= 1; theta_beta may be one bandwidth per channel; for clips p includes the frame index scaled by
``theta_time``). Images are (B, C, H, W), clips or volumes (B, C, D, H, W): a CT/MR volume is a
C = 1 image with its voxel ``spacing``. The message is
``nlgraph.aggregate(f, f, Q, Gaussian(1, normalize=False), ExcludeSelf())``, computed
as the complete-graph sum minus the exact self term Q_i (the same number for exact backends, and a
form the permutohedral lattice can run): this module builds the features and the update, the core
op does the sums.
``mu`` is the Potts model (mu(l, l') = [l != l']) or a learned L x L compatibility.

Exact vs approximate: the default ``permutohedral`` backend filters approximately in O(N) per
kernel (a few percent relative error per message, see the README); with an exact backend
(``chunked``, ``reference``) every step is exact, O(N^2) per kernel.

Trainable (``trainable=True``): the kernel weights, the compatibility and the bandwidths theta_alpha,
theta_beta (per channel if given so) and theta_gamma are parameters (the bandwidths through their
logarithms, ``log_theta_*``, so they stay positive). On the lattice the bandwidths' gradient is the
exact derivative of the lattice's own output (nlgraph.backends.permutohedral.function), O(N) per
kernel; on an exact backend, of the exact Gaussian.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn

import nlgraph
from nlgraph._values import finite_number
from nlgraph.core import all_finite

__all__ = ["DenseCRF", "crf_features"]


Bandwidth = Union[float, Tensor]


def crf_features(image: Tensor, theta_pos: Bandwidth, theta_col: Optional[Union[Bandwidth, Sequence]] = None,
                 theta_time: Optional[float] = None, spacing: Optional[Sequence[float]] = None,
                 origin: int = 0) -> Tensor:
    """Per-pixel kernel features (B, N, S + C): scaled positions (and scaled channels), S spatial axes.

    Args:
        image: (B, C, H, W) or (B, C, D, H, W) (a clip or a volume), any C >= 1.
        theta_pos: spatial bandwidth (in ``spacing`` units: pixels by default); a float or a scalar
            tensor (differentiable).
        theta_col: channel bandwidth (a float, C floats, a scalar or (C,) tensor), or None for a
            position-only kernel.
        theta_time: temporal bandwidth (frames) of axis 0 for clips; defaults to ``theta_pos``.
        spacing: the physical size of a pixel/voxel along each spatial axis (S floats; default 1):
            positions are index * spacing.
        origin: index of the image's first row (frame, slice) in a larger one: a shard's offset
            under context parallelism.
    """
    b, c, spatial = image.shape[0], image.shape[1], image.shape[2:]
    dt, dev = image.dtype, image.device
    axes = [torch.arange(s, dtype=dt, device=dev) for s in spatial]
    axes[0] = axes[0] + origin
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(spatial))
    steps = [1.0] * len(spatial) if spacing is None else [float(x) for x in spacing]
    if isinstance(theta_pos, Tensor):  # differentiable: spacing / theta per axis
        theta = theta_pos.to(dt).reshape(1).expand(len(spatial))
        if len(spatial) == 3 and theta_time is not None:
            theta = torch.cat([theta.new_full((1,), float(theta_time)), theta[1:]])
        scale = torch.tensor(steps, dtype=dt, device=dev) / theta
    else:
        thetas = [float(theta_pos)] * len(spatial)
        if len(spatial) == 3 and theta_time is not None:
            thetas[0] = float(theta_time)
        scale = torch.tensor([st / th for st, th in zip(steps, thetas, strict=True)], dtype=dt, device=dev)
    feats = [(grid * scale).expand(b, -1, -1)]
    if theta_col is not None:
        col: Bandwidth
        if not isinstance(theta_col, (Tensor, Sequence)):
            col = float(theta_col)
        else:
            per_channel = (theta_col if isinstance(theta_col, Tensor)
                           else torch.tensor(theta_col, dtype=torch.float64))
            if per_channel.dim() > 1 or per_channel.numel() not in (1, c):
                raise ValueError(f"theta_col must be one bandwidth or one per channel (C = {c}), got shape "
                                 f"{tuple(per_channel.shape)}")
            col = per_channel.to(dtype=dt, device=dev)
        feats.append(image.flatten(2).transpose(1, 2) / col)
    return torch.cat(feats, dim=-1)


def _positive(name: str, value) -> float:
    if not finite_number(value, positive=True):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _bandwidths(name: str, value) -> Union[float, tuple[float, ...]]:
    """A positive bandwidth, or (theta_beta) a sequence / 1-D tensor of them (one per channel)."""
    if isinstance(value, Tensor):
        if value.dim() > 1 or value.numel() == 0:
            raise ValueError(f"{name} must be a number or a 1-D sequence of them, got shape "
                             f"{tuple(value.shape)}")
        value = value.detach().cpu().tolist()
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name} must not be empty")
        return tuple(_positive(f"{name}[{i}]", v) for i, v in enumerate(value))
    return _positive(name, value)


_THETAS = ("theta_alpha", "theta_beta", "theta_gamma")


def _theta_property(name: str) -> property:
    """theta_* of :class:`DenseCRF`: the float(s) given, or exp(log_theta_*) when trainable."""

    def get(self):
        p = self._parameters.get(f"log_{name}")
        return self._thetas[name] if p is None else p.exp()

    def set_(self, value):
        if f"log_{name}" in self._parameters:
            with torch.no_grad():
                p = self._parameters[f"log_{name}"]
                p.copy_(torch.tensor(_bandwidths(name, value), dtype=p.dtype).log().expand_as(p))
        else:
            self._thetas[name] = _bandwidths(name, value) if name == "theta_beta" else _positive(name, value)

    return property(get, set_, doc=f"{name}: a float (tuple), or exp(log_{name}) (a tensor) when trainable.")


class DenseCRF(nn.Module):
    """Mean-field inference of a dense CRF on batches of images or clips.

    Args:
        num_labels: L.
        theta_alpha: appearance kernel's spatial bandwidth (pixels), pydensecrf's ``sxy`` (80).
        theta_beta: appearance kernel's colour bandwidth, pydensecrf's ``srgb`` (13).
        theta_gamma: smoothness kernel's spatial bandwidth, pydensecrf's Gaussian ``sxy`` (3).
            theta_alpha and theta_gamma are in ``spacing`` units; theta_beta may be one bandwidth per
            image channel (a sequence).
        w_appearance: appearance kernel weight w1 (10); 0 disables the kernel.
        w_smoothness: smoothness kernel weight w2 (3); 0 disables the kernel.
        compatibility: "potts" or an (L, L) tensor mu(l, l') (energy; larger = less compatible).
        num_iterations: mean-field steps (5).
        trainable: make w1, w2, the compatibility and the bandwidths parameters (CRF-as-RNN; the
            bandwidths as ``log_theta_alpha``, ``log_theta_beta``, ``log_theta_gamma``).
        theta_time: temporal bandwidth (frames) of both kernels for clips; default = the spatial one.
        spacing: pixel/voxel size along each spatial axis (2 or 3 positive floats; default 1 each),
            e.g. a CT volume's (z, y, x) voxel spacing in mm; set once for every input's dimensionality.

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
                 compatibility: Union[str, Tensor] = "potts", num_iterations: int = 5,
                 trainable: bool = False,
                 theta_time: Optional[float] = None, spacing: Optional[Sequence[float]] = None):
        super().__init__()
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 2:
            raise ValueError(f"num_labels must be an int >= 2, got {num_labels!r}")
        if not isinstance(num_iterations, int) or num_iterations < 0:
            raise ValueError(f"num_iterations must be an int >= 0, got {num_iterations!r}")
        self.num_labels = num_labels
        self._thetas = {"theta_alpha": _positive("theta_alpha", theta_alpha),
                        "theta_beta": _bandwidths("theta_beta", theta_beta),
                        "theta_gamma": _positive("theta_gamma", theta_gamma)}
        self.theta_time = None if theta_time is None else _positive("theta_time", theta_time)
        if spacing is not None:
            if (isinstance(spacing, (str, bytes)) or not isinstance(spacing, Sequence)
                    or len(spacing) not in (2, 3)):
                raise ValueError(f"spacing must be 2 or 3 positive numbers (one per spatial axis), got "
                                 f"{spacing!r}")
            spacing = tuple(_positive(f"spacing[{i}]", s) for i, s in enumerate(spacing))
        self.spacing = spacing
        for name, w in (("w_appearance", w_appearance), ("w_smoothness", w_smoothness)):
            if not finite_number(w):
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
            for name in _THETAS:
                log_theta = torch.tensor(self._thetas.pop(name)).log()
                self.register_parameter(f"log_{name}", nn.Parameter(log_theta))
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
        if (image.dim() != unary.dim() or image.shape[0] != unary.shape[0]
                or image.shape[2:] != unary.shape[2:]):
            raise ValueError(f"image must be (B, C, ...) with the unary's batch and spatial size "
                             f"{(unary.shape[0], '*', *unary.shape[2:])}, got {tuple(image.shape)}")
        if self.spacing is not None and len(self.spacing) != unary.dim() - 2:
            raise ValueError(f"spacing has {len(self.spacing)} entries but the unary {tuple(unary.shape)} "
                             f"has {unary.dim() - 2} spatial axes")
        beta = self.theta_beta
        n_beta = beta.numel() if isinstance(beta, Tensor) else len(beta) if isinstance(beta, tuple) else 1
        if n_beta not in (1, image.shape[1]):
            raise ValueError(f"theta_beta has {n_beta} per-channel bandwidths but the image "
                             f"{tuple(image.shape)} has C = {image.shape[1]} channels")
        for name, t in (("unary", unary), ("image", image)):
            if not all_finite(t):
                raise ValueError(f"{name} contains NaN or Inf (shape {tuple(t.shape)})")
        if unary.dtype != image.dtype or unary.device != image.device:
            raise ValueError(f"unary ({unary.dtype}, {unary.device}) and image ({image.dtype}, "
                             f"{image.device}) "
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
        """Marginals Q (B, L, ...) from unary logits (B, L, ...) (= -unary energy) and an image
        (B, C, ...)."""
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
            f_app = crf_features(image, self.theta_alpha, self.theta_beta, self.theta_time, self.spacing,
                                 origin)
            feats.append((f_app, kw[0]))
        if self.kernel_weights.requires_grad or float(self.kernel_weights[1]) != 0:
            f_smooth = crf_features(image, self.theta_gamma, None, self.theta_time, self.spacing, origin)
            feats.append((f_smooth, kw[1]))
        logits = unary.flatten(2).transpose(1, 2)  # (B, N, L)
        mu = self.compatibility.to(unary.dtype)
        q = torch.softmax(logits, dim=-1)
        for _ in range(self.num_iterations):
            q = torch.softmax(logits - self.message(q, feats) @ mu.T, dim=-1)
        # contiguous, like a convolution's output (some losses' backward, e.g. nll_loss 2-D, require it)
        return q.transpose(1, 2).reshape(unary.shape).contiguous()

    theta_alpha = _theta_property("theta_alpha")
    theta_beta = _theta_property("theta_beta")
    theta_gamma = _theta_property("theta_gamma")

    def extra_repr(self) -> str:
        def show(t):
            return [round(x, 4) for x in t.detach().reshape(-1).tolist()] if isinstance(t, Tensor) else t

        return (f"num_labels={self.num_labels}, theta_alpha={show(self.theta_alpha)}, "
                f"theta_beta={show(self.theta_beta)}, theta_gamma={show(self.theta_gamma)}, "
                f"num_iterations={self.num_iterations}, "
                f"trainable={isinstance(self.kernel_weights, nn.Parameter)}"
                + ("" if self.spacing is None else f", spacing={self.spacing}"))
