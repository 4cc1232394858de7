"""The ``algebra`` backend: exact closed forms that beat brute force.

* ``DotProduct`` on the complete graph: ``y = s q (k^T v) / M`` in O((N + M) d e) instead of
  O(N M d). With ``ExcludeSelf``: ``y_i = (s q_i (k^T v) - s (q_i . k_i) v_i) / (M - 1)``.
* ``Concatenation`` on the complete graph: with a_i = w_q.q_i + b and b_j = w_k.k_j,
  ``sum_j ReLU(a_i + b_j) v_j = a_i sum_{b_j > -a_i} v_j + sum_{b_j > -a_i} b_j v_j``; sorting the
  keys by b_j once turns both sums into prefix-sum look-ups found by binary search:
  O((N + M) log M + (N + M) e). ``ExcludeSelf`` subtracts the i == j term.

Both are exact (up to floating-point summation order); prefix sums are accumulated in float64 so
the differences of large prefix sums do not cancel catastrophically. Gradients are plain autograd
through these O((N + M) d e) expressions. The log-normaliser (``return_lse``) is log M, or
log(M - 1) with ``ExcludeSelf`` (-inf when M = 1): the neighbour count, a constant.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..affinity import Concatenation, DotProduct
from .common import compute_dtype

__all__ = ["can_run", "run", "RETURNS_LSE"]

RETURNS_LSE = True


def can_run(query, key, value, affinity, graph) -> tuple[bool, str]:
    if affinity.closed_form not in _CLOSED_FORMS:
        return False, f"algebra has closed forms for DotProduct and Concatenation only, not {affinity!r}"
    if graph is not None and not (graph.is_complete or graph.excludes_self):
        return False, f"algebra needs the complete graph or ExcludeSelf, not {graph!r}"
    return True, ""


def _exclude_self(graph) -> bool:
    return graph is not None and graph.excludes_self


def _dot_product(query: Tensor, key: Tensor, value: Tensor, affinity: DotProduct, graph) -> Tensor:
    f = affinity.form(query, key)
    fq, fk = f.query, f.key
    assert fq is not None and fk is not None  # the dot product's form is q' . k'
    m = key.shape[-2]
    kv = fk.transpose(-1, -2) @ value  # (..., d, e)
    y = fq @ kv
    if _exclude_self(graph):
        y = y - (fq * fk).sum(-1, keepdim=True) * value
        return y / (m - 1) if m > 1 else _no_neighbour(y)
    return y / m


def _no_neighbour(y: Tensor) -> Tensor:
    """Zeros in y's place (M = 1 with ExcludeSelf: no query has a neighbour), still in the autograd graph
    (its gradients are zeros, as for any query without neighbours)."""
    return y.masked_fill(torch.ones_like(y, dtype=torch.bool), 0.0)


def _concatenation(query: Tensor, key: Tensor, value: Tensor, affinity: Concatenation, graph) -> Tensor:
    f = affinity.form(query, key)
    a, b = f.row, f.col  # (..., N), (..., M)
    assert a is not None and b is not None  # the concatenation's form is r_i + c_j
    m = key.shape[-2]
    lead = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1], value.shape[:-2])
    a = a.expand(*lead, a.shape[-1])
    b = b.expand(*lead, m)
    v = value.expand(*lead, m, value.shape[-1])
    acc = torch.float64
    b_sorted, order = torch.sort(b, dim=-1)
    v_sorted = torch.gather(v, -2, order[..., None].expand_as(v)).to(acc)
    zero = torch.zeros(*lead, 1, v.shape[-1], dtype=acc, device=v.device)
    pv = torch.cat([zero, v_sorted.cumsum(-2)], dim=-2)  # (..., M + 1, e)
    pbv = torch.cat([zero, (b_sorted.to(acc)[..., None] * v_sorted).cumsum(-2)], dim=-2)
    # keys with b_j > -a_i occupy sorted positions [idx_i, M)
    idx = torch.searchsorted(b_sorted.detach().contiguous(), (-a).detach().contiguous(), right=True)
    gi = idx[..., None].expand(*idx.shape, v.shape[-1])
    s_v = pv[..., -1:, :] - torch.gather(pv, -2, gi)
    s_bv = pbv[..., -1:, :] - torch.gather(pbv, -2, gi)
    y = a.to(acc)[..., None] * s_v + s_bv
    if _exclude_self(graph):
        y = y - torch.relu(a + b).to(acc)[..., None] * v.to(acc)
        return (y / (m - 1)).to(value.dtype) if m > 1 else _no_neighbour(y.to(value.dtype))
    return (y / m).to(value.dtype)


#: The closed forms this backend computes, by :attr:`nlgraph.affinity.Affinity.closed_form`.
_CLOSED_FORMS: dict[str, Callable[..., Tensor]] = {"dot_product": _dot_product,
                                                   "concatenation": _concatenation}


def run(query: Tensor, key: Tensor, value: Tensor, affinity, graph, *, return_lse: bool = False):
    cd = compute_dtype(query.dtype)
    q, k, v = query.to(cd), key.to(cd), value.to(cd)
    fn = _CLOSED_FORMS[affinity.closed_form]
    y = fn(q, k, v, affinity, graph)
    n = query.shape[-2]
    lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    y = y.expand(*lead, n, value.shape[-1]).to(query.dtype)
    if not return_lse:
        return y
    count = key.shape[-2] - (1 if _exclude_self(graph) else 0)
    lse = torch.full((*lead, n), math.log(count) if count > 0 else -math.inf, dtype=cd, device=query.device)
    return y, lse
