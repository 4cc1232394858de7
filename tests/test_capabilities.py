"""Graphs declare capabilities; backends ask for them (issue 15).

Every graph's declared capabilities agree with its edge set (``dense``: the predicate): the edge
bound bounds it, SDPA's descriptions (``attn_mask``, ``causal``, ``excludes_self``) describe it, and
``members`` intersect to it. No backend tests a graph's class; a new graph class that declares the
right capabilities is dispatched without editing a backend. Backend modules are described once by a
typed :class:`nlgraph.dispatch.Backend` record.
"""

from __future__ import annotations

import ast
import math
import types
from pathlib import Path

import pytest
import torch

import nlgraph
from nlgraph import affinity as A
from nlgraph import dispatch
from nlgraph import graph as G
from nlgraph._optional import optional


def _zoo():
    gen = torch.Generator().manual_seed(0)
    n = 12
    bool_mask = torch.rand(n, n, generator=gen) > 0.4
    float_mask = torch.randn(2, n, n, generator=gen).masked_fill(~bool_mask, -math.inf)
    edge_index = torch.randint(0, n, (2, 30), generator=gen)
    knn = torch.randint(-1, n, (n, 3), generator=gen)
    return {
        "complete": (G.Complete(), n),
        "mask_bool": (G.Mask(bool_mask), n),
        "mask_float": (G.Mask(float_mask), n),
        "exclude_self": (G.ExcludeSelf(), n),
        "causal": (G.Causal(), n),
        "window": (G.LocalWindow((3, 4), 1), n),
        "window_shift_dilated": (G.LocalWindow((3, 4), kernel_size=(1, 2), dilation=(1, 2),
                                               border="shift"), n),
        "window_shift_5x6": (G.LocalWindow((5, 6), kernel_size=(3, 2), dilation=(1, 2), border="shift"), 30),
        "window_shift_causal": (G.LocalWindow((5, 6), kernel_size=(2, 4), is_causal=(True, False),
                                              border="shift"), 30),
        "window_causal_even": (G.LocalWindow((3, 4), kernel_size=(2, 3), is_causal=(True, False)), n),
        "criss_cross": (G.CrissCross((3, 4)), n),
        "knn": (G.KNN(knn), n),
        "edge_index": (G.EdgeIndex(edge_index), n),
        "intersection": (G.LocalWindow((3, 4), 1) & G.ExcludeSelf() & G.Mask(bool_mask), n),
    }


ZOO = _zoo()


@pytest.mark.parametrize("name", list(ZOO))
def test_declared_capabilities_agree_with_the_edge_set(name):
    graph, n = ZOO[name]
    dense = graph.dense(n, n)
    edges = int(dense.sum()) if dense.dim() == 2 else int(dense.flatten(0, -3).sum(0).gt(0).sum())
    bound = graph.edge_bound(n, n)
    assert bound is None or bound >= edges, (name, bound, edges)
    assert graph.sparsity in G.SPARSITIES
    members = graph.members()
    assert members == ((graph,) if not isinstance(graph, G.Intersection) else tuple(graph.graphs))
    inter = torch.ones(n, n, dtype=torch.bool)
    for g in members:
        inter = inter & g.dense(n, n)
    torch.testing.assert_close(inter, dense, msg=f"{name}: members intersect to the graph")
    if graph.attn_mask is not None:
        m = graph.attn_mask
        want = m if m.dtype == torch.bool else m > -math.inf
        torch.testing.assert_close(dense, want.expand_as(dense), msg=f"{name}: attn_mask")
    if graph.excludes_self:
        torch.testing.assert_close(dense, ~torch.eye(n, dtype=torch.bool), msg=f"{name}: excludes_self")
    if graph.causal:
        torch.testing.assert_close(dense, torch.ones(n, n, dtype=torch.bool).tril(), msg=f"{name}: causal")
    if graph.grid_pattern is not None:
        assert graph.grid_pattern in ("window", "criss_cross") and math.prod(graph.shape) == n


@pytest.mark.parametrize("name", [k for k in ZOO if k.startswith("window")])
def test_window_slots_and_edges_derive_from_the_one_predicate(name):
    """The offset slots the grid backend walks hold exactly the window's edges (each once)."""
    graph, n = ZOO[name]
    dense = graph.dense(n, n)
    shape, d = graph.shape, len(graph.shape)
    from_slots = torch.zeros(n, n, dtype=torch.int64)
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, d)
    slots = [graph.axis_slots(a, torch.device("cpu")) for a in range(d)]
    for combo in torch.cartesian_prod(*[torch.arange(k.shape[0]) for k, _ in slots]).reshape(-1, d):
        key = torch.stack([slots[a][0][combo[a], coords[:, a]] for a in range(d)], -1)
        ok = torch.stack([slots[a][1][combo[a], coords[:, a]] for a in range(d)], -1).all(-1)
        flat = (key * torch.tensor([math.prod(shape[a + 1:]) for a in range(d)])).sum(-1)
        from_slots[torch.arange(n)[ok], flat[ok]] += 1
    assert from_slots.max() <= 1, f"{name}: a key in two slots"
    torch.testing.assert_close(from_slots.bool(), dense, msg=f"{name}: slots == block")
    ei, _ = graph.edges(n, n, torch.device("cpu"))
    from_edges = torch.zeros(n, n, dtype=torch.bool)
    from_edges[ei[1], ei[0]] = True
    torch.testing.assert_close(from_edges, dense, msg=f"{name}: edges == block")


