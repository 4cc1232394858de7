"""Regression tests for issue 13's core defects (3, 4, 5, 7, 8, 9), each against something independent.

The independent side is a materialised float64 formula written in the tests (``tests/formulas.py``)
with adjacency matrices built from the definitions, or the behaviour the README documents.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nlgraph
from nlgraph import affinity as A
from nlgraph import cli
from nlgraph import graph as G

from .formulas import TOLERANCES, edge_adjacency, window_adjacency
from .test_properties import formula


def aggregate_formula(kind, q, k, v, params, adj=None, bias=None):
    """The materialised formula of the property tests (every tensor broadcasts)."""
    return formula(kind, q, k, v, params, adj, bias)

F64 = torch.float64
RTOL, ATOL = TOLERANCES[F64]


def _qkv(n=5, m=6, d=3, e=2, lead=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*lead, s, w, generator=gen, dtype=F64).requires_grad_(True)
            for s, w in ((n, d), (m, d), (m, e))]


def _grads(y, leaves, seed=1):
    dout = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    return torch.autograd.grad(y, leaves, dout, allow_unused=True)


def _assert_matches(fn, ref, leaves, what):
    """fn() == ref(), forward and the gradient of every leaf."""
    y, y_ref = fn(), ref()
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"forward, {what}: {m}")
    for i, (g, g_ref) in enumerate(zip(_grads(y, leaves), _grads(y_ref, leaves), strict=True)):
        g = torch.zeros_like(leaves[i]) if g is None else g
        g_ref = torch.zeros_like(leaves[i]) if g_ref is None else g_ref
        torch.testing.assert_close(g, g_ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"grad {i}, {what}: {m}")


# ---- defect 3: the pyg backend ------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 6), (5, 1), (1, 1), (1, 5, 6)])
def test_pyg_broadcast_bool_mask(shape):
    """A (1, M) / (N, 1) / (1, 1) bool mask applies to every query (pyg kept the first query's row only)."""
    q, k, v = _qkv()
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[..., 0] = True
    _assert_matches(lambda: nlgraph.aggregate(q, k, v, graph=G.Mask(mask), backend="pyg"),
                    lambda: aggregate_formula("softmax", q, k, v, {}, adj=mask.to(F64)), [q, k, v],
                    f"{shape}")


def test_auto_dispatch_of_edge_index_and_broadcast_mask():
    """Auto dispatch sends EdgeIndex & Mask(1, M) to pyg: it must equal the formula (was off by 3.1)."""
    q, k, v = _qkv()
    ei = torch.tensor([[0, 1, 1, 2, 3, 5, 4], [0, 0, 0, 1, 4, 2, 3]])
    mask = torch.tensor([[True, False, True, True, False, True]])
    graph = G.EdgeIndex(ei) & G.Mask(mask)
    assert nlgraph.select_backend(q, k, v, A.Softmax(), graph)[0] == "pyg"
    adj = edge_adjacency(ei, 5, 6) * mask.to(F64)
    _assert_matches(lambda: nlgraph.aggregate(q, k, v, graph=graph),
                    lambda: aggregate_formula("softmax", q, k, v, {}, adj=adj), [q, k, v], "auto")


@pytest.mark.parametrize("aff,kind", [(A.Softmax(), "softmax"), (A.DotProduct(), "dot"),
                                      (A.Gaussian(1.0, normalize=False), "gaussian_unnorm")])
def test_pyg_keeps_edge_index_multiplicities_inside_intersections(aff, kind):
    """Parallel edges of an EdgeIndex count in an intersection also when another member is sparser."""
    q, k, v = _qkv()
    ei = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 5, 5, 4], [0, 0, 0, 0, 0, 1, 4, 2, 2, 3]])
    sparse = torch.zeros(5, 6, dtype=torch.bool)
    sparse[0, :2] = sparse[2, 5] = sparse[1, 2] = True  # fewer edges than the EdgeIndex: enumerated first
    adj = edge_adjacency(ei, 5, 6) * sparse.to(F64)
    params = {"bandwidth": 1.0} if kind.startswith("gaussian") else {}
    for graph in (G.EdgeIndex(ei) & G.Mask(sparse), G.Mask(sparse) & G.EdgeIndex(ei)):
        _assert_matches(lambda: nlgraph.aggregate(q, k, v, aff, graph, backend="pyg"),
                        lambda: aggregate_formula(kind, q, k, v, params, adj=adj), [q, k, v], repr(graph))


