"""Graph descriptions == adjacency built independently in the tests; dispatch behaviour."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import nlgraph
from nlgraph import affinity as A
from nlgraph import dispatch
from nlgraph import graph as G

from .formulas import criss_cross_adjacency, edge_adjacency, window_adjacency


@pytest.mark.parametrize("shape,radius", [((7,), 2), ((3, 4), 1), ((4, 5), 2), ((2, 3, 3), 1)])
def test_local_window_dense(shape, radius):
    assert torch.equal(G.LocalWindow(shape, radius).dense(*(2 * [int(torch.tensor(shape).prod())])),
                       window_adjacency(shape, radius).bool())


def test_local_window_per_axis_radius():
    g = G.LocalWindow((3, 5), radius=(0, 1))
    dense = g.dense(15, 15)
    for i in range(15):
        for j in range(15):
            assert bool(dense[i, j]) == (i // 5 == j // 5 and abs(i % 5 - j % 5) <= 1)


def test_criss_cross_dense():
    assert torch.equal(G.CrissCross((3, 4)).dense(12, 12), criss_cross_adjacency(3, 4).bool())


def test_knn_from_points_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(3, 50, 3, generator=gen, dtype=torch.float64)
    g = G.KNN.from_points(pts, k=5, exclude_self=True, chunk=16)
    d2 = ((pts[..., :, None, :] - pts[..., None, :, :]) ** 2).sum(-1)
    d2 = d2 + torch.diag(torch.full((50,), float("inf"), dtype=torch.float64))
    expect = torch.zeros(3, 50, 50, dtype=torch.bool)
    expect.scatter_(-1, d2.argsort(-1)[..., :5], True)
    assert torch.equal(g.dense(50, 50), expect)


def test_knn_padding_and_duplicates():
    idx = torch.tensor([[0, 0, -1], [2, 1, -1], [-1, -1, -1]])
    dense = G.KNN(idx).dense(3, 3)
    assert dense.tolist() == [[True, False, False], [False, True, True], [False, False, False]]


def test_edge_index_dense_and_duplicates_count_twice():
    ei = torch.tensor([[0, 1, 1, 2], [1, 0, 0, 2]])
    g = G.EdgeIndex(ei)
    assert torch.equal(g.block(0, 3, 0, 3, torch.device("cpu")), edge_adjacency(ei, 3, 3).float())
    # duplicate edge 1 -> 0 is counted twice by the count normalisation, like PyG's sum
    q = torch.randn(3, 2, dtype=torch.float64)
    v = torch.tensor([[1.0], [10.0], [100.0]], dtype=torch.float64)
    y = nlgraph.aggregate(q, q, v, A.Concatenation(torch.zeros(4, dtype=torch.float64), bias=1.0), g)
    assert y[0].item() == pytest.approx(10.0) and y[1].item() == pytest.approx(1.0)


def test_intersection_flattens_and_adds_biases():
    b1, b2 = torch.randn(4, 4), torch.randn(4, 4)
    g = G.Mask(b1) & G.Complete() & (G.ExcludeSelf() & G.Mask(b2))
    assert isinstance(g, G.Intersection) and len(g.graphs) == 3
    torch.testing.assert_close(g.dense_bias(), b1 + b2, rtol=0, atol=0)  # one float32 addition: exact
    assert torch.equal(g.dense(4, 4), ~torch.eye(4, dtype=torch.bool))


def test_dispatch_priorities():
    q = k = torch.randn(2, 10, 4)
    v = torch.randn(2, 10, 3)
    assert dispatch.select_backend(q, k, v, A.DotProduct(), None)[0] == "algebra"
    assert dispatch.select_backend(q, k, v, A.Concatenation(torch.randn(8)), G.ExcludeSelf())[0] == "algebra"
    assert dispatch.select_backend(q, k, v, A.DotProduct(), G.LocalWindow((10,), 1))[0] == "chunked"
    assert dispatch.select_backend(q, k, v, A.Softmax(), None)[0] == "sdpa"  # torch's own kernels first
    assert dispatch.select_backend(q, k, v, A.Softmax(), G.LocalWindow((10,), 1))[0] == "grid"
    w = torch.rand(5, requires_grad=True)
    g = G.EdgeIndex(torch.randint(0, 10, (2, 5)), edge_weight=w)
    # chunked cannot differentiate EdgeIndex weights: pyg (when installed) or the reference takes it
    expected = "pyg" if nlgraph._optional.optional("torch_geometric") else "reference"
    assert dispatch.select_backend(q, k, v, A.Softmax(), g)[0] == expected
    ok, reason = nlgraph.dispatch.get_backend("chunked").can_run(q, k, v, A.Softmax(), g)
    assert not ok and "per-edge weights" in reason


def test_new_backend_is_one_module_plus_one_registration(monkeypatch):
    calls = []
    mod = types.ModuleType("fake_backend")
    mod.can_run = lambda q, k, v, a, g: (isinstance(a, A.Gaussian), "gaussians only")
    mod.run = lambda q, k, v, a, g, **o: calls.append(o) or torch.zeros(*q.shape[:-1], v.shape[-1])
    monkeypatch.setitem(sys.modules, "fake_backend", mod)
    monkeypatch.setitem(dispatch._REGISTRY, "fake", "fake_backend")
    monkeypatch.delitem(dispatch._MODULES, "fake", raising=False)
    q = torch.randn(4, 2)
    assert "fake" in nlgraph.backend_names()
    assert "fake" in nlgraph.compatible_backends(q, q, q, A.Gaussian(1.0), None)
    assert "fake" not in nlgraph.compatible_backends(q, q, q, A.Softmax(), None)
    nlgraph.aggregate(q, q, q, A.Gaussian(1.0), backend="fake", options={"flag": 1})
    assert calls == [{"flag": 1}]
    with pytest.raises(nlgraph.BackendError, match="gaussians only"):
        nlgraph.aggregate(q, q, q, A.Softmax(), backend="fake")


def test_blocked_order_is_a_block_major_permutation():
    order = G.blocked_order((5, 7), 2)
    assert torch.equal(torch.sort(order).values, torch.arange(35))
    # the first block is the 2x2 top-left corner, in row-major order
    assert order[:4].tolist() == [0, 1, 7, 8]
    # a window graph in this order is the row-major graph with its nodes permuted
    dense = G.LocalWindow((5, 7), 1).dense(35, 35)
    assert torch.equal(G.LocalWindow((5, 7), 1, order=order).dense(35, 35), dense[order][:, order])
    with pytest.raises(ValueError, match=r"blocked_order\(block\) must be a positive int, got 0"):
        G.blocked_order((5, 7), 0)


def test_grid_order_must_be_a_permutation():
    with pytest.raises(ValueError,
                       match=r"LocalWindow\(order\) must be an int64 permutation of shape \(6,\)"):
        G.LocalWindow((2, 3), 1, order=torch.arange(5))
    with pytest.raises(ValueError, match=r"LocalWindow\(order\) must be a permutation of 0..5"):
        G.LocalWindow((2, 3), 1, order=torch.zeros(6, dtype=torch.long))
