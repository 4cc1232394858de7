"""Every backend == a materialised formula written in the tests, forward and every gradient.

Parametrised over affinity x graph x (compatible) backend. Inputs are float64 so the comparison
is tight; the chunked backend runs with small, ragged tiles (5 x 4 on N = M = 12) so that the
online softmax, the tile skipping and the tile-by-tile backward are all exercised.
"""

from __future__ import annotations

import math

import pytest
import torch

import nlgraph
from nlgraph import affinity as A
from nlgraph import graph as G

from .formulas import TOLERANCES, aggregate_formula, criss_cross_adjacency, edge_adjacency, window_adjacency

H, W = 3, 4
N = M = H * W
D, E = 5, 3
LEAD = (2,)
CHUNK_OPTIONS = {"block_n": 5, "block_m": 4}


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def make_affinity(name: str, gen: torch.Generator):
    """(affinity object, formula kind, formula params, named trainable tensors)."""
    f64 = dict(dtype=torch.float64)
    if name == "softmax":
        return A.Softmax(), "softmax", {}, {}
    if name == "softmax_scale":
        s = _leaf(torch.tensor(0.7, **f64))
        return A.Softmax(scale=s), "softmax", {"scale": s}, {"scale": s}
    if name == "gaussian":
        b = _leaf(torch.rand(D, generator=gen, **f64) + 0.8)
        return A.Gaussian(bandwidth=b), "gaussian", {"bandwidth": b}, {"bandwidth": b}
    if name == "gaussian_c1":
        b = _leaf(torch.tensor(1.7, **f64))
        return A.Gaussian(bandwidth=b, normalize=False), "gaussian_unnorm", {"bandwidth": b}, {"bandwidth": b}
    if name == "gaussian_offset":
        b = _leaf(torch.rand(D, generator=gen, **f64) + 0.8)
        return (A.Gaussian(bandwidth=b, offset=1.5), "gaussian", {"bandwidth": b, "offset": 1.5},
                {"bandwidth": b})
    if name == "dot":
        s = _leaf(torch.tensor(0.5, **f64))
        return A.DotProduct(scale=s), "dot", {"scale": s}, {"scale": s}
    if name == "concat":
        w = _leaf(torch.randn(2 * D, generator=gen, **f64))
        b = _leaf(torch.tensor(0.1, **f64))
        return A.Concatenation(w, bias=b), "concat", {"weight": w, "bias": b}, {"weight": w, "bias": b}
    raise ValueError(name)


AFFINITIES = ["softmax", "softmax_scale", "gaussian", "gaussian_c1", "gaussian_offset", "dot", "concat"]