def test_pyg_batched_inputs_with_no_edges():
    """Zero edges with batched inputs: zeros, zero gradients (was `cannot reshape tensor of 0 elements`)."""
    q, k, v = _qkv(lead=(2, 3))
    graph = G.EdgeIndex(torch.zeros(2, 0, dtype=torch.long))
    y = nlgraph.aggregate(q, k, v, graph=graph, backend="pyg")
    assert torch.equal(y, torch.zeros(2, 3, 5, 2, dtype=F64))
    assert all(g is None or not g.any() for g in _grads(y, [q, k, v]))


# ---- defect 4: count normalisation with weights that broadcast over keys --------------------------

@pytest.mark.parametrize("shape", [(5, 1), (1, 1), (2, 5, 1)])
@pytest.mark.parametrize("how", ["float_mask", "edge_weighted"])
@pytest.mark.parametrize("kind", ["dot", "concat"])
def test_count_normalisation_with_weights_broadcast_over_keys(shape, how, kind):
    """C_i = sum over all M keys of w_ij, also when w is (N, 1) or (1, 1) (was M times too large)."""
    q, k, v = _qkv(lead=(2,))
    gen = torch.Generator().manual_seed(4)
    w = (torch.rand(shape, generator=gen, dtype=F64) + 0.5).requires_grad_(True)
    weight = torch.linspace(-1, 1, 6, dtype=F64).requires_grad_(True) if kind == "concat" else None
    aff = A.DotProduct() if kind == "dot" else A.Concatenation(weight)
    params = {} if kind == "dot" else {"weight": weight}
    leaves = [q, k, v, w] + ([weight] if weight is not None else [])
    for backend in nlgraph.dispatch.exact_backends(q, k, v, aff, G.Mask(torch.log(w.detach()))):
        if how == "float_mask":
            logw = w.log()
            fn = lambda: nlgraph.aggregate(q, k, v, aff, G.Mask(w.log()), backend=backend)  # noqa: E731
            ref = lambda: aggregate_formula(kind, q, k, v, params, bias=logw.expand(2, 5, 6))  # noqa: E731
        else:
            fn = lambda: nlgraph.aggregate(q, k, v, A.EdgeWeighted(aff, w), backend=backend)  # noqa: E731
            ref = lambda: aggregate_formula(kind, q, k, v, params, adj=w.expand(2, 5, 6))  # noqa: E731
        _assert_matches(fn, ref, leaves, f"{backend}, {how} {shape}")


# ---- defect 5: batch dims on value only -----------------------------------------------------------

@pytest.mark.parametrize("graph", [None, "mask", "window"])
def test_value_only_batch_dims(graph):
    """q (3, 4), k (3, 4), v (1, 3, 2) (chunked raised in its in-place tile update)."""
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(3, 4, generator=gen, dtype=F64).requires_grad_(True) for _ in range(2))
    v = torch.randn(2, 3, 2, generator=gen, dtype=F64).requires_grad_(True)
    adj = None
    g = None
    if graph == "mask":
        mask = torch.tensor([[True, False, True], [False, True, True], [True, True, False]])
        g, adj = G.Mask(mask), mask.to(F64)
    elif graph == "window":
        g, adj = G.LocalWindow((3,), 1), window_adjacency((3,), 1).to(F64)
    for aff, kind in ((A.Softmax(), "softmax"), (A.Gaussian(1.2, normalize=False), "gaussian_unnorm"),
                      (A.DotProduct(), "dot")):
        for backend in nlgraph.dispatch.exact_backends(q, k, v, aff, g):
            opts = {"block_n": 2, "block_m": 2} if backend == "chunked" else None
            _assert_matches(lambda: nlgraph.aggregate(q, k, v, aff, g, backend=backend, options=opts),
                            lambda: aggregate_formula(kind, q, k, v, {"bandwidth": 1.2}, adj=adj), [q, k, v],
                            f"{backend} {aff!r}")


