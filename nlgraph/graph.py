"""Graph descriptions: which keys j each query i aggregates over (N(i) in the core formula).

A graph never materialises N x M on its own: backends ask it for one tile at a time with
:meth:`Graph.block`, which answers with

* ``None``  - every (i, j) in the tile is an edge,
* a bool tensor (..., tn, tm) - True where (i, j) is an edge,
* a float tensor (..., tn, tm) - a non-negative multiplicity/weight per edge, 0 where there is none.

plus, for graphs that carry trainable additive logits (an SDPA-style float mask), one dense
differentiable tensor from :meth:`Graph.dense_bias`. Graphs compose with ``&`` (edge sets
intersect, biases add).

Node order for grid graphs is row-major (C order) over ``shape``, i.e. the order of
``x.flatten(2)`` for an image ``x`` of shape (B, C, H, W).

Which tensors a graph keeps: index tensors that fix the graph's structure (``EdgeIndex``'s
``edge_index``, ``KNN``'s ``index``, a grid ``order``) are copied when the graph is built, together
with everything derived from them (sort order, bounds, inverse permutation): a later in-place edit of
the caller's tensor does not reach the graph. Value tensors (a ``Mask``'s bool or float mask, edge
weights) stay the caller's own: every aggregation reads their current values, so gradients reach
the caller's tensor and an optimiser's in-place update is seen, and :meth:`Graph.check_values`
checks those values again at every call.
"""

from __future__ import annotations

import copy
import math
import operator
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ._values import all_finite, checking_values, finite_nonnegative, no_nan_or_posinf

__all__ = [
    "Graph",
    "Complete",
    "Mask",
    "ExcludeSelf",
    "Causal",
    "LocalWindow",
    "CrissCross",
    "KNN",
    "EdgeIndex",
    "Intersection",
    "blocked_order",
]

Block = Optional[Tensor]


def _slice_rows_cols(t: Tensor, i0: int, i1: int, j0: int, j1: int) -> Tensor:
    """Slice the last two dims of a tensor that may broadcast (size 1) along them."""
    rows = slice(0, 1) if t.shape[-2] == 1 else slice(i0, i1)
    cols = slice(0, 1) if t.shape[-1] == 1 else slice(j0, j1)
    return t[..., rows, cols]


def combine_blocks(a: Block, b: Block) -> Block:
    """Intersect two blocks (None = all edges, bool = mask, float = multiplicative weights)."""
    if a is None:
        return b
    if b is None:
        return a
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    if a.dtype == torch.bool:
        a, b = b, a
    # a is float weights here
    if b.dtype == torch.bool:
        return a * b.to(a.dtype)
    return a * b


