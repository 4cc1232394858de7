"""The ``pyg`` backend: the core op as a torch_geometric ``MessagePassing`` over an explicit edge list.

Each edge (j -> i) gets its score s_e = q'_i . k'_j + r_i + c_j (the canonical form of
``nlgraph.affinity``) plus the graph's log-weight, then

* softmax-normalised affinities: ``alpha_e = torch_geometric.utils.softmax(s_e, index=i)``;
* C = 1 (``Gaussian(normalize=False)``): ``alpha_e = exp(s_e)``;
* count-normalised (dot product, concatenation): ``alpha_e = w_e f_e / sum_{e' -> i} w_e'``;

and ``y_i = sum_{e -> i} alpha_e v_j`` is ``MessagePassing.propagate`` with ``aggr="add"``. The
log-normaliser (``return_lse``) is a scatter over the same edges: logsumexp of s_e per target (C = sum f),
log sum_e w_e (count), 0 (C = 1); -inf for a node without incoming edges. Exact,
differentiable by autograd w.r.t. everything, including per-edge weights of an ``EdgeIndex`` graph.
Cost O(E (d + e)) time and memory per batch entry: the right path for sparse graphs (windows,
criss-cross, k-NN, explicit edge lists); dense graphs are better served by ``chunked``.

torch_geometric is imported only here, on first use; ``import nlgraph`` does not need it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._optional import missing, optional
from ..graph import Complete
from .common import finite_or_zero, floor_scores, lower, safe_log

__all__ = ["can_run", "prefer", "run", "MAX_DENSITY", "MAX_EDGE_ELEMENTS", "RETURNS_LSE"]

RETURNS_LSE = True

#: Automatic dispatch takes this backend for every explicit edge list, and for k-NN and criss-cross
#: graphs whose edge count is at most MAX_DENSITY of N * M and whose per-edge tensors (E x (2 d + e)
#: gathered features per batch entry) stay within MAX_EDGE_ELEMENTS. Measured (``nlgraph bench
#: graph``, 2-core CPU): k-NN 7x (N=4096) and 47x (N=65536) faster than chunked; local windows only
#: tie with chunked, whose bounding-box tile skipping serves them in 40x less memory, so windows stay
#: on chunked.
MAX_DENSITY = 1.0 / 16
MAX_EDGE_ELEMENTS = 1 << 27


def can_run(query, key, value, affinity, graph) -> tuple[bool, str]:
    if optional("torch_geometric") is None:
        return False, missing("torch_geometric")
    if graph is None:
        return True, ""
    if math.prod(graph.lead_shape) != 1:
        return False, (f"pyg runs one edge list shared by the batch; {graph!r} has batch dims "
                       f"{graph.lead_shape}")
    return True, ""


def prefer(query, key, value, affinity, graph) -> bool:
    """Explicit edge lists always; fan-in graphs (k-NN, criss-cross) when they have few enough edges
    (:attr:`nlgraph.graph.Graph.sparsity`, :meth:`nlgraph.graph.Graph.edge_bound`)."""
    if graph is None:
        return False
    members = graph.members()
    if any(g.sparsity == "edge_list" for g in members):
        return True
    if not any(g.sparsity == "fan_in" for g in members):
        return False
    count = graph.edge_bound(query.shape[-2], key.shape[-2])
    if count is None or count > MAX_DENSITY * query.shape[-2] * key.shape[-2]:
        return False
    batch = math.prod(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
    return batch * count * (2 * query.shape[-1] + value.shape[-1]) <= MAX_EDGE_ELEMENTS


_CONV = None


def _conv():
    """The MessagePassing layer (class built on first use, so torch_geometric stays optional)."""
    global _CONV
    if _CONV is None:
        from torch_geometric.nn import MessagePassing

        class CoreOpConv(MessagePassing):
            """y_i = sum_{(j -> i)} alpha_e v_j: the aggregation of the core op over an edge list."""

            def __init__(self):
                super().__init__(aggr="add", flow="source_to_target", node_dim=-2)

            def forward(self, v: Tensor, edge_index: Tensor, alpha: Tensor, size: tuple[int, int]) -> Tensor:
                return self.propagate(edge_index, v=v, alpha=alpha, size=size)

            def message(self, v_j: Tensor, alpha: Tensor) -> Tensor:
                return alpha.unsqueeze(-1) * v_j

        _CONV = CoreOpConv()
    return _CONV


def _scatter_lse(s: Tensor, dst: Tensor, n: int) -> Tensor:
    """log sum_{e -> i} exp(s_e) per target node, (B, E) -> (B, N); -inf for a node without edges."""
    idx = dst.expand_as(s)
    mx = torch.full((s.shape[0], n), -math.inf, dtype=s.dtype, device=s.device)
    mx = mx.scatter_reduce(1, idx, s.detach(), "amax")
    mx = finite_or_zero(mx)
    tot = torch.zeros_like(mx).index_add(1, dst, torch.exp(s - mx.index_select(1, dst)))
    return mx + safe_log(tot)


def run(query: Tensor, key: Tensor, value: Tensor, affinity, graph, *, return_lse: bool = False):
    from torch_geometric.utils import softmax as pyg_softmax

    p = lower(query, key, value, affinity, graph)
    n, m, e = p.n, p.m, p.e
    device = query.device
    ei, logw = (graph if graph is not None else Complete()).edges(n, m, device)
    if logw is not None:
        keep = logw.detach() > -math.inf  # zero-weight / -inf edges carry nothing
        ei, logw = ei[:, keep], logw[keep].to(p.value.dtype)
    src, dst = ei[0], ei[1]
    f = p.form
    lead = p.lead
    s: Optional[Tensor] = None
    if f.query is not None and f.key is not None:
        qf = f.query.expand(*lead, n, f.query.shape[-1])
        kf = f.key.expand(*lead, m, f.key.shape[-1])
        s = (qf.index_select(-2, dst) * kf.index_select(-2, src)).sum(-1)
    if f.row is not None:
        r = f.row.expand(*lead, n).index_select(-1, dst)
        s = r if s is None else s + r
    if f.col is not None:
        c = f.col.expand(*lead, m).index_select(-1, src)
        s = c if s is None else s + c
    assert s is not None  # every form has a feature product or a bias
    s = s.expand(*lead, s.shape[-1]).reshape(math.prod(lead), s.shape[-1])  # (B, E), also for E = 0
    if f.kernel == "exp":
        if f.clamp is not None:  # flat top of the Gaussian
            s = (s + f.clamp).clamp(max=0.0)
        if f.floor is not None:  # its cut-off: -inf (no weight) below -floor
            s = floor_scores(s, f.floor)
        if logw is not None:  # edge weights and float-mask logits, from the edge list
            s = s + logw
        lse_s: Optional[Tensor] = None  # log sum_e exp(s_e) per node, where computed already
        if f.norm != "sum":
            alpha = torch.exp(s)
        elif f.floor is None:
            alpha = pyg_softmax(s, dst, num_nodes=n, dim=-1)
        else:  # a node may have lost every edge to the cut-off: PyG's softmax would give NaN there
            lse_s = _scatter_lse(s, dst, n)
            alpha = torch.exp(s - finite_or_zero(lse_s).index_select(1, dst))
        if return_lse and f.norm == "sum":
            lse = _scatter_lse(s, dst, n) if lse_s is None else lse_s
            lse = lse.reshape(*lead, n) if f.lse_row is None else lse.reshape(*lead, n) + f.lse_row
        elif return_lse and f.floor is None:  # C = 1: 0 where a node has an incoming edge
            has = torch.zeros(n, dtype=s.dtype, device=device).index_add(
                0, dst, torch.ones_like(dst, dtype=s.dtype))
            lse = torch.where(has > 0, 0.0, -math.inf).to(s.dtype).expand(*lead, n)
        elif return_lse:  # ... that the cut-off kept
            has = torch.zeros(s.shape[0], n, dtype=s.dtype, device=device).index_add(
                1, dst, torch.isfinite(s.detach()).to(s.dtype))
            lse = torch.where(has > 0, 0.0, -math.inf).to(s.dtype).reshape(*lead, n)
    else:
        g = torch.relu(s) if f.kernel == "relu" else s
        w = torch.ones_like(g) if logw is None else torch.exp(logw).expand_as(g)
        den = torch.zeros(g.shape[0], n, dtype=g.dtype, device=device).index_add(1, dst, w)
        pos = den > 0
        inv = torch.where(pos, 1.0 / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(den))
        alpha = g * w * inv.index_select(1, dst)
        if return_lse:
            lse = safe_log(den).expand(math.prod(lead), n).reshape(*lead, n)
    v = p.value.expand(*lead, m, e).reshape(-1, m, e)
    y = _conv()(v, ei, alpha, size=(m, n))
    y = y.reshape(*lead, n, e).to(query.dtype)
    return (y, lse) if return_lse else y