_GRAPH_CLASSES = set(G.__all__) - {"blocked_order", "combine_blocks", "safe_log", "Block", "BORDERS",
                                   "SPARSITIES", "Graph"}


def _backend_sources():
    root = Path(nlgraph.__file__).parent / "backends"
    return sorted(p for p in root.rglob("*.py"))


@pytest.mark.parametrize("path", _backend_sources(), ids=lambda p: str(p.relative_to(p.parents[2])))
def test_backends_never_test_graph_classes(path):
    """isinstance / type() against a concrete graph class in a backend is the coupling issue 15 removed."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance",
                                                                                                "type"):
            names = {n.id if isinstance(n, ast.Name) else n.attr for arg in node.args[1:]
                     for n in ast.walk(arg) if isinstance(n, (ast.Name, ast.Attribute))}
            assert not names & _GRAPH_CLASSES, f"{path.name}:{node.lineno} tests {names & _GRAPH_CLASSES}"
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Call) and getattr(
                node.left.func, "id", None) == "type":
            names = {getattr(c, "id", getattr(c, "attr", None)) for c in node.comparators}
            assert not names & _GRAPH_CLASSES, f"{path.name}:{node.lineno} compares type() to a graph class"


class _Band(G.Graph):
    """A new graph class, unknown to every backend: keys within ``width`` positions, scattered fan-in."""

    sparsity = "fan_in"

    def __init__(self, width: int):
        self.width = width

    def block(self, i0, i1, j0, j1, device):
        i = torch.arange(i0, i1, device=device)[:, None]
        j = torch.arange(j0, j1, device=device)[None, :]
        return (i - j).abs() <= self.width

    def edge_bound(self, n, m):
        return n * (2 * self.width + 1)

    def __repr__(self):
        return f"_Band({self.width})"


def test_a_new_graph_is_dispatched_by_its_capabilities():
    """Declaring ``sparsity="fan_in"`` and an edge bound is all the pyg backend needs to prefer it;
    every backend then computes it exactly as the reference does."""
    n = 256
    q = torch.randn(2, n, 8, dtype=torch.float64)
    graph = _Band(2)
    name = nlgraph.select_backend(q, q, q, A.Softmax(), graph)[0]
    assert name == ("pyg" if optional("torch_geometric") is not None else "chunked")
    ref = nlgraph.aggregate(q, q, q, A.Softmax(), graph, backend="reference")
    for b in dispatch.exact_backends(q, q, q, A.Softmax(), graph):
        torch.testing.assert_close(nlgraph.aggregate(q, q, q, A.Softmax(), graph, backend=b), ref,
                                   msg=f"{b} on a new graph class")


def test_backend_records_read_each_module_once():
    chunked = dispatch.backend("chunked")
    assert isinstance(chunked, dispatch.Backend)
    assert chunked.dropout and chunked.returns_lse and chunked.exact
    assert chunked.options == ("block_n", "block_m") and not chunked.any_options
    assert chunked.module is dispatch.get_backend("chunked")
    assert dispatch.backend("chunked") is chunked  # cached
    assert not dispatch.backend("algebra").dropout
    assert not dispatch.backend("permutohedral").exact
    with pytest.raises(TypeError, match="backend 'chunked' does not take option"):
        chunked.check_options({"tile": 1})


def test_malformed_backend_modules_are_refused_when_loaded():
    no_run = types.ModuleType("no_run")
    no_run.can_run = lambda *a: (True, "")
    with pytest.raises(TypeError, match=r"backend 'x' \(no_run\) must define a callable run\(\)"):
        dispatch.Backend.from_module("x", no_run)
    bad_flag = types.ModuleType("bad_flag")
    bad_flag.can_run = lambda *a: (True, "")
    bad_flag.run = lambda q, k, v, a, g: q
    bad_flag.EXACT = "yes"
    with pytest.raises(TypeError, match="EXACT must be a bool"):
        dispatch.Backend.from_module("x", bad_flag)


def test_backend_record_stands_in_for_the_module():
    """select_backend returned the module before the typed record: module attributes still read."""
    q = torch.randn(5, 3)
    name, rec = nlgraph.select_backend(q, q, q, A.Softmax(), None)
    assert rec.module.__name__.endswith(name)
    assert rec.run is not rec.module.run  # the record's own hooks win
    helpers = [k for k in vars(rec.module) if not k.startswith("_") and not hasattr(type(rec), k)]
    assert helpers and all(getattr(rec, k) is getattr(rec.module, k) for k in helpers)
    with pytest.raises(AttributeError):
        _ = rec.no_such_attribute
