"""The pyg backend and graph conversions: equal to the dense op; graph attention is the same operation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import nlgraph
from nlgraph import affinity as A
from nlgraph import graph as G

pyg = pytest.importorskip("torch_geometric", reason="torch-geometric (test dependency) not installed")

# float64 rounding bound, derived in tests/formulas.py (TOLERANCES)
TOL = dict(rtol=1e-9, atol=1e-10)


def _leaves(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_(True) for s in shapes]


def _fwd_bwd(fn, leaves):
    y = fn(*leaves)
    gen = torch.Generator().manual_seed(7)
    grads = torch.autograd.grad(y, leaves, torch.randn(y.shape, generator=gen, dtype=y.dtype))
    return y, grads


def _assert_same(a, b):
    (ya, ga), (yb, gb) = a, b
    torch.testing.assert_close(ya, yb, **TOL)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("aff", [A.Softmax(), A.Gaussian(1.3), A.Gaussian(1.3, normalize=False),
                                 A.DotProduct()])
def test_complete_edge_index_equals_dense_op(aff):
    n = 17
    ei, _ = G.Complete().edges(n, n, torch.device("cpu"))
    assert ei.shape == (2, n * n)
    leaves = _leaves((2, n, 4), (2, n, 4), (2, n, 3))
    dense = _fwd_bwd(lambda q, k, v: nlgraph.aggregate(q, k, v, aff, backend="chunked"), leaves)
    sparse = _fwd_bwd(lambda q, k, v: nlgraph.aggregate(q, k, v, aff, G.EdgeIndex(ei), backend="pyg"), leaves)
    _assert_same(sparse, dense)


@pytest.mark.parametrize("graph", [G.LocalWindow((5, 6), 1), G.LocalWindow((3, 4, 3), (0, 1, 1)),
                                   G.CrissCross((5, 6)), "knn"])
def test_sparse_graphs_equal_dense_op_with_the_matching_mask(graph):
    n = 30 if graph != "knn" else 30
    if graph == "knn":
        graph = G.KNN.from_points(torch.randn(n, 2, generator=torch.Generator().manual_seed(3)), k=5)
    n = graph.dense(36, 36).shape[0] if isinstance(graph, G.LocalWindow) and len(graph.shape) == 3 else n
    leaves = _leaves((2, n, 4), (2, n, 4), (2, n, 3))
    mask = G.Mask(graph.dense(n, n))
    for aff in (A.Softmax(), A.Concatenation(torch.linspace(-1, 1, 8, dtype=torch.float64))):
        dense = _fwd_bwd(lambda q, k, v: nlgraph.aggregate(q, k, v, aff, mask, backend="chunked"), leaves)
        sparse = _fwd_bwd(lambda q, k, v: nlgraph.aggregate(q, k, v, aff, graph, backend="pyg"), leaves)
        _assert_same(sparse, dense)


def test_node_without_incoming_edges_gets_zeros():
    ei = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 1]])  # node 0 receives nothing
    q, k, v = _leaves((4, 3), (4, 3), (4, 2))
    for aff in (A.Softmax(), A.DotProduct(), A.Gaussian(1.0, normalize=False)):
        y = nlgraph.aggregate(q, k, v, aff, G.EdgeIndex(ei), backend="pyg")
        assert torch.equal(y[0], torch.zeros(2, dtype=torch.float64))
        assert all(torch.isfinite(g).all() for g in torch.autograd.grad(y.sum(), (q, k, v)))


def test_transformer_conv_is_the_core_op():
    """torch_geometric.nn.TransformerConv (1 head, no root weight, no beta) == aggregate(Softmax,
    EdgeIndex)."""
    from torch_geometric.nn import TransformerConv

    torch.manual_seed(0)
    n, c, out = 25, 6, 5
    conv = TransformerConv(c, out, heads=1, root_weight=False, beta=False).double()
    x = torch.randn(n, c, dtype=torch.float64)
    ei = torch.randint(0, n, (2, 90))
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_conv = conv(x1, ei)
    q, k, v = conv.lin_query(x2), conv.lin_key(x2), conv.lin_value(x2)
    y_ours = nlgraph.aggregate(q, k, v, A.Softmax(), G.EdgeIndex(ei), backend="pyg")
    torch.testing.assert_close(y_ours, y_conv, **TOL)
    dy = torch.randn_like(y_conv)
    torch.testing.assert_close(torch.autograd.grad(y_ours, x2, dy)[0], torch.autograd.grad(y_conv, x1, dy)[0],
                               **TOL)
    # and through the dense path with the matching mask (duplicate edges counted twice, as PyG sums them)
    y_dense = nlgraph.aggregate(q, k, v, A.Softmax(), G.EdgeIndex(ei), backend="chunked")
    torch.testing.assert_close(y_dense, y_conv, **TOL)


def test_dispatch_prefers_pyg_for_sparse_graphs_where_measured_faster():
    n = 64 * 64
    q = torch.randn(1, n, 8)
    v = torch.randn(1, n, 4)
    # windows and criss-cross go to the grid backend (nlgraph bench grid); pyg keeps them where grid
    # cannot run them (a permuted node order, count-normalised affinities); k-NN goes to pyg
    assert nlgraph.select_backend(q, q, v, A.Softmax(), G.LocalWindow((64, 64), 2))[0] == "grid"
    assert nlgraph.select_backend(q, q, v, A.Softmax(), G.CrissCross((64, 64)))[0] == "grid"
    assert nlgraph.select_backend(q, q, v, A.DotProduct(), G.CrissCross((64, 64)))[0] == "pyg"
    order = G.blocked_order((64, 64), 8)
    window = G.LocalWindow((64, 64), 2, order=order)
    assert nlgraph.select_backend(q, q, v, A.Softmax(), window)[0] == "chunked"
    knn = G.KNN(torch.randint(0, n, (n, 8)))
    assert nlgraph.select_backend(q, q, v, A.Softmax(), knn)[0] == "pyg"
    wide = torch.randn(1, n, 1024)
    knn64 = G.KNN(torch.randint(0, n, (n, 64)))  # 262k edges x (2 * 1024 + 4) gathered elements > 2^27
    assert nlgraph.select_backend(wide, wide, v, A.Softmax(), knn64)[0] == "chunked"
    edges = G.EdgeIndex(torch.randint(0, n, (2, 1000)))
    assert nlgraph.select_backend(q, q, v, A.Softmax(), edges)[0] == "pyg"
    assert nlgraph.select_backend(q, q, v, A.Softmax(), None)[0] == "sdpa"
    small = torch.randn(1, 20, 8)
    small_window = G.LocalWindow((4, 5), 2)
    assert nlgraph.select_backend(small, small, small, A.DotProduct(), small_window)[0] == "chunked"
    batched_knn = G.KNN(torch.zeros(2, 20, 3, dtype=torch.long))
    ok, reason = nlgraph.dispatch.get_backend("pyg").can_run(small, small, small, A.Softmax(), batched_knn)
    assert not ok and "batch dims" in reason


def test_edge_index_weight_gradients_on_pyg_equal_reference():
    ei = torch.randint(0, 9, (2, 30), generator=torch.Generator().manual_seed(1))
    q, k, v = _leaves((9, 3), (9, 3), (9, 2))
    w = torch.rand(30, dtype=torch.float64, requires_grad=True)
    outs = [_fwd_bwd(lambda q_, k_, v_, w_: nlgraph.aggregate(q_, k_, v_, A.EdgeWeighted(A.Softmax(), w_),
                                                            G.EdgeIndex(ei), backend=b), [q, k, v, w])
            for b in ("pyg", "reference")]
    _assert_same(*outs)
    assert nlgraph.select_backend(q, k, v, A.Softmax(), G.EdgeIndex(ei, edge_weight=w))[0] == "pyg"


def test_import_nlgraph_without_torch_geometric():
    code = ("import sys; sys.modules['torch_geometric'] = None\n"
            "import torch, nlgraph\n"
            "from nlgraph import graph as G\n"
            "q = torch.randn(6, 3)\n"
            "y = nlgraph.aggregate(q, q, q, graph=G.EdgeIndex(torch.tensor([[0, 1], [1, 2]])))\n"
            "ok, why = nlgraph.dispatch.get_backend('pyg').can_run(q, q, q, nlgraph.Softmax(), None)\n"
            "assert not ok and 'nlgraph[pyg]' in why, why\n"
            "print('ok', tuple(y.shape))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "ok (6, 3)" in proc.stdout, proc.stderr
