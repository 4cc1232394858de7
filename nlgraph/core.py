"""The core op: ``y_i = (1 / C_i) sum_{j in N(i)} f(q_i, k_j) v_j``.

:func:`aggregate` validates every argument once, lowers per-edge weights into the graph and hands
the case to the one dispatch point. Nothing below it re-validates. Checks that read tensor values
(the NaN/Inf scan) run in eager mode and step aside under torch.compile / torch.export and inside
torch.func.vmap (:func:`nlgraph._values.checking_values`), so the op traces without a graph break.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping, NamedTuple, Optional, Union, overload

import torch
from torch import Tensor

from . import backends as _backends  # noqa: F401  (registers the built-in backends)
from ._shapes import broadcast_shapes
from ._values import FLOAT_DTYPES, all_finite, checking_values, distinct, known_norms, norm_bounds
from .affinity import Affinity, DotProduct, EdgeWeighted, Softmax
from .backends.common import compute_dtype
from .dispatch import fast_softmax, select_backend
from .graph import Causal, Complete, EdgeIndex, Graph, Intersection, Mask, safe_log

__all__ = ["aggregate", "validate_inputs", "validate_values", "ValueScan", "lower_edge_weights",
           "all_finite"]



def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def validate_inputs(query: Any, key: Any, value: Any, affinity: Any, graph: Any) -> Optional["ValueScan"]:
    """Check shapes, dtypes, devices and values; raise TypeError/ValueError naming the argument.

    Static checks (types, shapes, devices) always run; the checks that read tensor values (NaN/Inf
    in the inputs, the current values of the affinity's parameters and the graph's tensors) are
    :func:`validate_values`, which steps aside under ``torch.compile`` (then None is returned, else
    its :class:`ValueScan`).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, "
                        f"{value.dtype}")
    if not query.device == key.device == value.device:
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    for name, t, dims in (("query", query, "(..., N, d)"), ("key", key, "(..., M, d)"),
                          ("value", value, "(..., M, e)")):
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape {dims}, got {_shape(t)}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query and key must have the same feature width d, got query {_shape(query)} and key "
            f"{_shape(key)}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"key and value must have the same number of keys M, got key {_shape(key)} and value "
            f"{_shape(value)}"
        )
    try:
        lead = broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"leading (batch) dims of query {_shape(query)}, key {_shape(key)} and value {_shape(value)} "
            f"do not broadcast"
        ) from None

    if not isinstance(affinity, Affinity):
        raise TypeError(f"affinity must be an nlgraph.affinity.Affinity, got {type(affinity).__name__}")
    for t in affinity.tensors():
        if t.device != query.device:
            raise ValueError(f"{affinity!r} has a parameter on {t.device} but the inputs are on "
                             f"{query.device}")
    affinity.validate(query, key)
    if isinstance(affinity, EdgeWeighted) and affinity.weight.dim() >= 2:
        try:
            broadcast_shapes(lead, affinity.weight.shape[:-2])
        except RuntimeError:
            raise ValueError(
                f"EdgeWeighted(weight) has shape {_shape(affinity.weight)}: its leading dims "
                f"{_shape(affinity.weight)[:-2]} do not broadcast with the inputs' {tuple(lead)}"
            ) from None

    if graph is not None:
        if not isinstance(graph, Graph):
            raise TypeError(f"graph must be None or an nlgraph.graph.Graph, got {type(graph).__name__}")
        n, m = query.shape[-2], key.shape[-2]
        graph.validate(n, m, query.device)
        try:
            broadcast_shapes(lead, torch.Size(graph.lead_shape))
        except RuntimeError:
            raise ValueError(
                f"graph {graph!r} has leading dims {graph.lead_shape} that do not broadcast with the inputs' "
                f"{tuple(lead)}"
            ) from None
    if checking_values():
        return validate_values(query, key, value, affinity, graph)
    return None


