"""Non-local means denoising (Buades, Coll and Morel, CVPR 2005) as one call of the core op.

Every pixel is a node whose features are its (reflect-padded) patch, the graph is the search
window (``LocalWindow`` of radius ``patch_distance``, clipped at the borders), the affinity is a
Gaussian on patch distances normalised by its sum (C = sum f), and the values are the pixels:

    u_i = sum_{j in window(i)} w_ij u_j / sum_j w_ij,
    w_ij = exp(-max(sum_p g_p |P_i(p) - P_j(p)|^2 / (C h^2 sum g) - 2 sigma^2 / h^2, 0))

with patch weights g Gaussian (std (patch_size - 1) / 4, scikit-image's classic algorithm,
``fast_mode=False``) or uniform (``fast_mode=True``: scikit-image's fast-mode distance, which sums
over the (patch_size - 1)^D box its integral images cover and divides by patch_size^D), including
scikit-image's sigma correction. This is the exact formula; scikit-image
additionally drops weights below exp(-5) and its fast mode also searches reflected pixels past the
border, so results agree to a fraction of a dB of PSNR rather than bit for bit.
Nodes are laid out in spatial blocks (:func:`nlgraph.graph.blocked_order`) so the tiled backend
skips the tiles outside the window. On GPU the same call runs on the GPU backends.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import affinity as A
from .core import aggregate, all_finite
from .graph import LocalWindow, blocked_order

__all__ = ["denoise_nl_means"]

ArrayLike = Union[np.ndarray, torch.Tensor]


def _patches(x: torch.Tensor, s: int) -> torch.Tensor:
    """(C, *spatial) image -> (N, C * s^D) reflect-padded patches, features ordered (C, patch offsets)."""
    o = s // 2
    nd = x.dim() - 1
    xp = F.pad(x[None], (o, o) * nd, mode="reflect")[0]
    if nd == 2:
        return F.unfold(xp[None], s)[0].T  # (H*W, C*s*s)
    u = xp.unfold(1, s, 1).unfold(2, s, 1).unfold(3, s, 1)  # (C, P, R, Col, s, s, s)
    return u.permute(1, 2, 3, 0, 4, 5, 6).reshape(-1, x.shape[0] * s ** 3)


def _patch_weights(s: int, nd: int, channels: int, h: float, uniform: bool, dtype, device) -> torch.Tensor:
    """sqrt(2 w) per feature, where sum_features w diff^2 is scikit-image's patch distance.

    Gaussian patch weights (std (s - 1) / 4) for the classic algorithm, uniform ones for fast mode.
    """
    o = s // 2
    axes = [torch.arange(-o, o + 1, dtype=dtype, device=device)] * nd
    grids = torch.meshgrid(*axes, indexing="ij")
    if uniform:
        # scikit-image's fast mode sums squared differences from integral images over the box of
        # offsets (-o, o] (an (s - 1)^D box) and divides by s^D: reproduce that distance exactly
        g = torch.ones_like(grids[0])
        for c in grids:
            g = g * (c > -o)
        w = g / (channels * s ** nd * h * h)
    else:
        r2 = sum(c * c for c in grids)
        a = (s - 1.0) / 4.0
        g = torch.exp(-r2 / (2 * a * a)) if a > 0 else torch.ones_like(r2)
        w = g / (channels * g.sum() * h * h)
    return torch.sqrt(2.0 * w).reshape(-1).repeat(channels)


def denoise_nl_means(image: ArrayLike, patch_size: int = 7, patch_distance: int = 11, h: float = 0.1,
                     fast_mode: bool = True, sigma: float = 0.0, channel_axis: Optional[int] = None, *,
                     backend: str = "auto", block: int = 16) -> ArrayLike:
    """Non-local means with scikit-image's argument names and meanings.

    Args:
        image: 2-D grey, 2-D colour (with ``channel_axis``) or 3-D grey volume; a floating-point numpy
            array or torch tensor (the result has the same type, dtype and device).
        patch_size: odd patch side (pixels).
        patch_distance: search-window radius (pixels).
        h: cut-off distance in grey levels (larger = smoother).
        fast_mode: as scikit-image: True uses its fast mode's uniform patch distance, False the
            classic Gaussian-weighted one. Both are the same core-op call with other features.
        sigma: expected noise standard deviation, subtracted from patch distances (flat-top weights).
        channel_axis: axis of the channels, or None for grey images and volumes.
        backend: the core op's backend ("auto": chunked on CPU).
        block: side of the spatial blocks the nodes are laid out in (affects speed only).

    Returns:
        The denoised image, same shape and type.
    """
    is_numpy = isinstance(image, np.ndarray)
    if not is_numpy and not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a numpy array or a torch tensor, got {type(image).__name__}")
    x = torch.from_numpy(np.ascontiguousarray(image)) if is_numpy else image
    if not x.is_floating_point():
        raise TypeError(f"image must be floating point (e.g. skimage.img_as_float(image)), got {x.dtype}")
    if channel_axis is not None:
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, int) or not -x.dim() <= channel_axis < x.dim():
            raise ValueError(f"channel_axis {channel_axis!r} is out of range for an image of shape {tuple(x.shape)}")
        x = torch.movedim(x, channel_axis, 0)
    else:
        x = x[None]
    spatial = tuple(x.shape[1:])
    if len(spatial) not in (2, 3):
        raise ValueError(f"image must be 2-D or 3-D (plus an optional channel axis), got shape "
                         f"{tuple(image.shape)} with channel_axis={channel_axis}")
    if x.numel() == 0:
        raise ValueError(f"image must not be empty, got shape {tuple(image.shape)}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"patch_size must be a positive odd int, got {patch_size!r}")
    if patch_size // 2 >= min(spatial):
        raise ValueError(f"patch_size {patch_size} is too large for an image of spatial shape {spatial} "
                         f"(half the patch must be smaller than every side)")
    if isinstance(patch_distance, bool) or not isinstance(patch_distance, int) or patch_distance < 0:
        raise ValueError(f"patch_distance must be an int >= 0, got {patch_distance!r}")
    for name, val, positive in (("h", h, True), ("sigma", sigma, False)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val < 0 or (
                positive and val == 0):
            raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {val!r}")
    if not all_finite(x):
        raise ValueError(f"image contains NaN or Inf (shape {tuple(image.shape)})")

    out_dtype = x.dtype
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(cd)
    channels = x.shape[0]
    if not isinstance(fast_mode, bool):
        raise TypeError(f"fast_mode must be a bool, got {type(fast_mode).__name__}")
    scale = _patch_weights(patch_size, len(spatial), channels, float(h), fast_mode, cd, x.device)
    feats = _patches(x, patch_size) * scale
    if not all_finite(feats):
        raise ValueError(f"h={h!r} is too small for this image: the patches scaled by 1/h overflow {cd} "
                         f"(image values up to {float(x.abs().max()):.3g})")
    # the noise correction subtracts 2 sigma^2 per weighted squared difference: 2 sigma^2 sum(w)
    try:
        offset = float(sigma) ** 2 * float((scale * scale).sum())
    except OverflowError:
        offset = math.inf
    if not math.isfinite(offset):
        raise ValueError(f"sigma={sigma!r} is too large for h={h!r}: the noise correction 2 sigma^2 / h^2 "
                         f"overflows a float")
    values = x.reshape(channels, -1).T
    order = blocked_order(spatial, block).to(x.device)
    graph = LocalWindow(spatial, patch_distance, order=order)
    f = feats[order].contiguous()
    aff = A.Gaussian(1.0, normalize=True, offset=offset)
    y_ordered = aggregate(f, f, values[order].contiguous(), aff, graph, backend=backend)
    y = torch.empty_like(y_ordered)
    y[order] = y_ordered
    out = y.T.reshape(channels, *spatial).to(out_dtype)
    out = torch.movedim(out, 0, channel_axis) if channel_axis is not None else out[0]
    return out.cpu().numpy() if is_numpy else out
