"""The graph base class, its capabilities, intersections and the two index-only graphs.

A graph answers for one tile at a time with :meth:`Graph.block` (the graph's one predicate:
``None`` = every (i, j) of the tile is an edge, a bool tile = True where (i, j) is an edge, a float
tile = a non-negative multiplicity/weight per edge) and, for trainable additive logits, one dense
differentiable tensor from :meth:`Graph.dense_bias`. Everything else a backend needs is a
*capability* the graph declares (as FlexAttention derives ``create_block_mask`` and ``create_mask``
from one ``mask_mod``): the tiles worth visiting (:meth:`Graph.tile_pairs`), the edge list
(:meth:`Graph.edges`), a cheap bound on the edge count (:meth:`Graph.edge_bound`), SDPA's own
descriptions (:attr:`Graph.attn_mask`, :attr:`Graph.causal`, :attr:`Graph.excludes_self`), grid
coordinates and offsets (:attr:`Graph.grid_pattern`) and how the edges are spread
(:attr:`Graph.sparsity`). Backends ask for these, never for a concrete class.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["Block", "Graph", "Complete", "ExcludeSelf", "Intersection", "combine_blocks", "safe_log",
           "SPARSITIES"]

Block = Optional[Tensor]

#: How a graph's edges spread over the N x M grid of pairs (:attr:`Graph.sparsity`):
#: ``"dense"`` (any pattern, read tile by tile), ``"banded"`` (local: most key tiles of a query tile
#: hold no edge, so a tiled backend skips them), ``"fan_in"`` (few keys per query, scattered over the
#: key range: tiles skip poorly, an edge list pays off) and ``"edge_list"`` (stored as an explicit
#: edge list).
SPARSITIES = ("dense", "banded", "fan_in", "edge_list")


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

    Subclasses implement :meth:`validate` and :meth:`block` (the predicate, one tile at a time);
    graphs with trainable logits also :meth:`dense_bias`. The other methods and attributes are
    capabilities with conservative defaults (no cheap tile plan, no edge bound, edges enumerated from
    the predicate), which a graph overrides where it offers more.
    """

    #: True when the graph is the complete graph (no block ever restricts anything).
    is_complete: bool = False

    #: True when the edge set is every key except the query itself (j != i, N == M): the dense-CRF
    #: message; closed forms and index-based kernels compute it without a mask.
    excludes_self: bool = False

    #: True when the edge set is SDPA's ``is_causal=True`` (query i sees keys j <= i, top-left aligned).
    causal: bool = False

    #: Grid graphs: ``"window"`` (keys at fixed per-axis offsets: ``shape``, ``order``, ``coords``,
    #: ``reach``, ``dilation``, ``axis_slots`` ...) or ``"criss_cross"`` (the query's row and column);
    #: None for graphs that are not laid out on a grid.
    grid_pattern: Optional[str] = None

    #: How the edges spread over the pairs, one of :data:`SPARSITIES`.
    sparsity: str = "dense"

    def members(self) -> tuple["Graph", ...]:
        """The graphs whose edge sets intersect to this one: ``(self,)``, or an intersection's members."""
        return (self,)

    @property
    def attn_mask(self) -> Optional[Tensor]:
        """The stored dense mask with SDPA's ``attn_mask`` semantics (bool (..., N|1, M|1), True = edge,
        or float additive log-weights), for a graph that *is* such a mask; None otherwise."""
        return None

    def edge_bound(self, n: int, m: int) -> Optional[int]:
        """A cheap upper bound on the number of edges for N=n queries and M=m keys (no enumeration),
        or None when there is none short of enumerating them."""
        return None

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
        raise ValueError(f"{graph!r} has batch dims {graph.lead_shape}; an edge list describes one graph "
                         f"shared by the batch")


def _unbatched(t: Tensor, n: int, m: int) -> Tensor:
    """A block or bias of a graph shared by the batch (batch dims all 1) as an (n, m) view."""
    return t.reshape(t.shape[-2:]).expand(n, m)


def safe_log(w: Tensor) -> Tensor:
    """log(w) with log(0) = -inf and a zero (not NaN) gradient at w = 0 (edge weights -> log-weights)."""
    pos = w > 0
    return torch.where(pos, torch.log(torch.where(pos, w, torch.ones_like(w))), torch.full_like(w, -math.inf))



class Complete(Graph):
    """Every query sees every key (the non-local block and plain attention)."""

    is_complete = True

    def block(self, i0, i1, j0, j1, device):
        return None

    def __repr__(self) -> str:
        return "Complete()"



class ExcludeSelf(Graph):
    """Every key except the query itself (j != i): the dense-CRF message. Needs N == M."""

    excludes_self = True

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



class Intersection(Graph):
    """Edges present in every member graph; dense biases add. Built by ``graph_a & graph_b``."""

    def __init__(self, graphs: Sequence[Graph]):
        flat: list[Graph] = []
        for g in graphs:
            if not isinstance(g, Graph):
                raise TypeError(f"Intersection members must be Graphs, got {type(g).__name__}")
            flat.extend(g.members())
        self.graphs = [g for g in flat if not g.is_complete] or [Complete()]
        self.is_complete = all(g.is_complete for g in self.graphs)

    def members(self):
        return tuple(self.graphs)

    def edge_bound(self, n, m):
        """The smallest bound any member gives (an intersection has at most that member's edges)."""
        counts = [c for c in (g.edge_bound(n, m) for g in self.graphs) if c is not None]
        return min(counts) if counts else None

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