def validate_values(query: Tensor, key: Tensor, value: Tensor, affinity: Affinity,
                    graph: Optional[Graph]) -> ValueScan:
    """The data-dependent checks, on the values the tensors hold now (one host sync each).

    NaN/Inf in query, key or value; the affinity's tensor parameters (finite, bandwidths > 0, edge
    weights >= 0); the graph's float masks (no NaN, no +inf), edge weights and index bounds. Graphs and
    affinities keep the caller's value tensors, so these run at every call, not only at construction.

    Returns the scan of query, key and value: the distinct tensors and an upper bound of each one's
    Frobenius norm (:func:`nlgraph._values.norm_bounds`, one pass and one sync for all three, which is
    also the NaN/Inf scan). :func:`aggregate` publishes them for the call
    (:func:`nlgraph._values.known_norms`), so the affinities' overflow screen reads them instead of
    scanning the same tensors again.
    """
    scanned = distinct((query, key, value))
    bounds = norm_bounds(scanned)
    if not all(math.isfinite(b) for b in bounds):  # only a failure (or a huge tensor) looks closer
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not all_finite(t):
                raise ValueError(f"{name} contains NaN or Inf (shape {_shape(t)})")
    affinity.check_values()
    if graph is not None:
        graph.check_values(query.shape[-2], key.shape[-2])
    return ValueScan(tuple(scanned), tuple(bounds))


class ValueScan(NamedTuple):
    """What :func:`validate_values` measured: ``tensors`` and an upper bound of each one's norm."""

    tensors: tuple[Tensor, ...]
    bounds: tuple[float, ...]


def lower_edge_weights(affinity: Affinity, graph: Optional[Graph], n: int,
                       m: int) -> tuple[Affinity, Optional[Graph]]:
    """Turn ``EdgeWeighted`` into graph data: (E,) weights onto an EdgeIndex, dense ones into a log-mask."""
    if not isinstance(affinity, EdgeWeighted):
        return affinity, graph
    w = affinity.weight
    if w.dim() == 1:
        if not isinstance(graph, EdgeIndex):
            raise ValueError(
                f"EdgeWeighted(weight) of shape {tuple(w.shape)} is per edge and needs an EdgeIndex graph, "
                f"got {graph!r}"
            )
        if w.shape[0] != graph.edge_index.shape[1]:
            raise ValueError(
                f"EdgeWeighted(weight) has {w.shape[0]} entries but the EdgeIndex graph has "
                f"{graph.edge_index.shape[1]} edges"
            )
        total = w if graph.edge_weight is None else w * graph.edge_weight
        return affinity.base, graph.with_weight(total)
    if w.shape[-2] not in (1, n) or w.shape[-1] not in (1, m):
        raise ValueError(
            f"EdgeWeighted(weight) has shape {tuple(w.shape)}; dense weights must be (..., N, M) = "
            f"(..., {n}, {m}) or broadcast to it"
        )
    log_w = Mask(safe_log(w))
    return affinity.base, log_w if graph is None else graph & log_w


@overload
def aggregate(query: Tensor, key: Tensor, value: Tensor, affinity: Optional[Affinity] = None,
              graph: Optional[Graph] = None, backend: str = "auto",
              options: Optional[Mapping[str, Any]] = None, dropout_p: float = 0.0,
              generator: Optional[torch.Generator] = None, is_causal: bool = False,
              scale: Optional[float] = None, enable_gqa: bool = False,
              return_lse: Literal[False] = False) -> Tensor: ...


@overload
def aggregate(query: Tensor, key: Tensor, value: Tensor, affinity: Optional[Affinity] = None,
              graph: Optional[Graph] = None, backend: str = "auto",
              options: Optional[Mapping[str, Any]] = None, dropout_p: float = 0.0,
              generator: Optional[torch.Generator] = None, is_causal: bool = False,
              scale: Optional[float] = None, enable_gqa: bool = False, *,
              return_lse: Literal[True]) -> tuple[Tensor, Tensor]: ...


@overload
def aggregate(query: Tensor, key: Tensor, value: Tensor, affinity: Optional[Affinity] = None,
              graph: Optional[Graph] = None, backend: str = "auto",
              options: Optional[Mapping[str, Any]] = None, dropout_p: float = 0.0,
              generator: Optional[torch.Generator] = None, is_causal: bool = False,
              scale: Optional[float] = None, enable_gqa: bool = False,
              return_lse: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]: ...