# ---- defect 7: gradients of empty neighbourhoods and zero-weight parallel edges --------------------

@pytest.mark.parametrize("aff", [A.DotProduct(), A.Concatenation(torch.tensor([0.5, -1.0], dtype=F64))])
def test_algebra_exclude_self_single_node_keeps_the_graph(aff):
    """N = M = 1 with ExcludeSelf: zeros that are still differentiable (zero gradients), as on reference."""
    x = torch.randn(1, 1, dtype=F64, requires_grad=True)
    y = nlgraph.aggregate(x, x, x, aff, G.ExcludeSelf(), backend="algebra")
    assert y.requires_grad and torch.equal(y, torch.zeros(1, 1, dtype=F64))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.zeros_like(x))
    y_ref = nlgraph.aggregate(x, x, x, aff, G.ExcludeSelf(), backend="reference")
    assert torch.equal(torch.autograd.grad(y_ref.sum(), x)[0], g)


@pytest.mark.parametrize("backend", ["reference", "pyg"])
def test_zero_weight_parallel_edge_gets_zero_gradient(backend):
    """README: an edge of weight exactly 0 is removed and its weight gets a zero gradient, also when a
    parallel edge keeps the pair (the reference gave it the pair's gradient)."""
    q, k, v = _qkv(n=3, m=3)
    ei = torch.tensor([[0, 0, 1, 2], [1, 1, 1, 0]])  # edges 0 and 1 are parallel (0 -> 1)
    w = torch.tensor([1.3, 0.0, 0.7, 2.0], dtype=F64, requires_grad=True)
    aff = A.EdgeWeighted(A.Gaussian(1.0, normalize=False), w)
    y = nlgraph.aggregate(q, k, v, aff, G.EdgeIndex(ei), backend=backend)
    g = _grads(y, [w])[0]
    assert g[1] == 0.0
    # the other weights' gradients are those of the graph without the removed edge
    keep = torch.tensor([0, 2, 3])
    y_ref = aggregate_formula("gaussian_unnorm", q, k, v, {"bandwidth": 1.0},
                              adj=edge_adjacency(ei[:, keep], 3, 3, w[keep]))
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(g[keep], _grads(y_ref, [w])[0][keep], rtol=RTOL, atol=ATOL)


# ---- defect 8: graphs and affinities and the caller's tensors --------------------------------------

def test_float_mask_edited_to_nan_after_construction_is_rejected_at_the_call():
    q, k, v = _qkv()
    bias = torch.zeros(5, 6, dtype=F64)
    graph = G.Mask(bias)
    bias[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"Mask\(mask\) float entries must be finite or -inf"):
        nlgraph.aggregate(q, k, v, graph=graph)


def test_trainable_float_mask_follows_in_place_updates_and_gets_gradients():
    """A Mask built once from a parameter sees each optimiser step, and its gradient reaches the parameter."""
    q, k, v = _qkv()
    bias = torch.nn.Parameter(torch.randn(5, 6, dtype=F64))
    graph = G.Mask(bias)
    opt = torch.optim.SGD([bias], lr=0.5)
    for _ in range(2):
        y = nlgraph.aggregate(q, k, v, graph=graph, backend="chunked")
        y_ref = aggregate_formula("softmax", q, k, v, {}, bias=bias)
        torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
        (g_ref,) = torch.autograd.grad(y_ref.sum(), bias)
        opt.zero_grad()
        y.sum().backward()
        torch.testing.assert_close(bias.grad, g_ref, rtol=RTOL, atol=ATOL)
        opt.step()


