"""Grid graphs: neighbourhood windows (:class:`LocalWindow`) and CCNet's :class:`CrissCross`.

Nodes are the cells of a 1d/2d/3d grid, in row-major order unless an ``order`` permutes them. Each
graph declares ``grid_pattern`` so that the grid backend computes it on the grid itself; the
window's edge predicate is one per-axis test (:meth:`LocalWindow._axis_edge`) from which its tiles
(:meth:`LocalWindow.block`), its per-axis offset slots (:meth:`LocalWindow.axis_slots`) and its
edge list (:meth:`LocalWindow.edges`) all derive.
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .._values import checking_values, no_nan_or_posinf
from .base import Graph, _check_unbatched
from .layout import check_grid_shape, grid_coords

__all__ = ["LocalWindow", "CrissCross", "BORDERS"]


def _grid_edges(coords: Tensor, shape: tuple[int, ...], offsets: Tensor) -> Tensor:
    """Edges (src, dst) from every node to node + offset, for offsets inside the grid."""
    nb = coords.long()[:, None, :] + offsets[None, :, :]  # (N, K, D)
    lim = torch.tensor(shape, device=coords.device)
    ok = ((nb >= 0) & (nb < lim)).all(-1)
    strides = torch.tensor([math.prod(shape[i + 1:]) for i in range(len(shape))], device=coords.device)
    dst = torch.arange(coords.shape[0], device=coords.device)[:, None].expand_as(ok)[ok]
    src = (nb[ok] * strides).sum(-1)
    return torch.stack([src, dst])



class _GridGraph(Graph):
    """A graph on the cells of a grid: ``shape``, an optional node ``order`` and the nodes' coordinates."""

    def __init__(self, shape, order: Optional[Tensor] = None):
        self.shape = check_grid_shape(type(self).__name__, shape)
        self.num_nodes = math.prod(self.shape)
        self._coords: dict[torch.device, Tensor] = {}
        self.order = None
        if order is not None:
            if not isinstance(order, Tensor) or order.dtype != torch.long or order.shape != (self.num_nodes,):
                raise ValueError(f"{type(self).__name__}(order) must be an int64 permutation of shape "
                                 f"({self.num_nodes},), got {getattr(order, 'shape', order)}")
            order = order.detach().to("cpu", copy=True)  # private: the inverse below is derived from it
            if not torch.equal(torch.sort(order).values, torch.arange(self.num_nodes)):
                raise ValueError(f"{type(self).__name__}(order) must be a permutation of "
                                 f"0..{self.num_nodes - 1}")
            self.order = order
            self._inverse = torch.empty_like(self.order)
            self._inverse[self.order] = torch.arange(self.num_nodes)

    def coords(self, device: torch.device) -> Tensor:
        """Grid coordinates of the nodes (int32), in node order."""
        if device not in self._coords:
            c = grid_coords(self.shape, device).to(torch.int32)
            self._coords[device] = c if self.order is None else c[self.order.to(device)]
        return self._coords[device]

    def _to_nodes(self, grid_index: Tensor) -> Tensor:
        return grid_index if self.order is None else self._inverse.to(grid_index.device)[grid_index]

    def _boxes(self, tiles: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
        """Per-tile bounding boxes of the nodes' grid coordinates: (T, D) low and high corners."""
        c = self.coords(device)
        lo = torch.stack([c[a:b].amin(0) for a, b in tiles])
        hi = torch.stack([c[a:b].amax(0) for a, b in tiles])
        return lo, hi

    def validate(self, n, m, device):
        if n != self.num_nodes or m != self.num_nodes:
            raise ValueError(
                f"{type(self).__name__}(shape={self.shape}) has {self.num_nodes} nodes but got N={n} queries "
                f"and M={m} keys"
            )


def _axis_ints(name: str, value, dims: int, lo: int) -> tuple[int, ...]:
    """A LocalWindow option as ``dims`` ints >= ``lo``; TypeError/ValueError naming what was given."""
    items = value if isinstance(value, (tuple, list)) else (value,) * dims
    out = []
    for x in items:
        if isinstance(x, bool) or isinstance(x, float) or not hasattr(x, "__index__"):
            raise TypeError(f"LocalWindow({name}) must be an int or a sequence of {dims} ints, got {value!r}")
        out.append(operator.index(x))
    if len(out) != dims or any(x < lo for x in out):
        raise ValueError(f"LocalWindow({name}) must be an int >= {lo} or {dims} of them, got {value!r}")
    return tuple(out)


def _radius_tuple(radius, dims: int) -> tuple[int, ...]:
    """LocalWindow's radius as ``dims`` ints >= 0; TypeError/ValueError naming what was given."""
    return _axis_ints("radius", radius, dims, 0)


#: LocalWindow's border rules: "clip" drops the keys past the border (the window shrinks), "shift"
#: (NATTEN's) moves the window inside the grid so every query keeps all kernel_size keys per axis.
BORDERS = ("clip", "shift")


class LocalWindow(_GridGraph):
    """Neighbourhood windows on a 1d/2d/3d grid: NATTEN's neighbourhood-attention pattern and more.

    Per axis (all options take one value or one per axis), with k = ``kernel_size`` and dilation
    t, query position a and key position b on that axis are neighbours when b = a (mod t) and, in
    units of t (a' = a // t, b' = b // t, L' = the number of positions = a (mod t)):

    * ``border="clip"`` (default): -(k // 2) <= b' - a' <= k - 1 - k // 2, the window clipped at the
      borders (it shrinks there). An odd k = 2 r + 1 is the (2r+1)^D window of ``radius`` r
      (Chebyshev distance <= r for t = 1).
    * ``border="shift"`` (NATTEN): the window of k keys starts at clamp(a' - k // 2, 0, L' - k), so
      every query keeps all k keys (needs k t <= the axis' extent).
    * ``is_causal`` on the axis (video time): 0 <= a' - b' <= k - 1, the query and the k - 1 keys
      before it (fewer at the start; the border rule does not apply to a causal axis).

    The edge set is the product of the axes' conditions.

    Args:
        shape: grid shape, e.g. (H, W) or (T, H, W); N = M = prod(shape), row-major.
        radius: int or one int per axis (>= 0): the window side 2 r + 1 (``kernel_size=2 r + 1``).
            A radius past the grid's extent is stored as extent - 1, which changes no edge. Give
            ``radius`` or ``kernel_size``, not both.
        order: optional node order, the row-major grid index of each node (e.g.
            :func:`blocked_order`); default row-major.
        kernel_size: k, int >= 1 (odd or even) or one per axis: keys per axis of a full window.
        dilation: t, int >= 1 or one per axis (DiNAT's dilated windows).
        is_causal: bool or one per axis.
        border: ``"clip"`` or ``"shift"`` (see above).
        rpb: relative position bias, a float tensor (..., 2 k_0 - 1, ..., 2 k_{D-1} - 1) (e.g. one
            table per head, (H, 2k-1, 2k-1)): the logit of edge (i, j) gains
            ``rpb[..., b'_0 - a'_0 + k_0 - 1, ...]`` (an additive log-weight, as a float mask; for the
            count normalisations a weight exp(rpb)). -inf removes the edge. Trainable: gradients reach
            it on every backend. The caller's tensor, read (and re-checked) at every call.
    """

    grid_pattern = "window"
    sparsity = "banded"

    def __init__(self, shape: Sequence[int], radius: Union[int, Sequence[int], None] = None,
                 order: Optional[Tensor] = None, *, kernel_size: Union[int, Sequence[int], None] = None,
                 dilation: Union[int, Sequence[int]] = 1, is_causal: Union[bool, Sequence[bool]] = False,
                 border: str = "clip", rpb: Optional[Tensor] = None):
        super().__init__(shape, order)
        dims = len(self.shape)
        if (radius is None) == (kernel_size is None):
            raise ValueError(f"LocalWindow needs radius or kernel_size (one of them), got radius={radius!r}, "
                             f"kernel_size={kernel_size!r}")
        if radius is not None:
            r = _radius_tuple(radius, dims)
            # A radius past the grid's extent reaches no further than extent - 1: clipping changes no
            # edge and keeps the offsets (and 32-bit coordinate arithmetic) within the grid.
            k = tuple(2 * min(x, s - 1) + 1 for x, s in zip(r, self.shape, strict=True))
        else:
            k = _axis_ints("kernel_size", kernel_size, dims, 1)
        self.dilation = _axis_ints("dilation", dilation, dims, 1)
        causal = is_causal if isinstance(is_causal, (tuple, list)) else (is_causal,) * dims
        if len(causal) != dims or not all(isinstance(c, bool) for c in causal):
            raise ValueError(f"LocalWindow(is_causal) must be a bool or {dims} of them, got {is_causal!r}")
        self.is_causal = tuple(causal)
        if border not in BORDERS:
            raise ValueError(f"LocalWindow(border) must be one of {BORDERS}, got {border!r}")
        self.border = border
        if border == "shift":
            axes = zip(k, self.dilation, self.shape, self.is_causal, strict=True)
            for ax, (kk, t, s, c) in enumerate(axes):
                if not c and kk * t > s:
                    raise ValueError(
                        f"LocalWindow(border='shift') needs kernel_size * dilation <= the extent on every "
                        f"non-causal axis; axis {ax} has kernel_size {kk}, dilation {t} and extent {s} "
                        f"(shape {self.shape})")
        self.kernel_size = k
        # reach of the window in units of the dilation, (left, right) per axis, clipped to the grid
        reach = []
        for kk, t, s, c in zip(k, self.dilation, self.shape, self.is_causal, strict=True):
            left, right = (kk - 1, 0) if c else (kk // 2, kk - 1 - kk // 2)
            cap = (s - 1) // t
            reach.append((min(left, cap), min(right, cap)))
        self.reach = tuple(reach)
        #: per axis, the largest ``|offset|`` of an edge in grid steps (the radius of a plain window)
        self.radius = tuple(max(lr) * t if self.border == "clip" or c else (kk - 1) * t
                            for lr, t, kk, c in zip(self.reach, self.dilation, k, self.is_causal,
                                                    strict=True))
        if rpb is not None:
            if not isinstance(rpb, Tensor) or not rpb.is_floating_point():
                raise TypeError(f"LocalWindow(rpb) must be a floating-point tensor, got {type(rpb).__name__}"
                                if not isinstance(rpb, Tensor) else
                                f"LocalWindow(rpb) must be a floating-point tensor, got dtype {rpb.dtype}")
            want = tuple(2 * kk - 1 for kk in k)
            if rpb.dim() < dims or tuple(rpb.shape[rpb.dim() - dims:]) != want:
                raise ValueError(f"LocalWindow(rpb) must have shape (..., {', '.join(map(str, want))}) "
                                 f"(2 kernel_size - 1 per axis), got {tuple(rpb.shape)}")
        self.rpb = rpb  # the caller's tensor: read (and re-checked) at every call
        if rpb is not None and checking_values():
            self._check_rpb()
        self._radius_t: dict[torch.device, Tensor] = {}

    @property
    def plain(self) -> bool:
        """True for today's symmetric window: odd kernel, no dilation, not causal, clipped, no bias."""
        return (all(t == 1 for t in self.dilation) and not any(self.is_causal) and self.rpb is None
                and all(kk % 2 == 1 for kk in self.kernel_size) and self.border == "clip")

    @property
    def window_size(self) -> tuple[int, ...]:
        """Offsets per axis a query can have (its keys, away from the borders or with ``"shift"``)."""
        return tuple(kk if self.border == "shift" and not c else left + right + 1
                     for kk, c, (left, right) in zip(self.kernel_size, self.is_causal, self.reach,
                                                     strict=True))

    def _check_rpb(self) -> None:
        rpb = self.rpb
        if rpb is not None and not no_nan_or_posinf(rpb):
            raise ValueError(f"LocalWindow(rpb) entries must be finite or -inf (no NaN, no +inf); the table "
                             f"of shape {tuple(rpb.shape)} has one")

    def validate(self, n, m, device):
        super().validate(n, m, device)
        if self.rpb is not None and self.rpb.device != device:
            raise ValueError(f"LocalWindow(rpb) is on {self.rpb.device} but the inputs are on {device}")

    def check_values(self, n, m):
        if self.rpb is not None:
            self._check_rpb()

    def tensors(self):
        return () if self.rpb is None else (self.rpb,)

    @property
    def lead_shape(self):
        return () if self.rpb is None else tuple(self.rpb.shape[:self.rpb.dim() - len(self.shape)])

    def edge_bound(self, n, m):
        return n * math.prod(self.window_size)

    def tile_pairs(self, row_tiles, col_tiles, device):
        (qlo, qhi), (klo, khi) = self._boxes(row_tiles, device), self._boxes(col_tiles, device)
        # per-axis gap between the two bounding boxes; a pair can hold an edge when every gap <= the reach
        gap = torch.maximum(klo[None] - qhi[:, None], qlo[:, None] - khi[None])
        return (gap <= self._radius_t_on(device)).all(-1)

    def _radius_t_on(self, device: torch.device) -> Tensor:
        if device not in self._radius_t:
            self._radius_t[device] = torch.tensor(self.radius, device=device, dtype=torch.int32)
        return self._radius_t[device]

    def _axis_sub(self, axis: int, ci: Tensor, cj: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(a', b', same dilation group or None) of one axis for query coords ci and key coords cj."""
        t = self.dilation[axis]
        if t == 1:
            return ci, cj, None
        return ci // t, cj // t, (ci % t) == (cj % t)

    def _axis_start(self, axis: int, a: Tensor, ci: Tensor) -> Tensor:
        """The shifted window's first key a'-units position (NATTEN) for queries at a' (coordinate ci)."""
        k, t, s = self.kernel_size[axis], self.dilation[axis], self.shape[axis]
        length = (s - ci % t + t - 1) // t if t > 1 else torch.full_like(ci, s)  # L' of the query's group
        return torch.minimum((a - k // 2).clamp_min(0), length - k)

    def _shifted(self, axis: int) -> bool:
        """True when the axis' window is NATTEN's shifted one (``border="shift"`` on a non-causal axis)."""
        return self.border == "shift" and not self.is_causal[axis]

    def _axis_edge(self, axis: int, ci: Tensor, cj: Tensor) -> Tensor:
        """The window's predicate on one axis, the one place it is spelled: whether key coordinate cj
        is in the window of query coordinate ci (int tensors that broadcast). The edge set is the
        product of the axes' predicates; tiles, offset slots and the edge list derive from it."""
        a, b, same = self._axis_sub(axis, ci, cj)
        if self._shifted(axis):
            start = self._axis_start(axis, a, ci)
            ok = (b >= start) & (b < start + self.kernel_size[axis])
        else:
            left, right = self.reach[axis]
            diff = b - a
            ok = (diff >= -left) & (diff <= right)
        return ok if same is None else ok & same

    def block(self, i0, i1, j0, j1, device):
        c = self.coords(device)
        ci, cj = c[i0:i1], c[j0:j1]
        out = None
        for axis in range(c.shape[1]):  # per axis, on (tn, tm) int32 tiles
            ok = self._axis_edge(axis, ci[:, None, axis], cj[None, :, axis])
            out = ok if out is None else out.logical_and_(ok)
        return out

    def rpb_index(self, ci: Tensor, cj: Tensor) -> Tensor:
        """Flat index into the trailing dims of ``rpb`` for query coords ci (..., D) and key coords cj
        (..., D) (clamped into the table where (i, j) is no edge)."""
        flat: Optional[Tensor] = None
        for axis in range(ci.shape[-1]):
            k = self.kernel_size[axis]
            a, b, _ = self._axis_sub(axis, ci[..., axis], cj[..., axis])
            rel = (b - a + k - 1).clamp(0, 2 * k - 2).long()
            flat = rel if flat is None else flat * (2 * k - 1) + rel
        assert flat is not None  # a grid has at least one axis
        return flat

    def dense_bias(self):
        """The relative position bias as a dense (..., N, M) log-weight (zeros off the window; the block
        removes those): for the tiled and materialising backends. The grid backend reads ``rpb`` itself."""
        if self.rpb is None:
            return None
        c = self.coords(self.rpb.device)
        idx = self.rpb_index(c[:, None, :], c[None, :, :])
        dims = len(self.shape)
        table = self.rpb.reshape(*self.rpb.shape[:self.rpb.dim() - dims], -1)
        return table[..., idx]

    def edges(self, n, m, device):
        _check_unbatched(self)
        # per axis: the key coordinate of each (offset slot, query coordinate) and whether it exists
        keys, valid = [], []
        for axis in range(len(self.shape)):
            kb, ok = self.axis_slots(axis, device)
            keys.append(kb)
            valid.append(ok)
        d = len(self.shape)
        key_grid, ok_grid = None, None
        for axis in range(d):  # broadcast to (slots_0, ..., slots_{D-1}, s_0, ..., s_{D-1})
            view = [1] * (2 * d)
            view[axis], view[d + axis] = keys[axis].shape
            kb, ok = keys[axis].reshape(view), valid[axis].reshape(view)
            key_grid = kb if key_grid is None else key_grid * self.shape[axis] + kb
            ok_grid = ok if ok_grid is None else ok_grid & ok
        key_grid, ok_grid = torch.broadcast_tensors(key_grid, ok_grid)
        dst = torch.arange(self.num_nodes, device=device).reshape(self.shape).expand_as(key_grid)[ok_grid]
        src = key_grid[ok_grid]
        logw = None
        if self.rpb is not None:
            c = grid_coords(self.shape, device)
            logw = self.rpb.reshape(-1)[self.rpb_index(c[dst], c[src])]
        if self.order is not None:  # grid indices -> node indices
            src, dst = self._to_nodes(src), self._to_nodes(dst)
        return torch.stack([src, dst]), logw

    def slot_reach(self, axis: int) -> tuple[int, int]:
        """(left, right): the offsets, in dilation steps, that can hold a key on one axis: the reach,
        or for a shifted window every offset up to k - 1 either way (its k keys lie within that span),
        capped at the grid."""
        if not self._shifted(axis):
            return self.reach[axis]
        cap = (self.shape[axis] - 1) // self.dilation[axis]
        k = self.kernel_size[axis]
        return min(k - 1, cap), min(k - 1, cap)

    def axis_slots(self, axis: int, device: torch.device, offsets: bool = False) -> tuple[Tensor, Tensor]:
        """The window along one axis as slots: (key coordinate, exists), each (slots, extent).

        Row u, column a: the key coordinate of the u-th window slot of a query at coordinate a (clamped
        into the grid where the slot has no key) and whether that key exists. With ``"clip"`` (and on a
        causal axis) slot u is the offset (u - left) * dilation, with ``"shift"`` the u-th key of the
        shifted window; with ``offsets=True`` a shifted axis too has one slot per offset of
        :meth:`slot_reach`, each existing for the queries whose shifted window holds that offset (the
        grid backend iterates over the product of the axes' offset slots).
        """
        s, t = self.shape[axis], self.dilation[axis]
        a = torch.arange(s, device=device)
        k = self.kernel_size[axis]
        left, right = self.slot_reach(axis)
        key = a[None, :] + torch.arange(-left, right + 1, device=device)[:, None] * t
        inside = (key >= 0) & (key < s)
        key = key.clamp(0, s - 1)
        ok = inside & self._axis_edge(axis, a[None, :], key)
        if offsets or not self._shifted(axis):
            return key, ok
        # a shifted window holds exactly k keys per query: the u-th is the u-th candidate in the window
        # (a stable sort brings them first, in order; static shapes, so it traces)
        first = torch.sort((~ok).to(torch.int32), dim=0, stable=True).indices[:k]
        key = key.gather(0, first)
        return key, torch.ones_like(key, dtype=torch.bool)

    def __repr__(self) -> str:
        if self.plain:
            return f"LocalWindow(shape={self.shape}, radius={self.radius})"
        extra = "" if self.rpb is None else f", rpb={tuple(self.rpb.shape)}"
        return (f"LocalWindow(shape={self.shape}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"is_causal={self.is_causal}, border={self.border!r}{extra})")


class CrissCross(_GridGraph):
    """CCNet's criss-cross graph on an (H, W) grid: keys in the query's row or column (self once)."""

    grid_pattern = "criss_cross"
    sparsity = "fan_in"

    def __init__(self, shape: Sequence[int]):
        super().__init__(shape)
        if len(self.shape) != 2:
            raise ValueError(f"CrissCross(shape) must be (H, W), got {self.shape}")

    def edge_bound(self, n, m):
        return n * (sum(self.shape) - 1)

    def tile_pairs(self, row_tiles, col_tiles, device):
        (qlo, qhi), (klo, khi) = self._boxes(row_tiles, device), self._boxes(col_tiles, device)
        # a shared row or column is possible
        overlap = (klo[None] <= qhi[:, None]) & (qlo[:, None] <= khi[None])
        return overlap.any(-1)

    def block(self, i0, i1, j0, j1, device):
        c = self.coords(device)
        ci, cj = c[i0:i1, None, :], c[None, j0:j1, :]
        return (ci == cj).any(-1)

    def edges(self, n, m, device):
        h, w = self.shape
        row = torch.stack([torch.zeros(2 * w - 1, dtype=torch.long, device=device),
                           torch.arange(-(w - 1), w, device=device)], -1)
        col = torch.stack([torch.arange(-(h - 1), h, device=device),
                           torch.zeros(2 * h - 1, dtype=torch.long, device=device)], -1)
        col = col[col[:, 0] != 0]  # self once (in the row part)
        ei = _grid_edges(self.coords(device), self.shape, torch.cat([row, col]))
        return torch.stack([self._to_nodes(ei[0]), ei[1]]), None

    def __repr__(self) -> str:
        return f"CrissCross(shape={self.shape})"
