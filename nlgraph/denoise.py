"""Non-local means denoising (Buades, Coll and Morel, CVPR 2005): the core op on a search-window graph.

Non-local means is an instance of the core op ``y_i = sum_j f_ij v_j / C_i`` on a ``LocalWindow``
graph (radius ``patch_distance``, clipped at the borders): every pixel is a node, its features the
(reflect-padded) patch around it, the affinity a Gaussian on patch distances normalised by its sum
(C = sum f), the values the pixels::

    u_i = sum_{j in window(i)} w_ij u_j / sum_j w_ij,
    w_ij = exp(-max(sum_p g_p |P_i(p) - P_j(p)|^2 / (C h^2 sum g) - 2 sigma^2 / h^2, 0))

with patch weights g Gaussian (std (patch_size - 1) / 4, scikit-image's classic algorithm,
``fast_mode=False``) or uniform (``fast_mode=True``: scikit-image's fast-mode distance, which sums
over the (patch_size - 1)^D box its integral images cover and divides by patch_size^D), including
scikit-image's sigma correction and its cut-off: weights whose corrected distance exceeds
``cutoff`` (default 5.0, scikit-image's ``DISTANCE_CUTOFF``) are 0 (``cutoff=None``: the exact
formula). scikit-image's fast mode also searches reflected pixels past the border, and its classic
mode applies the cut-off to partial sums, so results agree to a fraction of a dB of PSNR rather
than bit for bit.

Two computations of that one formula:

* ``backend="auto"`` (default), shift-major: the affinity of an edge (i, i + t) is a patch distance,
  a filter (box or separable Gaussian) applied to the per-pixel squared differences between the
  image and its shift by t. So the weights of all edges with offset t come from one image-sized
  filter of one difference image, the way scikit-image's fast mode computes them (Darbon et al.
  2008, Froment 2014): for each offset of the half window (f_ij = f_ji, so each pair is computed
  once and added to both ends), box filtering with cumulative sums (integral images) or a separable
  Gaussian, then the weighted sums of the shifted pixels, all in vectorised tensor ops over every
  pixel. O(N w^D) for the box (independent of the patch size), O(N w^D p D) for the Gaussian,
  against the core op's O(N w^D p^D C) for generic features. On CPU the window's offsets are shared
  among ``torch.get_num_threads()`` worker threads (each with its own sums, added in a fixed order: the
  result depends on the thread count only by rounding and is the same from call to call); with
  autograd or on other devices one thread runs them all. This is a specialised affinity
  computation, not a second aggregation: it evaluates the same f_ij, C_i and sums as
  :func:`nlgraph.aggregate` on the same graph (tests check the equality), exploiting that a patch
  distance is a filtered difference image, which generic features do not allow. Differentiable
  (autograd) in the image.
* ``backend=NAME`` (any core-op backend, e.g. ``"chunked"``, ``"reference"``, ``"triton"``): one
  :func:`nlgraph.aggregate` call with the weighted patches as features, nodes laid out in spatial
  blocks (:func:`nlgraph.graph.blocked_order`) so the tiled backends skip the tiles outside the window.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import affinity as A
from ._values import finite_number
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
        r2 = grids[0] * grids[0]
        for c in grids[1:]:
            r2 = r2 + c * c
        a = (s - 1.0) / 4.0
        g = torch.exp(-r2 / (2 * a * a)) if a > 0 else torch.ones_like(r2)
        w = g / (channels * g.sum() * h * h)
    return torch.sqrt(2.0 * w).reshape(-1).repeat(channels)


# Elements of the largest per-offset work array of one strip on CPU (C x (rows + patch - 1) x the
# padded other axes): below torch's parallel grain size (32768), so every op of the loop runs inline
# (measured: with 2 threads on a busy machine, ops that go parallel stall for milliseconds each), and
# small enough to stay in the L2 cache (and in malloc's heap, not fresh mmaps) through the ~10
# passes an offset takes.
_STRIP_ELEMS = (1 << 15) - 1
# Fewest window offsets per CPU worker thread before a second thread is worth its start and its
# image-sized sums.
_MIN_OFFSETS_PER_WORKER = 8
# Most CPU worker threads: each holds its own image-sized sums.
_MAX_WORKERS = 8


def _half_window(radius: tuple[int, ...]):
    """The offsets t != 0 of the window with t > 0 lexicographically (one of each pair t, -t)."""
    zero = (0,) * len(radius)
    for t in itertools.product(*[range(-r, r + 1) for r in radius]):
        if t > zero:
            yield t


def _shift_major(x: torch.Tensor, s: int, d: int, h: float, sigma: float, fast: bool,
                 cutoff: Optional[float]) -> torch.Tensor:
    """Non-local means of a (C, *spatial) image, offset by offset (see the module docstring).

    For an offset t and every pixel i with i + t in the image, the squared patch distance is the
    patch filter applied to D_t(q) = sum_c (x_c(q) - x_c(q + t))^2 on the reflect-padded image:
    fast mode sums D_t over the box of patch offsets (-o, o]^D with cumulative sums (two passes per
    axis, whatever the patch size), the classic mode weighs it with the separable Gaussian (one
    multiply-add per tap and axis). The weight w = exp(-max(dist - corr, 0)) (0 where
    max(dist - corr, 0) > cutoff) then adds w x(i + t) to pixel i and w x(i) to pixel i + t (the
    distance is symmetric). Strips along the first axis keep the work arrays in cache on CPU.
    """
    x = x.contiguous()  # channel-first planes (a colour image arrives channel-last, strided by C)
    channels, spatial = x.shape[0], tuple(x.shape[1:])
    nd, o = len(spatial), s // 2
    inv_h2 = 1.0 / (h * h) if h * h > 0 else math.inf
    if fast:
        scale2 = inv_h2 / (channels * s ** nd)
        corr_w = float((s - 1) ** nd) / float(s ** nd)  # sum of the patch weights times channels * h^2
        taps: list[float] = []  # a box filter (cumulative sums): no taps
    else:
        a = (s - 1.0) / 4.0
        p = torch.arange(-o, o + 1, dtype=torch.float64)
        g1 = torch.exp(-p * p / (2 * a * a)) if a > 0 else torch.ones_like(p)
        scale2 = inv_h2 / (channels * float(g1.sum()) ** nd)
        corr_w = 1.0
        taps = [float(v) for v in g1]
    xs = F.pad(x[None], (o, o) * nd, mode="reflect")[0] * math.sqrt(scale2)
    if not all_finite(xs):
        raise ValueError(f"h={h!r} is too small for this image: the patches scaled by 1/h overflow {x.dtype} "
                         f"(image values up to {float(x.abs().max()):.3g})")
    # scikit-image's noise correction: 2 sigma^2 per weighted squared difference (per channel)
    try:
        corr = 2.0 * float(sigma) ** 2 * corr_w * inv_h2
    except OverflowError:
        corr = math.inf
    if not math.isfinite(corr):
        raise ValueError(f"sigma={sigma!r} is too large for h={h!r}: the noise correction 2 sigma^2 / h^2 "
                         f"overflows a float")
    inplace = not (torch.is_grad_enabled() and x.requires_grad)  # autograd: out-of-place weights
    numpy_exp = inplace and x.device.type == "cpu"
    # the cut-off keeps the weights w = exp(-max(d - corr, 0)) >= exp(-cutoff), i.e. above the next
    # value below that in the image's dtype (F.threshold keeps w > t). On the weights, not on the
    # distances before exp: numpy's exp of -inf takes a slow path (6.6x a finite strip's time here)
    thresh = None
    if cutoff is not None:
        edge = np.exp(np.array(-cutoff, dtype=np.float64 if x.dtype == torch.float64 else np.float32))
        thresh = float(np.nextafter(edge, edge.dtype.type(0)))
    radius = tuple(min(d, n - 1) for n in spatial)
    # the values and a plane of ones (the weight sum rides along as one more channel: one
    # multiply-add per offset and edge end covers the numerator and the denominator)
    xa = torch.cat([x, torch.ones_like(x[:1])])
    inner = 1
    for n in spatial[1:]:
        inner *= n + 2 * o
    rows = max(1, _STRIP_ELEMS // inner - 2 * o) if x.device.type == "cpu" else spatial[0]
    # Every view of the loop is made with as_strided from element offsets worked out here once per
    # offset (measured: a third of the time of tensor[slices], which the loop makes ~15 of per offset
    # and strip). xs: (C, *padded), xa and the sums acc: (C + 1, *spatial), all contiguous.
    sx, sa = xs.stride(), xa.stride()
    x0, a0 = xs.storage_offset(), xa.storage_offset()
    plan = []  # per offset: its rows of i along the strip axis, the other axes' sizes and offsets
    for t in _half_window(radius):
        lo = [max(0, -v) for v in t]
        hi = [min(n, n - v) for n, v in zip(spatial, t, strict=True)]
        lens = tuple(b - a for a, b in zip(lo[1:], hi[1:], strict=True))
        plan.append((t[0], lo[0], hi[0], lens, tuple(n + 2 * o for n in lens),
                     x0 + sum(a * st for a, st in zip(lo[1:], sx[2:], strict=True)),
                     x0 + sum((a + v) * st for a, v, st in zip(lo[1:], t[1:], sx[2:], strict=True)),
                     sum(a * st for a, st in zip(lo[1:], sa[2:], strict=True)),
                     sum((a + v) * st for a, v, st in zip(lo[1:], t[1:], sa[2:], strict=True))))
    px, pa, plane = sx[1:], sa, sx[0]

    def run_strips(starts: list[int], offsets: list, acc: torch.Tensor) -> None:
        """Add the edges with these offsets whose first end lies in these strips to acc (the
        weighted sums of the values, then of ones)."""
        a1 = acc.storage_offset()
        # strip-major, then offset by offset: a strip's pixels and those within the window of it stay
        # in cache
        for s0 in starts:
            for t0, lo0, hi0, lens, plens, xi0, xj0, ai0, aj0 in offsets:
                r0, r1 = max(s0, lo0), min(s0 + rows, hi0)
                if r0 >= r1:
                    continue
                n0 = r1 - r0
                psize = (n0 + 2 * o,) + plens
                xi, xj = xi0 + r0 * px[0], xj0 + (r0 + t0) * px[0]
                # the sum over channels, one plane at a time (faster than one op over all planes and
                # a reduction)
                dsq = xs.as_strided(psize, px, xi) - xs.as_strided(psize, px, xj)
                dsq = dsq.square_() if inplace else dsq * dsq
                for c in range(1, channels):
                    diff = xs.as_strided(psize, px, xi + c * plane) - xs.as_strided(psize, px, xj + c * plane)
                    dsq = dsq.addcmul_(diff, diff) if inplace else dsq + diff * diff
                # filter the last axes first (contiguous), the strip axis last, which yields -distance
                for ax in range(nd - 1, -1, -1):
                    n = n0 if ax == 0 else lens[ax - 1]
                    if fast:
                        if o == 0:  # an empty box: distance 0
                            dsq = dsq.narrow(ax, 0, n) * 0.0
                            continue
                        q = dsq.cumsum(ax)
                        qs, size = q.stride(), q.shape[:ax] + (n,) + q.shape[ax + 1:]
                        a_ = q.as_strided(size, qs, q.storage_offset() + 2 * o * qs[ax])
                        b_ = q.as_strided(size, qs, q.storage_offset())
                        dsq = a_ - b_ if ax else b_ - a_
                    else:
                        acc_ = dsq.narrow(ax, 0, n) * (taps[0] if ax else -taps[0])
                        for k in range(1, 2 * o + 1):
                            acc_.add_(dsq.narrow(ax, k, n), alpha=taps[k] if ax else -taps[k])
                        dsq = acc_
                negdist = dsq
                if corr > 0:
                    negdist = (negdist.add_(corr).clamp_(max=0.0) if inplace
                               else (negdist + corr).clamp(max=0.0))
                if numpy_exp:  # numpy's exp: single-threaded (torch's goes parallel on small strips and
                    np.exp(negdist.numpy(), out=negdist.numpy())  # stalls on a busy machine), and faster
                    w = negdist
                else:
                    w = negdist.exp_() if inplace else negdist.exp()
                if thresh is not None:  # the cut-off: weights below exp(-cutoff) are 0
                    w = torch.threshold_(w, thresh, 0.0) if inplace else torch.threshold(w, thresh, 0.0)
                asize = (channels + 1, n0) + lens
                ai, aj = ai0 + r0 * pa[1], aj0 + (r0 + t0) * pa[1]
                acc.as_strided(asize, pa, a1 + ai).addcmul_(w, xa.as_strided(asize, pa, a0 + aj))
                acc.as_strided(asize, pa, a1 + aj).addcmul_(w, xa.as_strided(asize, pa, a0 + ai))

    starts = list(range(0, spatial[0], rows))
    # the offset 0: distance 0, weight exp(-max(-corr, 0)) = 1
    acc = xa.clone()
    workers = min(torch.get_num_threads(), _MAX_WORKERS, len(plan) // _MIN_OFFSETS_PER_WORKER)
    if workers < 2 or not inplace or x.device.type != "cpu":
        run_strips(starts, plan, acc)
        return acc[:channels] / acc[channels]
    # several CPU threads, each over its own offsets (interleaved, so each does about the same work)
    # and every strip, into its own sums, added in worker order: deterministic for a given thread
    # count. Splitting the offsets (not the strips) keeps each op at the strip size that stays in
    # cache however small the image. torch's ops release the GIL and, below its grain size, run
    # inline in the worker, so the threads overlap. Workers run in the caller's grad and inference
    # modes (both are thread-local).
    parts = [acc] + [torch.zeros_like(acc) for _ in range(workers - 1)]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def work(w: int) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            run_strips(starts, plan[w::workers], parts[w])

    with concurrent.futures.ThreadPoolExecutor(workers - 1) as pool:
        pending = [pool.submit(work, w) for w in range(1, workers)]
        work(0)
        for f in pending:
            f.result()  # (re-raises a worker's exception)
    for part in parts[1:]:
        acc.add_(part)
    return acc[:channels] / acc[channels]


def denoise_nl_means(image: ArrayLike, patch_size: int = 7, patch_distance: int = 11, h: float = 0.1,
                     fast_mode: bool = True, sigma: float = 0.0, channel_axis: Optional[int] = None, *,
                     backend: str = "auto", block: int = 16, cutoff: Optional[float] = 5.0) -> ArrayLike:
    """Non-local means with scikit-image's argument names and meanings.

    Args:
        image: 2-D grey, 2-D colour (with ``channel_axis``) or 3-D grey volume; a floating-point numpy
            array or torch tensor (the result has the same type, dtype and device).
        patch_size: odd patch side (pixels).
        patch_distance: search-window radius (pixels).
        h: cut-off distance in grey levels (larger = smoother).
        fast_mode: as scikit-image: True uses its fast mode's uniform patch distance (box-filtered),
            False the classic Gaussian-weighted one (separable Gaussian filter). Both compute the
            same core-op formula with other patch weights.
        sigma: expected noise standard deviation, subtracted from patch distances (flat-top weights).
        channel_axis: axis of the channels, or None for grey images and volumes.
        backend: ``"auto"``: the shift-major computation (filtered difference images, O(N w^D) in
            fast mode); a core-op backend name (:func:`nlgraph.dispatch.backend_names`): one
            :func:`nlgraph.aggregate` call on the ``LocalWindow`` graph with that backend. Same result.
        block: side of the spatial blocks the nodes are laid out in (a core-op backend only; affects
            speed only).
        cutoff: a distance (after the sigma correction) above which a weight is dropped: 5.0
            (default) is scikit-image's rule (its ``DISTANCE_CUTOFF``: weights below exp(-5) are
            skipped); None keeps every weight (the exact formula). The shift-major path and every
            core-op backend (grid, chunked, triton, pyg, reference) apply it, as the core op's
            ``Gaussian(cutoff=...)``.

    Returns:
        The denoised image, same shape and type.
    """
    if isinstance(image, np.ndarray):
        is_numpy, x = True, torch.from_numpy(np.ascontiguousarray(image))
    elif isinstance(image, torch.Tensor):
        is_numpy, x = False, image
    else:
        raise TypeError(f"image must be a numpy array or a torch tensor, got {type(image).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"image must be floating point (e.g. skimage.img_as_float(image)), got {x.dtype}")
    if channel_axis is not None:
        if (isinstance(channel_axis, bool) or not isinstance(channel_axis, int)
                or not -x.dim() <= channel_axis < x.dim()):
            raise ValueError(f"channel_axis {channel_axis!r} is out of range for an image of shape "
                             f"{tuple(x.shape)}")
        x = torch.movedim(x, channel_axis, 0)
    else:
        x = x[None]
    spatial = tuple(x.shape[1:])
    if len(spatial) not in (2, 3):
        raise ValueError(f"image must be 2-D or 3-D (plus an optional channel axis), got shape "
                         f"{tuple(image.shape)} with channel_axis={channel_axis}")
    if x.numel() == 0:
        raise ValueError(f"image must not be empty, got shape {tuple(image.shape)}")
    if (isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1
            or patch_size % 2 == 0):
        raise ValueError(f"patch_size must be a positive odd int, got {patch_size!r}")
    if patch_size // 2 >= min(spatial):
        raise ValueError(f"patch_size {patch_size} is too large for an image of spatial shape {spatial} "
                         f"(half the patch must be smaller than every side)")
    if isinstance(patch_distance, bool) or not isinstance(patch_distance, int) or patch_distance < 0:
        raise ValueError(f"patch_distance must be an int >= 0, got {patch_distance!r}")
    for name, val, positive in (("h", h, True), ("sigma", sigma, False)):
        if not finite_number(val, positive=positive):
            raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {val!r}")
    if not isinstance(fast_mode, bool):
        raise TypeError(f"fast_mode must be a bool, got {type(fast_mode).__name__}")
    if cutoff is not None and not finite_number(cutoff):
        raise ValueError(f"cutoff must be None or a finite number >= 0, got {cutoff!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if not all_finite(x):
        raise ValueError(f"image contains NaN or Inf (shape {tuple(image.shape)})")

    out_dtype = x.dtype
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(cd)
    if backend == "auto":
        y = _shift_major(x, patch_size, patch_distance, float(h), float(sigma), fast_mode,
                         None if cutoff is None else float(cutoff))
        return _restore(y, out_dtype, channel_axis, is_numpy)
    channels = x.shape[0]
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
    aff = A.Gaussian(1.0, normalize=True, offset=offset, cutoff=cutoff)
    y_ordered = aggregate(f, f, values[order].contiguous(), aff, graph, backend=backend)
    y = torch.empty_like(y_ordered)
    y[order] = y_ordered
    return _restore(y.T.reshape(channels, *spatial), out_dtype, channel_axis, is_numpy)


def _restore(y: torch.Tensor, dtype: torch.dtype, channel_axis: Optional[int], is_numpy: bool) -> ArrayLike:
    """(C, *spatial) result -> the caller's layout, dtype and type."""
    out = y.to(dtype)
    out = torch.movedim(out, 0, channel_axis) if channel_axis is not None else out[0]
    return out.detach().cpu().numpy() if is_numpy else out