class Graph:
    """Base class of graph descriptions.

    Subclasses implement :meth:`validate` and :meth:`block`; graphs with trainable logits also
    :meth:`dense_bias`.
    """

    #: True when the graph is the complete graph (no block ever restricts anything).
    is_complete: bool = False

    def validate(self, n: int, m: int, device: torch.device) -> None:
        """Raise ValueError if the graph cannot describe N=n queries and M=m keys on ``device``.

        Shape, size and device checks only: nothing here reads tensor values (see :meth:`check_values`).
        """

    def check_values(self, n: int, m: int) -> None:
        """Raise ValueError if the current values of the graph's tensors are invalid for N=n, M=m.

        Data-dependent (synchronises with the device): the core op runs it once per call in eager
        mode and skips it under ``torch.compile``.
        """

    def tensors(self) -> tuple[Tensor, ...]:
        """The caller's floating-point tensors the graph reads (float masks, edge weights)."""
        return ()

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """Leading (batch) dims of the graph's blocks; () when shared by the whole batch."""
        return ()

    def block(self, i0: int, i1: int, j0: int, j1: int, device: torch.device) -> Block:  # pragma: no cover
        raise NotImplementedError

    def tile_pairs(self, row_tiles: list[tuple[int, int]], col_tiles: list[tuple[int, int]],
                   device: torch.device) -> Optional[Tensor]:
        """Which (query tile, key tile) pairs may hold edges, as a (len(row_tiles), len(col_tiles)) bool
        tensor, computed once per call by a tiled backend (None: no cheap answer, build every tile)."""
        return None

    def dense_bias(self) -> Optional[Tensor]:
        """A dense additive log-weight (..., N|1, M|1) with gradients, or None."""
        return None

    @property
    def block_requires_grad(self) -> bool:
        """True when :meth:`block` returns tensors that should receive gradients."""
        return False

    def edges(self, n: int, m: int, device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
        """The edge list: ``(edge_index (2, E), log_weight (E,) or None)``, PyG's convention.

        ``edge_index[0]`` is the source (key j), ``edge_index[1]`` the target (query i). A log-weight
        carries float-mask logits and edge weights (log of the multiplicity/weight); it may carry
        gradients. Only for graphs without batch dims (``lead_shape == ()``). The default
        enumerates the graph's dense tile: subclasses with a cheaper enumeration override it.
        """
        _check_unbatched(self)
        blk = self.block(0, n, 0, m, device)
        bias = self.dense_bias()
        if blk is None:
            keep = torch.ones(n, m, dtype=torch.bool, device=device)
        else:
            blk = _unbatched(blk, n, m)  # a (1, M), (N, 1) or (1, 1) block broadcasts over the graph
            keep = blk if blk.dtype == torch.bool else blk > 0
        logw = None
        if blk is not None and blk.dtype != torch.bool:
            logw = safe_log(blk)
        if bias is not None:
            b = _unbatched(bias, n, m)
            keep = keep & (b.detach() > -math.inf)
            logw = b if logw is None else logw + b
        dst, src = keep.nonzero(as_tuple=True)
        return torch.stack([src, dst]), None if logw is None else logw[dst, src]

    def dense(self, n: int, m: int, device: Union[str, torch.device] = "cpu") -> Tensor:
        """The edge set as a dense bool (..., n, m) tensor (small graphs, tests and conversions)."""
        device = torch.device(device)
        self.validate(n, m, device)
        b = self.block(0, n, 0, m, device)
        if b is None:
            out = torch.ones(n, m, dtype=torch.bool, device=device)
        else:
            out = b if b.dtype == torch.bool else b > 0
        bias = self.dense_bias()
        if bias is not None:  # a float mask's -inf removes the edge
            out = out & (bias.detach() > -math.inf)
        return out

    def __and__(self, other: "Graph") -> "Graph":
        if not isinstance(other, Graph):
            return NotImplemented
        return Intersection([self, other])


def _check_unbatched(graph: "Graph") -> None:
    if math.prod(graph.lead_shape) != 1:
        raise ValueError(f"{graph!r} has batch dims {graph.lead_shape}; an edge list describes one graph shared "
                         f"by the batch")


def _unbatched(t: Tensor, n: int, m: int) -> Tensor:
    """A block or bias of a graph shared by the batch (batch dims all 1) as an (n, m) view."""
    return t.reshape(t.shape[-2:]).expand(n, m)


def safe_log(w: Tensor) -> Tensor:
    """log(w) with log(0) = -inf and a zero (not NaN) gradient at w = 0 (edge weights -> log-weights)."""
    pos = w > 0
    return torch.where(pos, torch.log(torch.where(pos, w, torch.ones_like(w))), torch.full_like(w, -math.inf))


def _grid_edges(coords: Tensor, shape: tuple[int, ...], offsets: Tensor) -> Tensor:
    """Edges (src, dst) from every node to node + offset, for offsets inside the grid."""
    nb = coords.long()[:, None, :] + offsets[None, :, :]  # (N, K, D)
    lim = torch.tensor(shape, device=coords.device)
    ok = ((nb >= 0) & (nb < lim)).all(-1)
    strides = torch.tensor([math.prod(shape[i + 1:]) for i in range(len(shape))], device=coords.device)
    dst = torch.arange(coords.shape[0], device=coords.device)[:, None].expand_as(ok)[ok]
    src = (nb[ok] * strides).sum(-1)
    return torch.stack([src, dst])


class Complete(Graph):
    """Every query sees every key (the non-local block and plain attention)."""

    is_complete = True

    def block(self, i0, i1, j0, j1, device):
        return None

    def __repr__(self) -> str:
        return "Complete()"


class Mask(Graph):
    """A dense mask with the semantics of SDPA's ``attn_mask``.

    Args:
        mask: bool (..., N, M) (broadcastable; True = edge, as in
            :func:`torch.nn.functional.scaled_dot_product_attention`) or float (..., N, M): an
            additive log-weight on the scores (-inf removes the edge), which receives gradients.
            For the count-normalised affinities a float mask b weights edges by exp(b). The
            caller's tensor: every call reads (and checks) its current values.
    """

    def __init__(self, mask: Tensor):
        if not isinstance(mask, Tensor):
            raise TypeError(f"Mask(mask) must be a tensor, got {type(mask).__name__}")
        if mask.dim() < 2:
            raise ValueError(f"Mask(mask) must have at least 2 dims (..., N, M), got shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"Mask(mask) must be bool or floating point, got {mask.dtype}")
        self.mask = mask  # the caller's tensor: read (and re-checked) at every call
        if checking_values():
            self._check_entries()

    def _check_entries(self) -> None:
        if self.mask.is_floating_point() and not no_nan_or_posinf(self.mask):
            raise ValueError(f"Mask(mask) float entries must be finite or -inf (no NaN, no +inf); the mask "
                             f"of shape {tuple(self.mask.shape)} has one")

    def check_values(self, n, m):
        self._check_entries()

    def tensors(self):
        return (self.mask,) if self.mask.is_floating_point() else ()

    def validate(self, n, m, device):
        rows, cols = self.mask.shape[-2:]
        if rows not in (1, n) or cols not in (1, m):
            raise ValueError(
                f"Mask(mask) has shape {tuple(self.mask.shape)}; its last two dims must be (N, M) = ({n}, {m}) "
                f"or broadcast to them"
            )
        if self.mask.device != device:
            raise ValueError(f"Mask(mask) is on {self.mask.device} but the inputs are on {device}")

    @property
    def lead_shape(self):
        return tuple(self.mask.shape[:-2])

    def block(self, i0, i1, j0, j1, device):
        if self.mask.dtype != torch.bool:
            return None  # float masks live in dense_bias()
        return _slice_rows_cols(self.mask, i0, i1, j0, j1)

    def dense_bias(self):
        return self.mask if self.mask.is_floating_point() else None

    def __repr__(self) -> str:
        return f"Mask({self.mask.dtype}, shape={tuple(self.mask.shape)})"


class ExcludeSelf(Graph):
    """Every key except the query itself (j != i): the dense-CRF message. Needs N == M."""

    def validate(self, n, m, device):
        if n != m:
            raise ValueError(f"ExcludeSelf needs as many queries as keys, got N={n}, M={m}")

    def block(self, i0, i1, j0, j1, device):
        if i1 <= j0 or j1 <= i0:
            return None  # the tile does not touch the diagonal
        i = torch.arange(i0, i1, device=device)
        j = torch.arange(j0, j1, device=device)
        return i[:, None] != j[None, :]

    def __repr__(self) -> str:
        return "ExcludeSelf()"


class Causal(Graph):
    """Query i sees keys j <= i: the causal mask of SDPA's ``is_causal=True``, top-left aligned.

    For N queries and M keys the edge set is ``torch.ones(N, M, dtype=torch.bool).tril()`` (as
    :func:`torch.nn.functional.scaled_dot_product_attention` builds it, also when N != M), so every
    query keeps key 0. Tiles above the diagonal hold no edge and tiled backends skip them.
    """

    def block(self, i0, i1, j0, j1, device):
        if j1 - 1 <= i0:
            return None  # every key of the tile is at or before every query of it
        i = torch.arange(i0, i1, device=device)
        j = torch.arange(j0, j1, device=device)
        return i[:, None] >= j[None, :]

    def tile_pairs(self, row_tiles, col_tiles, device):
        last = torch.tensor([b - 1 for _, b in row_tiles], device=device)
        first = torch.tensor([a for a, _ in col_tiles], device=device)
        return first[None, :] <= last[:, None]

    def __repr__(self) -> str:
        return "Causal()"


def _grid_coords(shape: tuple[int, ...], device: torch.device) -> Tensor:
    axes = [torch.arange(s, device=device) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


def _check_grid_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(shape)
    if not 1 <= len(shape) <= 3 or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"{name}(shape) must be 1 to 3 positive ints, got {shape}")
    return shape


def blocked_order(shape: Sequence[int], block: int) -> Tensor:
    """A node order that lays a grid out in blocks of ``block`` per axis (row-major within and across).

    Tiles of a tiled backend then cover compact regions, so a local-window graph leaves most tiles
    empty (skipped) instead of spanning whole image rows. Returns the row-major grid index of each node.
    """
    shape = _check_grid_shape("blocked_order", shape)
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"blocked_order(block) must be a positive int, got {block!r}")
    coords = _grid_coords(shape, torch.device("cpu"))
    key = torch.zeros(coords.shape[0], dtype=torch.long)
    nblocks = [math.ceil(s / block) for s in shape]
    for c, nb in zip(coords.unbind(-1), nblocks):  # block index, row-major over blocks
        key = key * nb + c // block
    for c in coords.unbind(-1):  # then position within the block
        key = key * block + c % block
    return torch.argsort(key)


class _GridGraph(Graph):
    def __init__(self, shape, order: Optional[Tensor] = None):
        self.shape = _check_grid_shape(type(self).__name__, shape)
        self.num_nodes = math.prod(self.shape)
        self._coords: dict[torch.device, Tensor] = {}
        self.order = None
        if order is not None:
            if not isinstance(order, Tensor) or order.dtype != torch.long or order.shape != (self.num_nodes,):
                raise ValueError(f"{type(self).__name__}(order) must be an int64 permutation of shape "
                                 f"({self.num_nodes},), got {getattr(order, 'shape', order)}")
            order = order.detach().to("cpu", copy=True)  # private: the inverse below is derived from it
            if not torch.equal(torch.sort(order).values, torch.arange(self.num_nodes)):
                raise ValueError(f"{type(self).__name__}(order) must be a permutation of 0..{self.num_nodes - 1}")
            self.order = order
            self._inverse = torch.empty_like(self.order)
            self._inverse[self.order] = torch.arange(self.num_nodes)

    def coords(self, device: torch.device) -> Tensor:
        """Grid coordinates of the nodes (int32), in node order."""
        if device not in self._coords:
            c = _grid_coords(self.shape, device).to(torch.int32)
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


def _axis_ints(name: str, value, dims: int, lo: int, allow_none: bool = False) -> Optional[tuple[int, ...]]:
    """A LocalWindow option as ``dims`` ints >= ``lo``; TypeError/ValueError naming what was given."""
    if value is None and allow_none:
        return None
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
            k = tuple(2 * min(x, s - 1) + 1 for x, s in zip(r, self.shape))
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
            for ax, (kk, t, s, c) in enumerate(zip(k, self.dilation, self.shape, self.is_causal)):
                if not c and kk * t > s:
                    raise ValueError(
                        f"LocalWindow(border='shift') needs kernel_size * dilation <= the extent on every "
                        f"non-causal axis; axis {ax} has kernel_size {kk}, dilation {t} and extent {s} "
                        f"(shape {self.shape})")
        self.kernel_size = k
        # reach of the window in units of the dilation, (left, right) per axis, clipped to the grid
        reach = []
        for kk, t, s, c in zip(k, self.dilation, self.shape, self.is_causal):
            left, right = (kk - 1, 0) if c else (kk // 2, kk - 1 - kk // 2)
            cap = (s - 1) // t
            reach.append((min(left, cap), min(right, cap)))
        self.reach = tuple(reach)
        #: per axis, the largest |offset| of an edge in grid steps (the radius of a plain window)
        self.radius = tuple(max(lr) * t if self.border == "clip" or c else (kk - 1) * t
                            for lr, t, kk, c in zip(self.reach, self.dilation, k, self.is_causal))
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
                     for kk, c, (left, right) in zip(self.kernel_size, self.is_causal, self.reach))

    def _check_rpb(self) -> None:
        if not no_nan_or_posinf(self.rpb):
            raise ValueError(f"LocalWindow(rpb) entries must be finite or -inf (no NaN, no +inf); the table "
                             f"of shape {tuple(self.rpb.shape)} has one")

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

    def block(self, i0, i1, j0, j1, device):
        c = self.coords(device)
        ci, cj = c[i0:i1], c[j0:j1]
        out = None
        for axis in range(c.shape[1]):  # per axis, on (tn, tm) int32 tiles
            qi, kj = ci[:, None, axis], cj[None, :, axis]
            a, b, same = self._axis_sub(axis, qi, kj)
            left, right = self.reach[axis]
            if self.border == "shift" and not self.is_causal[axis]:
                start = self._axis_start(axis, a, qi)
                ok = (b >= start) & (b < start + self.kernel_size[axis])
            else:
                diff = b - a
                ok = (diff >= -left) & (diff <= right)
            if same is not None:
                ok = ok & same
            out = ok if out is None else out.logical_and_(ok)
        return out

    def rpb_index(self, ci: Tensor, cj: Tensor) -> Tensor:
        """Flat index into the trailing dims of ``rpb`` for query coords ci (..., D) and key coords cj
        (..., D) (clamped into the table where (i, j) is no edge)."""
        flat = None
        for axis in range(ci.shape[-1]):
            k = self.kernel_size[axis]
            a, b, _ = self._axis_sub(axis, ci[..., axis], cj[..., axis])
            rel = (b - a + k - 1).clamp(0, 2 * k - 2).long()
            flat = rel if flat is None else flat * (2 * k - 1) + rel
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
            c = _grid_coords(self.shape, device)
            logw = self.rpb.reshape(-1)[self.rpb_index(c[dst], c[src])]
        if self.order is not None:  # grid indices -> node indices
            src, dst = self._to_nodes(src), self._to_nodes(dst)
        return torch.stack([src, dst]), logw

    def axis_slots(self, axis: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The window along one axis as offset slots: (key coordinate, exists), each (slots, extent).

        Row u, column a: the key coordinate of the u-th window slot of a query at coordinate a (clamped
        into the grid where the slot has no key) and whether that key exists. With ``"clip"`` (and on a
        causal axis) slot u is the offset (u - left) * dilation, with ``"shift"`` the u-th key of the
        shifted window. The grid backend iterates over the product of the axes' slots.
        """
        s, t = self.shape[axis], self.dilation[axis]
        a = torch.arange(s, device=device)
        left, right = self.reach[axis]
        if self.border == "shift" and not self.is_causal[axis]:
            k = self.kernel_size[axis]
            start = self._axis_start(axis, a // t, a)
            key = (a % t) + t * (start[None, :] + torch.arange(k, device=device)[:, None])
            return key, torch.ones_like(key, dtype=torch.bool)
        off = torch.arange(-left, right + 1, device=device)[:, None] * t
        key = a[None, :] + off
        ok = (key >= 0) & (key < s)
        return key.clamp(0, s - 1), ok

    def __repr__(self) -> str:
        if self.plain:
            return f"LocalWindow(shape={self.shape}, radius={self.radius})"
        extra = "" if self.rpb is None else f", rpb={tuple(self.rpb.shape)}"
        return (f"LocalWindow(shape={self.shape}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"is_causal={self.is_causal}, border={self.border!r}{extra})")


class CrissCross(_GridGraph):
    """CCNet's criss-cross graph on an (H, W) grid: keys in the query's row or column (self once)."""

    def __init__(self, shape: Sequence[int]):
        super().__init__(shape)
        if len(self.shape) != 2:
            raise ValueError(f"CrissCross(shape) must be (H, W), got {self.shape}")

    def tile_pairs(self, row_tiles, col_tiles, device):
        (qlo, qhi), (klo, khi) = self._boxes(row_tiles, device), self._boxes(col_tiles, device)
        overlap = (klo[None] <= qhi[:, None]) & (qlo[:, None] <= khi[None])  # a shared row or column is possible
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


class KNN(Graph):
    """A fixed fan-in graph: query i aggregates over the keys ``index[..., i, :]``.

    Args:
        index: int64 (..., N, k) key indices; -1 marks padding (fewer than k neighbours).
            Repeated indices count once. Copied: later edits of the caller's tensor do not reach the graph.
        num_keys: M, if known (checked against the inputs).

    Use :meth:`KNN.from_points` to build the k nearest neighbours of point sets.
    """

    def __init__(self, index: Tensor, num_keys: Optional[int] = None):
        if not isinstance(index, Tensor) or index.dtype not in (torch.int64, torch.int32):
            raise TypeError("KNN(index) must be an int64/int32 tensor of shape (..., N, k)")
        if index.dim() < 2:
            raise ValueError(f"KNN(index) must have shape (..., N, k), got {tuple(index.shape)}")
        if num_keys is not None and (isinstance(num_keys, bool) or not isinstance(num_keys, int)
                                     or num_keys < 0):
            raise ValueError(f"KNN(num_keys) must be None or an int >= 0, got {num_keys!r}")
        self.index = index.detach().to(torch.long, copy=True)  # private: its bounds are checked once
        self.num_keys = num_keys
        self._max: Optional[int] = None
        if checking_values():
            self._bounds()

    def _bounds(self) -> int:
        """The largest key index (checks the entries once; the index is a private copy)."""
        if self._max is None:
            if self.index.numel() == 0:
                self._max = -1
            else:
                lo, hi = int(self.index.min()), int(self.index.max())
                if lo < -1:
                    raise ValueError(f"KNN(index) entries must be >= -1 (-1 = padding), found {lo}")
                self._max = hi
        return self._max

    @classmethod
    def from_points(cls, query_points: Tensor, key_points: Optional[Tensor] = None, k: int = 8,
                    exclude_self: bool = False, chunk: int = 1024) -> "KNN":
        """k nearest keys (Euclidean) of each query point, computed in chunks (never N x M).

        Args:
            query_points: (..., N, p) coordinates of the queries.
            key_points: (..., M, p) coordinates of the keys; defaults to ``query_points``.
            k: neighbours per query (clipped to M, or M - 1 with ``exclude_self``).
            exclude_self: drop j == i (only when keys are the queries).
            chunk: queries per distance tile.
        """
        if not isinstance(query_points, Tensor) or not query_points.is_floating_point():
            raise TypeError("KNN.from_points(query_points) must be a floating-point tensor (..., N, p)")
        same = key_points is None
        key_points = query_points if same else key_points
        if not isinstance(key_points, Tensor) or not key_points.is_floating_point():
            raise TypeError("KNN.from_points(key_points) must be a floating-point tensor (..., M, p)")
        if query_points.dim() < 2 or key_points.dim() < 2 or query_points.shape[-1] != key_points.shape[-1]:
            raise ValueError(
                f"KNN.from_points: points must be (..., N, p) and (..., M, p), got {tuple(query_points.shape)} "
                f"and {tuple(key_points.shape)}"
            )
        if exclude_self and not same:
            raise ValueError("KNN.from_points(exclude_self=True) needs key_points=None (keys are the queries)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"KNN.from_points(k) must be a positive int, got {k!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"KNN.from_points(chunk) must be a positive int, got {chunk!r}")
        if query_points.device != key_points.device:
            raise ValueError(f"KNN.from_points: query_points are on {query_points.device} but key_points "
                             f"on {key_points.device}")
        try:
            torch.broadcast_shapes(query_points.shape[:-2], key_points.shape[:-2])
        except RuntimeError:
            raise ValueError(f"KNN.from_points: leading dims of query_points {tuple(query_points.shape)} "
                             f"and key_points {tuple(key_points.shape)} do not broadcast") from None
        for name, pts in (("query_points", query_points), ("key_points", key_points)):
            if not all_finite(pts):
                raise ValueError(f"KNN.from_points({name}) contains NaN or Inf (shape "
                                 f"{tuple(pts.shape)}); nearest neighbours are undefined there")
        n, m = query_points.shape[-2], key_points.shape[-2]
        k_eff = min(k, m - 1 if exclude_self else m)
        if k_eff < 1:
            raise ValueError(f"KNN.from_points: no neighbour possible with M={m} and exclude_self={exclude_self}")
        qp, kp = query_points.detach(), key_points.detach()
        out = []
        for i0 in range(0, n, chunk):
            i1 = min(n, i0 + chunk)
            d2 = torch.cdist(qp[..., i0:i1, :], kp).pow(2)
            if exclude_self:
                idx = torch.arange(i0, i1, device=d2.device)
                d2[..., idx - i0, idx] = math.inf
            out.append(d2.topk(k_eff, dim=-1, largest=False).indices)
        return cls(torch.cat(out, dim=-2), num_keys=m)

    def validate(self, n, m, device):
        if self.index.shape[-2] != n:
            raise ValueError(f"KNN(index) has shape {tuple(self.index.shape)} but there are N={n} queries")
        if self.num_keys is not None and self.num_keys != m:
            raise ValueError(f"KNN(num_keys) is {self.num_keys} but there are M={m} keys")
        if self.index.device != device:
            raise ValueError(f"KNN(index) is on {self.index.device} but the inputs are on {device}")

    def check_values(self, n, m):
        if self._bounds() >= m:
            raise ValueError(f"KNN(index) refers to key {self._max} (num_keys={self.num_keys}) but there "
                             f"are M={m} keys")

    @property
    def lead_shape(self):
        return tuple(self.index.shape[:-2])

    def block(self, i0, i1, j0, j1, device):
        idx = self.index[..., i0:i1, :]
        local = idx - j0
        valid = (idx >= j0) & (idx < j1)
        counts = torch.zeros(*idx.shape[:-1], j1 - j0, dtype=torch.int32, device=device)
        counts.scatter_add_(-1, local.clamp(0, j1 - j0 - 1), valid.to(torch.int32))
        return counts > 0

    def edges(self, n, m, device):
        _check_unbatched(self)
        idx, _ = torch.sort(self.index.reshape(self.index.shape[-2:]).to(device), dim=-1)
        keep = idx >= 0
        keep[:, 1:] &= idx[:, 1:] != idx[:, :-1]  # repeated indices count once
        dst = torch.arange(idx.shape[0], device=device)[:, None].expand_as(idx)[keep]
        return torch.stack([idx[keep], dst]), None

    def __repr__(self) -> str:
        return f"KNN(index={tuple(self.index.shape)})"


class EdgeIndex(Graph):
    """An explicit graph as in PyG: ``edge_index[0]`` = source j (key), ``edge_index[1]`` = target i (query).

    Args:
        edge_index: int64 (2, E). Repeated edges add up (as PyG's sum aggregation does): with
            the softmax they count twice in numerator and denominator, with the count
            normalisation twice in C. Copied (with its sort order and bounds): later edits of the
            caller's tensor do not reach the graph.
        edge_weight: optional (E,) non-negative weights (multiply f; 0 removes the edge and gives it
            a zero gradient). The caller's tensor, read and re-checked at every call.
        size: optional (M, N) = (number of source nodes, number of target nodes), checked against
            the inputs.
    """

    def __init__(self, edge_index: Tensor, edge_weight: Optional[Tensor] = None,
                 size: Optional[tuple[int, int]] = None):
        if not isinstance(edge_index, Tensor) or edge_index.dtype not in (torch.int64, torch.int32):
            raise TypeError("EdgeIndex(edge_index) must be an int64/int32 tensor of shape (2, E)")
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError(f"EdgeIndex(edge_index) must have shape (2, E), got {tuple(edge_index.shape)}")
        e = edge_index.shape[1]
        if edge_weight is not None:
            if not isinstance(edge_weight, Tensor) or not edge_weight.is_floating_point():
                raise TypeError("EdgeIndex(edge_weight) must be a floating-point tensor of shape (E,)")
            if edge_weight.shape != (e,):
                raise ValueError(f"EdgeIndex(edge_weight) must have shape (E,) = ({e},), got {tuple(edge_weight.shape)}")
            if edge_weight.device != edge_index.device:
                raise ValueError(f"EdgeIndex(edge_weight) is on {edge_weight.device} but edge_index on "
                                 f"{edge_index.device}")
        if size is not None:
            if (not isinstance(size, (tuple, list)) or len(size) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in size)):
                raise ValueError(f"EdgeIndex(size) must be None or (M, N), two ints >= 0, got {size!r}")
            size = (size[0], size[1])
        # The structure is a private copy, sorted by (target, source) once so each tile is a
        # contiguous slice of the edges (two stable sorts: no bound on the indices is needed).
        self.edge_index = edge_index.detach().to(torch.long, copy=True)
        src, dst = self.edge_index
        by_src = torch.argsort(src, stable=True)
        order = by_src[torch.argsort(dst[by_src], stable=True)]
        self._src, self._dst, self._order = src[order], dst[order], order
        self.size = size
        self.edge_weight = edge_weight  # the caller's tensor: read (and re-checked) at every call
        self._max: Optional[tuple[int, int]] = None
        if checking_values():
            self._bounds()
            self._check_weights()

    def _bounds(self) -> tuple[int, int]:
        """(largest source, largest target) of the private edge list; checks the entries once."""
        if self._max is None:
            if self.edge_index.shape[1] == 0:
                self._max = (-1, -1)
            else:
                if int(self.edge_index.min()) < 0:
                    raise ValueError("EdgeIndex(edge_index) entries must be >= 0")
                self._max = (int(self.edge_index[0].max()), int(self.edge_index[1].max()))
        return self._max

    def _check_weights(self) -> None:
        if self.edge_weight is not None and not finite_nonnegative(self.edge_weight):
            raise ValueError(f"EdgeIndex(edge_weight) must be finite and >= 0 (shape "
                             f"{tuple(self.edge_weight.shape)})")

    def with_weight(self, edge_weight: Optional[Tensor]) -> "EdgeIndex":
        """The same edges with other (E,) weights, sharing this graph's sorted structure (no copy)."""
        out = copy.copy(self)
        out.edge_weight = edge_weight
        return out

    def validate(self, n, m, device):
        if self.size is not None and tuple(self.size) != (m, n):
            raise ValueError(f"EdgeIndex(size) is {tuple(self.size)} but the inputs have (M, N) = ({m}, {n})")
        if self.edge_index.device != device:
            raise ValueError(f"EdgeIndex(edge_index) is on {self.edge_index.device} but the inputs are "
                             f"on {device}")

    def check_values(self, n, m):
        max_src, max_dst = self._bounds()
        if max_src >= m or max_dst >= n:
            raise ValueError(
                f"EdgeIndex(edge_index) refers to source {max_src} / target {max_dst} but there are "
                f"M={m} keys and N={n} queries"
            )
        self._check_weights()

    def tensors(self):
        return () if self.edge_weight is None else (self.edge_weight,)

    @property
    def block_requires_grad(self):
        return self.edge_weight is not None and self.edge_weight.requires_grad

    def block(self, i0, i1, j0, j1, device):
        lo, hi = torch.searchsorted(self._dst, torch.tensor([i0, i1], device=self._dst.device)).tolist()
        src, dst = self._src[lo:hi], self._dst[lo:hi]
        sel = (src >= j0) & (src < j1)
        src, dst = src[sel] - j0, dst[sel] - i0
        if self.edge_weight is None:
            w = torch.ones(src.shape[0], device=device)
        else:
            w = self.edge_weight[self._order[lo:hi][sel]]
            # a zero weight removes its edge: no gradient, also when a parallel edge keeps the pair
            w = torch.where(w > 0, w, torch.zeros_like(w))
        tile = torch.zeros(i1 - i0, j1 - j0, dtype=w.dtype, device=device)
        return tile.index_put((dst, src), w, accumulate=True)

    def edges(self, n, m, device):
        ei = self.edge_index.to(device)
        if self.edge_weight is None:
            return ei, None
        return ei, safe_log(self.edge_weight.to(device))

    def __repr__(self) -> str:
        return f"EdgeIndex(E={self.edge_index.shape[1]}, weighted={self.edge_weight is not None})"


class Intersection(Graph):
    """Edges present in every member graph; dense biases add. Built by ``graph_a & graph_b``."""

    def __init__(self, graphs: Sequence[Graph]):
        flat: list[Graph] = []
        for g in graphs:
            if not isinstance(g, Graph):
                raise TypeError(f"Intersection members must be Graphs, got {type(g).__name__}")
            flat.extend(g.graphs if isinstance(g, Intersection) else [g])
        self.graphs = [g for g in flat if not g.is_complete] or [Complete()]
        self.is_complete = all(g.is_complete for g in self.graphs)

    def validate(self, n, m, device):
        for g in self.graphs:
            g.validate(n, m, device)
        self.lead_shape  # noqa: B018  (raises ValueError when the members' batch dims do not broadcast)

    def check_values(self, n, m):
        for g in self.graphs:
            g.check_values(n, m)

    def tensors(self):
        return tuple(t for g in self.graphs for t in g.tensors())

    @property
    def lead_shape(self):
        try:
            return tuple(torch.broadcast_shapes(*[g.lead_shape for g in self.graphs]))
        except RuntimeError:
            raise ValueError(f"the members of {self!r} have batch dims {[g.lead_shape for g in self.graphs]} "
                             f"that do not broadcast") from None

    @property
    def block_requires_grad(self):
        return any(g.block_requires_grad for g in self.graphs)

    def tile_pairs(self, row_tiles, col_tiles, device):
        out = None
        for g in self.graphs:
            t = g.tile_pairs(row_tiles, col_tiles, device)
            if t is not None:
                out = t if out is None else out & t
        return out

    def block(self, i0, i1, j0, j1, device):
        out: Block = None
        for g in self.graphs:
            out = combine_blocks(out, g.block(i0, i1, j0, j1, device))
        return out

    def edges(self, n, m, device):
        """Edges present in every member; log-weights add (multiplicities of an EdgeIndex are kept)."""
        _check_unbatched(self)
        parts = [g.edges(n, m, device) for g in self.graphs]
        parts.sort(key=lambda p: p[0].shape[1])  # start from the sparsest member
        ei, logw = parts[0]
        code = ei[1] * m + ei[0]
        for other_ei, other_logw in parts[1:]:
            other_code = other_ei[1] * m + other_ei[0]
            uniq, inv, counts = torch.unique(other_code, return_inverse=True, return_counts=True)
            pos = torch.searchsorted(uniq, code).clamp_max(max(uniq.numel() - 1, 0))
            keep = uniq[pos] == code if uniq.numel() else torch.zeros_like(code, dtype=torch.bool)
            if other_logw is not None:
                # several parallel edges in `other`: their weights add (log-sum-exp)
                w = torch.zeros(uniq.numel(), dtype=other_logw.dtype, device=device).index_add(0, inv,
                                                                                                torch.exp(other_logw))
                extra = safe_log(w)[pos]
                logw = extra if logw is None else logw + extra
            elif uniq.numel() and bool(counts.max() > 1):
                # parallel unweighted edges in `other` (EdgeIndex duplicates): multiplicity is a weight
                extra = torch.log(counts.to(torch.float64))[pos]
                logw = extra if logw is None else logw + extra.to(logw.dtype)
            ei, code = ei[:, keep], code[keep]
            logw = None if logw is None else logw[keep]
        return ei, logw

    def dense_bias(self):
        biases = [b for b in (g.dense_bias() for g in self.graphs) if b is not None]
        if not biases:
            return None
        total = biases[0]
        for b in biases[1:]:
            total = total + b
        return total

    def __repr__(self) -> str:
        return " & ".join(repr(g) for g in self.graphs)