def test_edge_index_edited_in_place_keeps_the_graph_it_was_built_with():
    """The edge list is the graph's own copy: chunked and pyg agree with the formula of the original edges
    (they disagreed by 2.9 after an in-place edit)."""
    q, k, v = _qkv()
    ei = torch.tensor([[0, 1, 2, 3, 3], [0, 1, 2, 4, 4]])
    original = ei.clone()
    graph = G.EdgeIndex(ei)
    ei[0, 0] = 5
    ei[1, 3] = 0
    y_ref = aggregate_formula("softmax", q, k, v, {}, adj=edge_adjacency(original, 5, 6))
    for backend in ("chunked", "pyg", "reference"):
        torch.testing.assert_close(nlgraph.aggregate(q, k, v, graph=graph, backend=backend), y_ref,
                                   rtol=RTOL, atol=ATOL, msg=lambda m: f"{backend}: {m}")


def test_knn_index_edited_past_m_keeps_the_graph_it_was_built_with():
    q, k, v = _qkv()
    index = torch.tensor([[0, 1], [2, -1], [3, 3], [5, 4], [0, 5]])
    adj = torch.zeros(5, 6, dtype=F64)
    for i, row in enumerate(index.tolist()):
        for j in row:
            if j >= 0:
                adj[i, j] = 1.0
    graph = G.KNN(index)
    index[0, 0] = 60  # past M: the graph keeps its own checked copy
    for backend in ("chunked", "pyg", "reference"):
        torch.testing.assert_close(nlgraph.aggregate(q, k, v, graph=graph, backend=backend),
                                   aggregate_formula("softmax", q, k, v, {}, adj=adj), rtol=RTOL, atol=ATOL)


def test_grid_order_edited_in_place_keeps_the_graph():
    order = G.blocked_order((3, 4), 2)
    graph = G.LocalWindow((3, 4), 1, order=order)
    expected = window_adjacency((3, 4), 1).bool()[order][:, order]
    order[:2] = order[:2].flip(0)
    assert torch.equal(graph.dense(12, 12), expected)


@pytest.mark.parametrize("edit", ["edge_weight", "edge_weighted", "bandwidth", "scale"])
def test_value_tensors_are_rechecked_at_every_call(edit):
    """Parameters and weights edited to invalid values after construction raise at the next call."""
    q, k, v = _qkv()
    ei = torch.tensor([[0, 1], [1, 2]])
    w = torch.ones(2, dtype=F64)
    dense = torch.ones(5, 6, dtype=F64)
    b = torch.ones(3, dtype=F64)
    s = torch.tensor(0.5, dtype=F64)
    case = {"edge_weight": (A.Softmax(), G.EdgeIndex(ei, edge_weight=w), w, -1.0,
                            r"EdgeIndex\(edge_weight\)"),
            "edge_weighted": (A.EdgeWeighted(A.Softmax(), dense), None, dense, math.nan,
                              r"EdgeWeighted\(weight\)"),
            "bandwidth": (A.Gaussian(b), None, b, 0.0, r"Gaussian\(bandwidth\) must be finite and > 0"),
            "scale": (A.Softmax(scale=s), None, s, math.inf, r"Softmax\(scale\) must be finite")}[edit]
    aff, graph, tensor, bad, message = case
    nlgraph.aggregate(q, k, v, aff, graph)  # valid as built
    tensor.view(-1)[0] = bad
    with pytest.raises(ValueError, match=message):
        nlgraph.aggregate(q, k, v, aff, graph)


# ---- defect 9: clear errors -----------------------------------------------------------------------

def test_scalar_parameters_must_be_scalars():
    with pytest.raises(ValueError, match=r"DotProduct\(scale\) must be a scalar \(one entry\), got shape"):
        A.DotProduct(scale=torch.ones(2))
    with pytest.raises(ValueError, match=r"Concatenation\(bias\) must be a scalar \(one entry\), got shape"):
        A.Concatenation(torch.ones(6), bias=torch.ones(2))
    with pytest.raises(ValueError, match=r"EdgeWeighted\(weight\) must be \(E,\) per edge or dense"):
        A.EdgeWeighted(A.Softmax(), torch.tensor(2.0))