def make_graph(name: str, gen: torch.Generator):
    """(graph object or None, wrap(affinity) -> affinity, adjacency, bias, named trainable tensors)."""
    ident = lambda a: a  # noqa: E731
    if name == "complete":
        return None, ident, None, None, {}
    if name == "mask":
        mask = torch.rand(N, M, generator=gen) > 0.4
        mask[3] = False  # an empty row: must give zeros, no NaN
        return G.Mask(mask), ident, mask.double(), None, {}
    if name == "float_mask":
        bias = torch.randn(N, M, generator=gen, dtype=torch.float64)
        bias[torch.rand(N, M, generator=gen) > 0.7] = -math.inf
        bias = _leaf(bias)
        return G.Mask(bias), ident, None, bias, {"mask": bias}
    if name == "exclude_self":
        return G.ExcludeSelf(), ident, 1.0 - torch.eye(N, dtype=torch.float64), None, {}
    if name == "mask_and_self":
        mask = torch.rand(N, M, generator=gen) > 0.3
        not_self = 1 - torch.eye(N, dtype=torch.float64)
        return G.Mask(mask) & G.ExcludeSelf(), ident, mask.double() * not_self, None, {}
    if name == "window":
        return G.LocalWindow((H, W), radius=1), ident, window_adjacency((H, W), 1), None, {}
    if name == "criss_cross":
        return G.CrissCross((H, W)), ident, criss_cross_adjacency(H, W), None, {}
    if name == "knn":
        pts = torch.randn(N, 2, generator=gen, dtype=torch.float64)
        d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
        adj = torch.zeros(N, M, dtype=torch.float64)
        for i in range(N):
            adj[i, d2[i].argsort()[:4]] = 1.0
        return G.KNN.from_points(pts, k=4), ident, adj, None, {}
    if name == "edge_index":
        ei = torch.randint(0, N, (2, 40), generator=gen)
        ei[:, 1] = ei[:, 0]  # a duplicated edge counts twice
        ei[1][ei[1] == 7] = 8  # node 7 has no incoming edge
        return G.EdgeIndex(ei), ident, edge_adjacency(ei, N, M), None, {}
    if name == "edge_index_weighted":
        ei = torch.randint(0, N, (2, 40), generator=gen)
        w = _leaf(torch.rand(40, generator=gen, dtype=torch.float64) + 0.1)
        return (G.EdgeIndex(ei), lambda a: A.EdgeWeighted(a, w), edge_adjacency(ei, N, M, w), None,
                {"edge_weight": w})
    if name == "dense_weights":
        w = torch.rand(N, M, generator=gen, dtype=torch.float64) * 2
        w[torch.rand(N, M, generator=gen) > 0.8] = 0.0
        w = _leaf(w)
        return None, lambda a: A.EdgeWeighted(a, w), w, None, {"dense_weight": w}
    raise ValueError(name)


GRAPHS = ["complete", "mask", "float_mask", "exclude_self", "mask_and_self", "window", "criss_cross", "knn",
          "edge_index", "edge_index_weighted", "dense_weights"]


def _inputs(gen):
    q = _leaf(torch.randn(*LEAD, N, D, generator=gen, dtype=torch.float64))
    k = _leaf(torch.randn(*LEAD, M, D, generator=gen, dtype=torch.float64))
    v = _leaf(torch.randn(*LEAD, M, E, generator=gen, dtype=torch.float64))
    return q, k, v


def _cases():
    cases = []
    for a in AFFINITIES:
        for g in GRAPHS:
            gen = torch.Generator().manual_seed(0)
            q, k, v = _inputs(gen)
            aff, *_ = make_affinity(a, gen)
            graph, wrap, *_ = make_graph(g, gen)
            aff = wrap(aff)
            aff2, graph2 = nlgraph.core.lower_edge_weights(aff, graph, N, M)
            for b in nlgraph.dispatch.exact_backends(q, k, v, aff2, graph2):
                cases.append(pytest.param(a, g, b, id=f"{a}-{g}-{b}"))
    return cases


CASES = _cases()


def test_coverage_of_backends():
    """chunked, reference (and pyg when installed) cover every affinity x graph, except where chunked
    says why not."""
    ids = {c.id for c in CASES}
    for a in AFFINITIES:
        for g in GRAPHS:
            assert f"{a}-{g}-reference" in ids
            if g != "edge_index_weighted":
                assert f"{a}-{g}-chunked" in ids, f"{a}-{g}"
            if nlgraph._optional.optional("torch_geometric") is not None:
                assert f"{a}-{g}-pyg" in ids, f"{a}-{g}"
    assert "dot-complete-algebra" in ids and "concat-exclude_self-algebra" in ids