def aggregate(query: Tensor, key: Tensor, value: Tensor, affinity: Optional[Affinity] = None,
              graph: Optional[Graph] = None, backend: str = "auto",
              options: Optional[Mapping[str, Any]] = None, dropout_p: float = 0.0,
              generator: Optional[torch.Generator] = None, is_causal: bool = False,
              scale: Optional[float] = None, enable_gqa: bool = False,
              return_lse: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Message passing over a graph: ``y_i = (1 / C_i) sum_{j in N(i)} f(q_i, k_j) v_j``.

    Shapes follow :func:`torch.nn.functional.scaled_dot_product_attention`.

    Args:
        query: (..., N, d) query features q_i (float16/bfloat16/float32/float64).
        key: (..., M, d) key features k_j, same dtype and device.
        value: (..., M, e) messages g(x_j) = v_j.
        affinity: f and C, an :mod:`nlgraph.affinity` object; default ``Softmax()`` (attention).
        graph: the neighbourhoods N(i), an :mod:`nlgraph.graph` object; default complete.
            Leading dims of query, key, value and the graph broadcast.
        backend: ``"auto"`` (first capable backend in priority order) or a name from
            :func:`nlgraph.dispatch.backend_names`; a forced backend that cannot run the case raises
            :class:`nlgraph.dispatch.BackendError` with its reason.
        options: backend-specific keyword options (e.g. ``{"block_n": 64}`` for ``chunked``).
        dropout_p: message dropout after normalisation, as attention dropout does:
            ``y_i = sum_j (f_ij / C_i) (m_ij / (1 - p)) v_j`` with m_ij ~ Bernoulli(1 - p) and C_i
            unchanged. 0 (default) is exact; pass 0 at evaluation time.
        generator: RNG for the dropout seed (default: torch's global RNG, so ``torch.manual_seed``
            makes runs reproducible).
        is_causal: as SDPA's: query i sees keys j <= i (the top-left aligned lower triangle of the
            N x M scores, :class:`nlgraph.graph.Causal`), intersected with ``graph``.
        scale: as SDPA's: the logit scale of ``Softmax`` (overriding its own) or ``DotProduct``;
            None keeps the affinity's. A float or a one-entry tensor.
        enable_gqa: as SDPA's grouped-query attention: query heads H_q (dim -3) a multiple of the key
            and value heads H_kv; query head h uses key/value head h // (H_q / H_kv). Run as
            broadcasting views (no copy of the keys or values) on every backend.
        return_lse: also return ``lse = log C_i`` (as FlexAttention's ``return_lse``): for
            softmax-normalised affinities (``Softmax``, ``Gaussian(normalize=True)``) the log of the
            softmax denominator ``logsumexp_j (log f_ij + log w_ij)``; for count normalisation
            (``DotProduct``, ``Concatenation``) the log of the (edge-weighted) neighbour count; 0 for
            C = 1 (``Gaussian(normalize=False)``); -inf for a query without neighbours. Differentiable.
            Only backends that declare ``RETURNS_LSE`` are considered (all built-in ones do; the
            permutohedral lattice returns the log of its approximate C). Results over disjoint key
            sets combine exactly with :func:`nlgraph.merge`.

    Returns:
        (..., N, e) tensor in the input dtype. A query with no neighbour (all masked) gets zeros.
        With ``return_lse=True``, ``(y, lse)`` with lse of shape (..., N) (the broadcast leading
        dims) in the accumulation dtype (float32 for float16/bfloat16 inputs, else the input dtype).

    Raises:
        TypeError: wrong argument types or dtypes (named in the message).
        ValueError: inconsistent shapes, devices, empty or non-finite inputs (shapes in the message).
    """
    if (graph is None and backend == "auto" and options is None and type(dropout_p) in (int, float)
            and dropout_p == 0 and type(is_causal) is bool and enable_gqa is False and return_lse is False
            and (affinity is None or (type(affinity) is Softmax and not isinstance(affinity.scale, Tensor)))
            and (scale is None or (type(scale) in (int, float) and math.isfinite(scale)))):
        # plain softmax attention: the dispatch's shortcut to SDPA, or None (then everything below runs)
        eff = scale if scale is not None else None if affinity is None else affinity.scale
        y = fast_softmax(query, key, value, None if eff is None else float(eff), is_causal)
        if y is not None:
            return y
    affinity = Softmax() if affinity is None else affinity
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    if scale is not None:
        affinity = _with_scale(affinity, scale)
    if is_causal:
        graph = Causal() if graph is None else graph & Causal()
    groups = _gqa_groups(query, key, value) if enable_gqa else 1
    if groups > 1:  # (..., H_q, N, d) -> (..., H_kv, G, N, d) against keys/values (..., H_kv, 1, M, d): views
        hq = query.shape[-3]
        query = query.unflatten(-3, (key.shape[-3], groups))
        key, value = key.unsqueeze(-3), value.unsqueeze(-3)
        graph = _gqa_graph(graph, groups, hq)
        if isinstance(affinity, EdgeWeighted) and affinity.weight.dim() >= 3:
            weight = _gqa_heads("EdgeWeighted(weight)", affinity.weight, groups, hq)
            affinity = EdgeWeighted(affinity.base, weight)
    scan = validate_inputs(query, key, value, affinity, graph)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options must be a mapping of backend options, got {type(options).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    affinity, graph = lower_edge_weights(affinity, graph, query.shape[-2], key.shape[-2])
    if isinstance(graph, Complete):
        graph = None
    if query.shape[-1] == 0:
        query, key = _featureless(query, key)
    name, chosen = select_backend(query, key, value, affinity, graph, backend, dropout_p=float(dropout_p),
                                  return_lse=return_lse)
    opts = dict(options or {})
    if dropout_p > 0:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        opts_internal = {"dropout_p": float(dropout_p), "seed": seed}
    else:
        opts_internal = {}
    if return_lse:
        opts_internal["return_lse"] = True
    if opts:
        chosen.check_options(opts)
    if (return_lse and value.shape[-1] == 0 and query.shape[-2] > 0 and key.shape[-2] > 0
            and 0 not in _lead(query, key, value, graph)):
        # no value channels, but the queries do have keys: their C_i is computed on one zero channel
        padded = torch.cat([value, value.new_zeros(*value.shape[:-1], 1)], dim=-1)
        y, lse = chosen.run(query, key, padded, affinity, graph, **opts_internal, **opts)
        return _ungroup((y[..., :0], lse), groups, True)
    if _nothing_to_aggregate(query, key, value, graph):
        out = _zeros_result(query, key, value, affinity, graph, return_lse)
    elif scan is None:  # traced, or vmapped: no values were read
        out = chosen.run(query, key, value, affinity, graph, **opts_internal, **opts)
    else:
        with known_norms(scan.tensors, scan.bounds):  # the overflow screen reads the scan's norms
            out = chosen.run(query, key, value, affinity, graph, **opts_internal, **opts)
    return _ungroup(out, groups, return_lse)


def _ungroup(out: Any, groups: int, return_lse: bool) -> Any:
    """Undo enable_gqa's head grouping: (..., H_kv, G, N, e) -> (..., H_q, N, e), lse likewise."""
    if groups == 1:
        return out
    if return_lse:
        y, lse = out
        return y.flatten(-4, -3), lse.flatten(-3, -2)
    return out.flatten(-4, -3)


def _with_scale(affinity: Affinity, scale: Any) -> Affinity:
    """``aggregate(scale=...)``: the affinity with that logit scale (SDPA's ``scale``)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, Tensor)):
        raise TypeError(f"scale must be None, a float or a one-entry tensor, got {type(scale).__name__}")
    if isinstance(affinity, EdgeWeighted):
        return EdgeWeighted(_with_scale(affinity.base, scale), affinity.weight)
    if type(affinity) is Softmax:
        return Softmax(scale=scale)
    if type(affinity) is DotProduct:
        return DotProduct(scale=scale)
    raise ValueError(f"scale is the logit scale of Softmax or DotProduct; {affinity!r} has none "
                     f"(got scale={scale!r})")


def _gqa_groups(query: Tensor, key: Tensor, value: Tensor) -> int:
    """H_q / H_kv for ``enable_gqa``; ValueError naming the shapes when the heads do not group."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() < 3:
            raise ValueError(f"enable_gqa needs a heads dim (-3) on query, key and value; {name} has shape "
                             f"{tuple(getattr(t, 'shape', ()))}")
    hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
    if hk != hv or hk == 0 or hq % hk:
        raise ValueError(f"enable_gqa needs key and value with the same number of heads H_kv (dim -3) "
                         f"dividing the query's H_q; got query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}")
    return hq // hk


def _gqa_heads(name: str, t: Tensor, groups: int, hq: int) -> Tensor:
    """A mask's / weight's heads dim (-3) against grouped heads: H_q -> (H_kv, groups), 1 -> (1, 1), views."""
    h = t.shape[-3]
    if h == 1:
        return t.unsqueeze(-3)
    if h != hq:
        raise ValueError(f"enable_gqa: {name} of shape {tuple(t.shape)} has {h} heads (dim -3); it must have "
                         f"1 or H_q = {hq}")
    return t.unflatten(-3, (hq // groups, groups))


def _gqa_graph(graph: Optional[Graph], groups: int, hq: int) -> Optional[Graph]:
    """The graph against grouped heads (masks' heads dims regrouped as views); other graphs unchanged."""
    if not isinstance(graph, Graph) or not graph.lead_shape:
        return graph  # no per-head data (or not a graph: validate_inputs says so)
    if isinstance(graph, Intersection):
        return Intersection([h for g in graph.graphs if (h := _gqa_graph(g, groups, hq)) is not None])
    if isinstance(graph, Mask):
        if graph.mask.dim() < 3:
            return graph
        return _GroupedMask(_gqa_heads("Mask(mask)", graph.mask, groups, hq))
    raise ValueError(f"enable_gqa: graph {graph!r} has batch dims {graph.lead_shape}; only Mask graphs may "
                     f"carry batch or head dims with grouped-query attention")


class _GroupedMask(Mask):
    """A Mask viewed against grouped heads (its values are checked with the call's, in validate_values)."""

    def __init__(self, mask: Tensor):
        self.mask = mask


def _featureless(query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """d = 0: one zero feature column each, which gives every affinity its d = 0 value.

    With no features q_i . k_j = 0 and |q_i - k_j| = 0, exactly as with one zero column (and a
    Softmax's default scale 1/sqrt(d) multiplies 0 either way), so the usual backends compute the op
    (SDPA's answer for d = 0: the mean of the values over the neighbours). Gradients of the
    (..., 0) features are empty, as they should be.
    """
    pad_q = torch.cat([query, query.new_zeros(*query.shape[:-1], 1)], dim=-1)
    pad_k = pad_q if key is query else torch.cat([key, key.new_zeros(*key.shape[:-1], 1)], dim=-1)
    return pad_q, pad_k


def _nothing_to_aggregate(query: Tensor, key: Tensor, value: Tensor, graph: Optional[Graph]) -> bool:
    """True when the result is empty (an empty batch, N = 0 or e = 0) or no query has a key (M = 0)."""
    return (query.shape[-2] == 0 or key.shape[-2] == 0 or value.shape[-1] == 0
            or 0 in _lead(query, key, value, graph))


def _lead(query: Tensor, key: Tensor, value: Tensor, graph: Optional[Graph]) -> tuple[int, ...]:
    shapes = [query.shape[:-2], key.shape[:-2], value.shape[:-2]]
    if graph is not None:
        shapes.append(torch.Size(graph.lead_shape))
    return tuple(broadcast_shapes(*shapes))


def _zeros_result(query: Tensor, key: Tensor, value: Tensor, affinity: Affinity,
                  graph: Optional[Graph], return_lse: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """The result when there is nothing to sum: zeros of shape (..., N, e), as SDPA returns.

    An empty sum is 0 and a query without neighbours gets zeros (the op's convention), so the result
    and every gradient are zeros. It stays connected to each input that requires grad (through an
    empty slice, which adds an exact 0 whatever the input holds), so ``backward`` works as it does
    for SDPA. With ``return_lse`` also lse = log C_i = -inf, shape (..., N): no query has a key
    here (M = 0), or the result is empty (the case e = 0 with keys is computed, in :func:`aggregate`).
    """
    lead = _lead(query, key, value, graph)
    y = value.new_zeros(*lead, query.shape[-2], value.shape[-1])
    lse = torch.full((*lead, query.shape[-2]), -math.inf, dtype=compute_dtype(value.dtype),
                     device=value.device)
    sources = (query, key, value, *affinity.tensors(), *(graph.tensors() if graph is not None else ()))
    for t in sources:
        if t.requires_grad and torch.is_grad_enabled():
            link = t.reshape(-1)[:0].sum()
            y = y + link.to(y.dtype)
            lse = lse + link.to(lse.dtype)
    return (y, lse) if return_lse else y