def test_leading_dims_of_weights_and_masks_must_broadcast():
    q, k, v = _qkv(lead=(2,))
    with pytest.raises(ValueError, match=r"EdgeWeighted\(weight\) has shape \(3, 5, 6\): its leading dims"):
        nlgraph.aggregate(q, k, v, A.EdgeWeighted(A.Softmax(), torch.ones(3, 5, 6, dtype=F64)))
    with pytest.raises(ValueError, match=r"leading dims \(3,\) that do not broadcast with the inputs'"):
        nlgraph.aggregate(q, k, v, graph=G.Mask(torch.ones(3, 5, 6, dtype=torch.bool)))
    both = G.Mask(torch.ones(3, 5, 6, dtype=torch.bool)) & G.Mask(torch.ones(4, 5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"batch dims \[\(3,\), \(4,\)\] that do not broadcast"):
        nlgraph.aggregate(q[0], k[0], v[0], graph=both)


def test_local_window_radius():
    """A radius past the grid reaches the whole grid (was an int32 overflow); a float one is a TypeError."""
    graph = G.LocalWindow((3, 4), 2**31)
    assert graph.radius == (2, 3)
    assert torch.equal(graph.dense(12, 12), torch.ones(12, 12, dtype=torch.bool))
    assert torch.equal(G.LocalWindow((3, 4), (0, 2**40)).dense(12, 12), window_adjacency((3, 4), 0).bool()
                       | torch.tensor([[i // 4 == j // 4 for j in range(12)] for i in range(12)]))
    with pytest.raises(TypeError, match=r"LocalWindow\(radius\) must be an int or a sequence of 2 ints"):
        G.LocalWindow((3, 4), 1.5)
    with pytest.raises(TypeError, match=r"LocalWindow\(radius\)"):
        G.LocalWindow((3, 4), (1, True))
    with pytest.raises(ValueError, match=r"LocalWindow\(radius\) must be an int >= 0 or 2 of them"):
        G.LocalWindow((3, 4), (1, 2, 3))


def test_knn_from_points_bad_input():
    pts = torch.randn(6, 2)
    bad = pts.clone()
    bad[2, 1] = math.nan
    with pytest.raises(ValueError, match=r"KNN.from_points\(query_points\) contains NaN or Inf"):
        G.KNN.from_points(bad, k=2)
    with pytest.raises(ValueError, match=r"KNN.from_points\(key_points\) contains NaN or Inf"):
        G.KNN.from_points(pts, bad.clone().fill_(math.inf), k=2)
    for chunk in (0, -3, 1.5):
        with pytest.raises(ValueError, match=r"KNN.from_points\(chunk\) must be a positive int"):
            G.KNN.from_points(pts, k=2, chunk=chunk)


def test_denoise_nl_means_parameters_that_overflow():
    from nlgraph.denoise import denoise_nl_means

    image = np.random.default_rng(0).random((12, 12))
    with pytest.raises(ValueError, match=r"sigma=1e\+200 is too large for h=0.1"):
        denoise_nl_means(image, patch_size=3, patch_distance=2, sigma=1e200)
    with pytest.raises(ValueError, match=r"h=1e-200 is too small for this image"):
        denoise_nl_means(image, patch_size=3, patch_distance=2, h=1e-200)


@pytest.mark.parametrize("argv,message", [
    (["demo", "--seed", "-5"], "argument --seed: must be in [0, 2**64), got -5"),
    (["demo", "--seed", "x"], "argument --seed: must be an integer, got 'x'"),
    (["demo", "--out", "/proc/x.png"], "nlgraph demo: cannot write the figure to '/proc/x.png'"),
])
def test_cli_demo_bad_arguments_are_one_line_errors(argv, message, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own usage error
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("nlgraph")]) == 1