@pytest.mark.parametrize("aff_name,graph_name,backend", CASES)
def test_backend_matches_formula(aff_name, graph_name, backend):
    gen = torch.Generator().manual_seed(0)
    q, k, v = _inputs(gen)
    aff, kind, params, aff_tensors = make_affinity(aff_name, gen)
    graph, wrap, adj, bias, graph_tensors = make_graph(graph_name, gen)
    aff = wrap(aff)
    options = CHUNK_OPTIONS if backend == "chunked" else None

    y = nlgraph.aggregate(q, k, v, aff, graph, backend=backend, options=options)
    y_ref = aggregate_formula(kind, q, k, v, params, adj=adj, bias=bias)
    rtol, atol = TOLERANCES[torch.float64]
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol, msg=lambda m: f"forward: {m}")
    assert torch.isfinite(y).all()

    named = {"query": q, "key": k, "value": v, **aff_tensors, **graph_tensors}
    dout = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, list(named.values()), dout, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, list(named.values()), dout, allow_unused=True)
    for (name, t), g, g_ref in zip(named.items(), grads, grads_ref, strict=True):
        g = torch.zeros_like(t) if g is None else g
        g_ref = torch.zeros_like(t) if g_ref is None else g_ref
        assert torch.isfinite(g).all(), f"non-finite gradient for {name}"
        if name == "dense_weight":
            # Documented convention: a zero weight removes the edge and gets a zero gradient.
            g_ref = torch.where(t.detach() > 0, g_ref, torch.zeros_like(g_ref))
        torch.testing.assert_close(g, g_ref, rtol=rtol, atol=atol, msg=lambda m: f"d/d{name}: {m}")


@pytest.mark.parametrize("backend", ["chunked", "reference", "algebra"])
@pytest.mark.parametrize("kind", ["softmax", "dot"])
def test_broadcast_leading_dims(backend, kind):
    """(B, 1, N, d) queries with (1, H, M, d) keys, as SDPA broadcasts."""
    gen = torch.Generator().manual_seed(1)
    q = _leaf(torch.randn(2, 1, 7, D, generator=gen, dtype=torch.float64))
    k = _leaf(torch.randn(1, 3, 9, D, generator=gen, dtype=torch.float64))
    v = _leaf(torch.randn(1, 3, 9, E, generator=gen, dtype=torch.float64))
    aff = A.Softmax() if kind == "softmax" else A.DotProduct()
    if backend == "algebra" and kind == "softmax":
        pytest.skip("algebra has no closed form for softmax")
    options = CHUNK_OPTIONS if backend == "chunked" else None
    y = nlgraph.aggregate(q, k, v, aff, backend=backend, options=options)
    assert y.shape == (2, 3, 7, E)
    y_ref = aggregate_formula(kind, q, k, v, {})
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)  # float64 bound (formulas.TOLERANCES)
    dout = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, (q, k, v), dout)
    grads_ref = torch.autograd.grad(y_ref, (q, k, v), dout)
    for name, g, gr in zip("qkv", grads, grads_ref, strict=True):
        # float64 bound (formulas.TOLERANCES)
        torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-10, msg=lambda m: f"d/d{name}: {m}")


def test_cross_attention_rectangular():
    """N != M with a bool mask on every backend that can run it."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(3, 10, D, generator=gen, dtype=torch.float64)
    k = torch.randn(3, 17, D, generator=gen, dtype=torch.float64)
    v = torch.randn(3, 17, E, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 10, 17, generator=gen) > 0.5
    y_ref = aggregate_formula("softmax", q, k, v, {}, adj=mask.double())
    for b in nlgraph.dispatch.exact_backends(q, k, v, A.Softmax(), G.Mask(mask)):
        y = nlgraph.aggregate(q, k, v, graph=G.Mask(mask), backend=b,
                              options={"block_n": 3, "block_m": 5} if b == "chunked" else None)
        # float64 bound (formulas.TOLERANCES)
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10, msg=lambda m: f"{b}: {m}")


def test_large_logit_softmax_matches_formula_in_float64():
    """Online softmax stays exact where exp() of the raw logits would overflow."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 20, 4, generator=gen, dtype=torch.float64) * 30
    k = torch.randn(1, 20, 4, generator=gen, dtype=torch.float64) * 30
    v = torch.randn(1, 20, 2, generator=gen, dtype=torch.float64)
    y = nlgraph.aggregate(q, k, v, A.Softmax(scale=1.0), backend="chunked",
                          options={"block_n": 4, "block_m": 3})
    y_ref = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)  # float64 bound (formulas.TOLERANCES)
