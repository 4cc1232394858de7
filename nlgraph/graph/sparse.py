"""Sparse graphs: a fixed fan-in (:class:`KNN`, with a chunked k-nearest-neighbour search) and an
explicit PyG-style edge list (:class:`EdgeIndex`)."""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import Tensor

from .._values import all_finite, checking_values, finite_nonnegative
from .base import Graph, _check_unbatched, safe_log

__all__ = ["KNN", "EdgeIndex"]


class KNN(Graph):
    """A fixed fan-in graph: query i aggregates over the keys ``index[..., i, :]``.

    Args:
        index: int64 (..., N, k) key indices; -1 marks padding (fewer than k neighbours).
            Repeated indices count once. Copied: later edits of the caller's tensor do not reach the graph.
        num_keys: M, if known (checked against the inputs).

    Use :meth:`KNN.from_points` to build the k nearest neighbours of point sets.
    """

    sparsity = "fan_in"

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
                f"KNN.from_points: points must be (..., N, p) and (..., M, p), got "
                f"{tuple(query_points.shape)} and {tuple(key_points.shape)}"
            )
        if exclude_self and not same:
            raise ValueError("KNN.from_points(exclude_self=True) needs key_points=None (keys are the "
                             "queries)")
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
            raise ValueError(f"KNN.from_points: no neighbour possible with M={m} and "
                             f"exclude_self={exclude_self}")
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

    def edge_bound(self, n, m):
        return n * self.index.shape[-1]

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

    sparsity = "edge_list"

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
                raise ValueError(f"EdgeIndex(edge_weight) must have shape (E,) = ({e},), got "
                                 f"{tuple(edge_weight.shape)}")
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

    def edge_bound(self, n, m):
        return self.edge_index.shape[1]

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
