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

The package has one module per family: :mod:`~nlgraph.graph.base` (the base class, its
capabilities, :class:`Complete`, :class:`ExcludeSelf`, :class:`Intersection`),
:mod:`~nlgraph.graph.dense` (:class:`Mask`, :class:`Causal`), :mod:`~nlgraph.graph.grid`
(:class:`LocalWindow`, :class:`CrissCross`), :mod:`~nlgraph.graph.sparse` (:class:`KNN`,
:class:`EdgeIndex`) and :mod:`~nlgraph.graph.layout` (:func:`blocked_order`); every name is
importable from ``nlgraph.graph`` itself.
"""

from .._shapes import slice_rows_cols as _slice_rows_cols  # noqa: F401  (the former private name)
from .base import SPARSITIES, Block, Complete, ExcludeSelf, Graph, Intersection, combine_blocks, safe_log
from .dense import Causal, Mask
from .grid import BORDERS, CrissCross, LocalWindow
from .layout import blocked_order
from .sparse import KNN, EdgeIndex

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
    "Block",
    "combine_blocks",
    "safe_log",
    "BORDERS",
    "SPARSITIES",
]
