"""The grid backend and LocalWindow's NATTEN options == formulas and pixel loops written here.

* grid == the dense formula (tests/formulas.py: affinity from pairwise definitions, adjacency and
  relative-position logits from loops over node pairs), forward and every gradient in float64, for
  every window option (kernel size odd/even, dilation, causal axes, clip/shift borders, rpb),
  criss-cross, empty neighbourhoods (-inf bias entries), batched and non-contiguous inputs;
* float64 gradcheck of the grid backend's autograd Functions;
* every window option gives the same result on every backend that accepts it
  (``nlgraph.dispatch.exact_backends``);
* NATTEN's border semantics (``border="shift"``) against a pixel loop: each query's window found with
  NATTEN's own window-start rule, its softmax computed pixel by pixel;
* bad options raise ValueError/TypeError naming the argument; dispatch and capability checks.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import nlgraph
from nlgraph import affinity as A
from nlgraph import graph as G

from .formulas import (
    aggregate_formula,
    criss_cross_adjacency,
    grid_coords,
    window_options_adjacency,
    window_rpb_bias,
)

F64 = torch.float64
# float64 rounding bound, derived in tests/formulas.py (TOLERANCES)
TOL = dict(rtol=1e-9, atol=1e-10)

AFFINITIES = {
    "softmax": (lambda: A.Softmax(), "softmax", {}),
    "softmax_scale": (lambda: A.Softmax(scale=0.7), "softmax", {"scale": 0.7}),
    "gaussian": (lambda: A.Gaussian(1.5), "gaussian", {"bandwidth": 1.5}),
    "gaussian_c1": (lambda: A.Gaussian(1.5, normalize=False), "gaussian_unnorm", {"bandwidth": 1.5}),
    "gaussian_offset": (lambda: A.Gaussian(2.0, offset=0.5), "gaussian", {"bandwidth": 2.0, "offset": 0.5}),
    # truncated: drops a good part of these random features' pairs
    "gaussian_cutoff": (lambda: A.Gaussian(1.0, offset=0.2, cutoff=0.6), "gaussian",
                        {"bandwidth": 1.0, "offset": 0.2, "cutoff": 0.6}),
    "gaussian_c1_cutoff": (lambda: A.Gaussian(1.0, normalize=False, cutoff=0.6), "gaussian_unnorm",
                           {"bandwidth": 1.0, "cutoff": 0.6}),
}

# (shape, LocalWindow options): every option alone and in combination, 1-D / 2-D / 3-D
WINDOWS = [
    ((7,), dict(radius=2)),
    ((5, 6), dict(radius=(1, 2))),
    ((8,), dict(kernel_size=4)),
    ((5, 6), dict(kernel_size=(2, 3))),
    ((9,), dict(kernel_size=3, dilation=2)),
    ((6, 7), dict(kernel_size=3, dilation=(2, 3))),
    ((8,), dict(kernel_size=3, is_causal=True)),
    ((4, 5), dict(kernel_size=(2, 3), is_causal=(True, False))),
    ((8,), dict(kernel_size=3, border="shift")),
    ((6, 7), dict(kernel_size=(4, 3), border="shift")),
    ((7, 9), dict(kernel_size=(3, 2), dilation=(2, 3), border="shift")),
    ((3, 4, 6), dict(kernel_size=(2, 3, 3), dilation=(1, 1, 2), is_causal=(True, False, False),
                     border="shift")),
    ((3, 3, 4), dict(kernel_size=3)),
]


def _leaf(t):
    return t.detach().requires_grad_(True)


def _options_adjacency(shape, opts):
    dims = len(shape)
    if "radius" in opts:
        r = opts["radius"] if isinstance(opts["radius"], tuple) else (opts["radius"],) * dims
        k = tuple(2 * x + 1 for x in r)
    else:
        k = opts["kernel_size"] if isinstance(opts["kernel_size"], tuple) else (opts["kernel_size"],) * dims
    per_axis = lambda name, default: (opts.get(name, default) if isinstance(opts.get(name, default), tuple)  # noqa
                                      else (opts.get(name, default),) * dims)
    dil, causal = per_axis("dilation", 1), per_axis("is_causal", False)
    return k, dil, window_options_adjacency(shape, k, dil, causal, opts.get("border", "clip"))


def _rpb(k, lead, gen):
    return _leaf(torch.randn(*lead, *(2 * x - 1 for x in k), generator=gen, dtype=F64))


def _qkv(lead, n, d, e, gen, layout="contiguous"):
    def one(c):
        if layout == "transposed":  # storage (..., c, n): a non-contiguous (..., n, c) view
            return _leaf(torch.randn(*lead, c, n, generator=gen, dtype=F64)).transpose(-1, -2)
        return _leaf(torch.randn(*lead, n, c, generator=gen, dtype=F64))
    q, k, v = one(d), one(d), one(e)
    return q, k, v


def _check(y, y_ref, inputs, names):
    torch.testing.assert_close(y, y_ref, **TOL, msg=lambda m: f"forward: {m}")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    grads = torch.autograd.grad(y, inputs, dy, allow_unused=True)
    refs = torch.autograd.grad(y_ref, inputs, dy, allow_unused=True)
    for name, g, r in zip(names, grads, refs, strict=True):
        g = torch.zeros_like(r) if g is None and r is not None else g
        r = torch.zeros_like(g) if r is None and g is not None else r
        torch.testing.assert_close(g, r, **TOL, msg=lambda m, name=name: f"d/d{name}: {m}")


@pytest.fixture(params=[None, 3], ids=["whole-rows", "row-blocks-of-3"])
def row_block(request, monkeypatch):
    """The forward's score products over whole last-axis rows, and (ROW_BLOCK = 3, which divides no
    extent here but 3 and 6) over blocks of queries with the padded last block, the path a long 1-D
    sequence takes."""
    if request.param is not None:
        from nlgraph.backends import grid

        monkeypatch.setattr(grid, "ROW_BLOCK", request.param)
    return request.param


@pytest.mark.parametrize("aff", list(AFFINITIES))
@pytest.mark.parametrize("shape,opts", WINDOWS, ids=[f"{s}-{o}" for s, o in WINDOWS])
def test_window_equals_formula(shape, opts, aff, row_block):
    """Every option and affinity, batch x heads, per-head rpb (for kernel-size windows): grid == formula."""
    gen = torch.Generator().manual_seed(hash((shape, aff)) % 2**31)
    make, kind, params = AFFINITIES[aff]
    k, dil, adj = _options_adjacency(shape, opts)
    n = math.prod(shape)
    rpb = _rpb(k, (2,), gen) if "kernel_size" in opts else None
    graph = G.LocalWindow(shape, rpb=rpb, **opts)
    q, kk, v = _qkv((3, 2), n, 3, 4, gen, layout="transposed" if len(shape) == 2 else "contiguous")
    bias = None if rpb is None else window_rpb_bias(shape, k, dil, rpb)
    y = nlgraph.aggregate(q, kk, v, make(), graph, backend="grid")
    y_ref = aggregate_formula(kind, q, kk, v, params, adj=adj, bias=bias)
    inputs = [q, kk, v] + ([rpb] if rpb is not None else [])
    _check(y, y_ref, inputs, ["query", "key", "value", "rpb"][: len(inputs)])


@pytest.mark.parametrize("aff", list(AFFINITIES))
@pytest.mark.parametrize("shape", [(4, 5), (1, 6), (3, 1), (5, 5)])
def test_criss_cross_equals_formula(shape, aff):
    gen = torch.Generator().manual_seed(7)
    make, kind, params = AFFINITIES[aff]
    n = math.prod(shape)
    q, k, v = _qkv((2,), n, 3, 5, gen, layout="transposed")
    y = nlgraph.aggregate(q, k, v, make(), G.CrissCross(shape), backend="grid")
    y_ref = aggregate_formula(kind, q, k, v, params, adj=criss_cross_adjacency(*shape).to(F64))
    _check(y, y_ref, [q, k, v], ["query", "key", "value"])


def test_broadcast_batch_dims_and_trainable_parameters():
    """Batch dims only some inputs have, a trainable scale and bandwidth, rpb without a head dim."""
    gen = torch.Generator().manual_seed(3)
    shape = (4, 5)
    n = math.prod(shape)
    q = _leaf(torch.randn(2, 1, n, 3, generator=gen, dtype=F64))
    k = _leaf(torch.randn(1, 3, n, 3, generator=gen, dtype=F64))
    v = _leaf(torch.randn(3, n, 2, generator=gen, dtype=F64))
    scale = _leaf(torch.tensor(0.8, dtype=F64))
    rpb = _rpb((3, 2), (), gen)
    graph = G.LocalWindow(shape, kernel_size=(3, 2), border="shift", rpb=rpb)
    adj = window_options_adjacency(shape, (3, 2), border="shift")
    y = nlgraph.aggregate(q, k, v, A.Softmax(scale=scale), graph, backend="grid")
    y_ref = aggregate_formula("softmax", q, k, v, {"scale": scale}, adj=adj,
                              bias=window_rpb_bias(shape, (3, 2), (1, 1), rpb))
    _check(y, y_ref, [q, k, v, scale, rpb], ["query", "key", "value", "scale", "rpb"])
    bw = _leaf(torch.tensor([0.9, 1.4, 2.0], dtype=F64))
    y = nlgraph.aggregate(q, k, v, A.Gaussian(bw), G.CrissCross(shape), backend="grid")
    y_ref = aggregate_formula("gaussian", q, k, v, {"bandwidth": bw},
                              adj=criss_cross_adjacency(*shape).to(F64))
    _check(y, y_ref, [q, k, v, bw], ["query", "key", "value", "bandwidth"])


@pytest.mark.parametrize("aff", ["softmax", "gaussian_c1"])
def test_empty_neighbourhoods_give_zeros(aff):
    """-inf bias entries remove edges; a query left without any gets zeros and zero gradients, no NaN."""
    gen = torch.Generator().manual_seed(4)
    make, kind, params = AFFINITIES[aff]
    shape = (3, 4)
    n = math.prod(shape)
    table = torch.randn(2, 3, 3, generator=gen, dtype=F64)
    table[0] = -math.inf  # head 0: every edge removed
    table[1, 1, :] = -math.inf  # head 1: only the other rows' keys remain
    rpb = _leaf(table)
    graph = G.LocalWindow(shape, kernel_size=2, rpb=rpb)
    adj = window_options_adjacency(shape, (2, 2))
    q, k, v = _qkv((2,), n, 3, 2, gen)
    y = nlgraph.aggregate(q, k, v, make(), graph, backend="grid")
    bias = window_rpb_bias(shape, (2, 2), (1, 1), rpb)
    y_ref = aggregate_formula(kind, q, k, v, params, adj=adj, bias=bias)
    assert torch.equal(y[:, 0], torch.zeros_like(y[:, 0]))
    _check(y, y_ref, [q, k, v], ["query", "key", "value"])
    g = torch.autograd.grad(nlgraph.aggregate(q, k, v, make(), graph, backend="grid").sum(), rpb)[0]
    assert torch.isfinite(g).all() and torch.equal(g[0], torch.zeros_like(g[0]))


def test_gradcheck_grid_functions():
    """Small cases (gradcheck's numerical Jacobian is one forward per input entry), one affinity each."""
    gen = torch.Generator().manual_seed(5)
    cases = [((4, 3), (3, 5), lambda r: G.LocalWindow((4, 3), kernel_size=(2, 3), dilation=(2, 1),
                                                      border="shift", rpb=r), A.Softmax()),
             ((2, 2, 3), (5, 3, 5), lambda r: G.LocalWindow((2, 2, 3), kernel_size=(3, 2, 3),
                                                             is_causal=(True, False, False), rpb=r),
              A.Gaussian(1.5, normalize=False)),
             ((3, 3), (5, 5), lambda r: G.LocalWindow((3, 3), kernel_size=3, rpb=r),
              A.Gaussian(2.0, offset=0.3)),
             ((2, 3), None, lambda r: G.CrissCross((2, 3)), A.Softmax()),
             ((3, 2), None, lambda r: G.CrissCross((3, 2)), A.Gaussian(2.0, offset=0.3))]
    for shape, table, graph_fn, aff in cases:
        n = math.prod(shape)
        rpb = None if table is None else _leaf(torch.randn(*table, generator=gen, dtype=F64))
        graph = graph_fn(rpb)
        q, k, v = (_leaf(torch.randn(1, n, c, generator=gen, dtype=F64)) for c in (2, 2, 2))
        ins = [q, k, v] + list(graph.tensors())
        assert torch.autograd.gradcheck(lambda *a, aff=aff, graph=graph: nlgraph.aggregate(
            a[0], a[1], a[2], aff, graph, backend="grid"), ins)


@pytest.mark.parametrize("shape,opts", WINDOWS + [((4, 5), dict(radius=1, border="clip"))],
                         ids=[f"{s}-{o}" for s, o in WINDOWS] + ["plain"])
def test_window_options_agree_across_backends(shape, opts):
    """Every backend that accepts the graph computes the same op (forward and gradients)."""
    gen = torch.Generator().manual_seed(6)
    n = math.prod(shape)
    k, _, _ = _options_adjacency(shape, opts)
    for rpb_lead in ((), (2,)):
        rpb = _rpb(k, rpb_lead, gen) if "kernel_size" in opts else None
        graph = G.LocalWindow(shape, rpb=rpb, **opts)
        q, kk, v = _qkv((2,), n, 3, 2, gen)
        inputs = [q, kk, v] + list(graph.tensors())
        for aff in (A.Softmax(), A.Gaussian(1.2, normalize=False), A.DotProduct()):
            names = nlgraph.dispatch.exact_backends(q, kk, v, aff, graph)
            assert "reference" in names and "chunked" in names
            if aff.kernel == "exp":
                assert "grid" in names
            if rpb is None or rpb_lead == ():
                assert "pyg" in names or nlgraph._optional.optional("torch_geometric") is None
            outs = {}
            for b in names:
                y = nlgraph.aggregate(q, kk, v, aff, graph, backend=b)
                outs[b] = (y, torch.autograd.grad(y.square().sum(), inputs))
            y0, g0 = outs["reference"]
            for b, (y, g) in outs.items():
                torch.testing.assert_close(y, y0, **TOL, msg=lambda m, b=b: f"{b} forward: {m}")
                for i, (a, r) in enumerate(zip(g, g0, strict=True)):
                    torch.testing.assert_close(a, r, **TOL, msg=lambda m, b=b, i=i: f"{b} gradient {i}: {m}")


def test_graph_dense_and_edges_match_the_loops():
    """block / dense, the edge list and the dense rpb all describe the same graph."""
    gen = torch.Generator().manual_seed(8)
    for shape, opts in WINDOWS:
        k, dil, adj = _options_adjacency(shape, opts)
        n = math.prod(shape)
        rpb = None
        if "kernel_size" in opts:
            rpb = torch.randn(*(2 * x - 1 for x in k), generator=gen, dtype=F64)
        g = G.LocalWindow(shape, rpb=rpb, **opts)
        assert torch.equal(g.dense(n, n), adj.bool()), (shape, opts)
        ei, logw = g.edges(n, n, torch.device("cpu"))
        dense = torch.zeros(n, n, dtype=torch.bool)
        dense[ei[1], ei[0]] = True
        assert ei.shape[1] == int(adj.sum()) and torch.equal(dense, adj.bool()), (shape, opts)
        if rpb is not None:
            expect = window_rpb_bias(shape, k, dil, rpb)
            torch.testing.assert_close(logw, expect[ei[1], ei[0]], rtol=0, atol=0)
            torch.testing.assert_close(g.dense_bias()[adj.bool()], expect[adj.bool()], rtol=0, atol=0)
        # the tile plan never skips a tile that holds an edge
        tiles = [(i, min(n, i + 4)) for i in range(0, n, 4)]
        pairs = g.tile_pairs(tiles, tiles, torch.device("cpu"))
        for (a, (i0, i1)), (b, (j0, j1)) in itertools.product(enumerate(tiles), enumerate(tiles)):
            if adj[i0:i1, j0:j1].any():
                assert pairs[a, b], (shape, opts, a, b)


# ---------------------------------------------------------------- NATTEN's semantics, pixel by pixel


def natten_window_start(index: int, length: int, kernel_size: int, dilation: int) -> int:
    """NATTEN's window start (its reference implementation's rule for an odd kernel, with the dilation
    groups' phase alignment): the window is start + u * dilation, u < kernel_size."""
    ns = kernel_size // 2
    if dilation <= 1:
        return max(index - ns, 0) + (index + ns >= length) * (length - index - ns - 1)
    ni = index - ns * dilation
    if ni < 0:
        return index % dilation
    if index + ns * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * ns * dilation
        return a + imodd - kernel_size * dilation
    return ni


def natten_even_window(index: int, length: int, kernel_size: int, dilation: int) -> list[int]:
    """NATTEN's window for any kernel size (the rule of its FlexAttention mask): the centre, in units of
    the dilation, clamped to [k // 2, L' - 1 - (k - 1 - k // 2)] within the query's dilation group."""
    group = index % dilation
    length_g = len(range(group, length, dilation))
    left, right = kernel_size // 2, kernel_size - 1 - kernel_size // 2
    centre = min(max(index // dilation, left), length_g - 1 - right)
    return [group + dilation * c for c in range(centre - left, centre + right + 1)]


@pytest.mark.parametrize("shape,kernel,dilation", [((7, 9), (3, 5), (1, 1)), ((9, 11), (3, 3), (2, 3)),
                                                     ((10,), (5,), (2,)), ((3, 7, 8), (3, 3, 3), (1, 2, 2)),
                                                     ((6, 8), (4, 2), (1, 2)), ((7, 6), (2, 4), (3, 1))])
def test_shift_border_matches_a_natten_pixel_loop(shape, kernel, dilation):
    """border='shift' + rpb == neighbourhood attention computed pixel by pixel with NATTEN's rules."""
    gen = torch.Generator().manual_seed(10)
    heads, d, e = 2, 4, 3
    n = math.prod(shape)
    rpb = _rpb(kernel, (heads,), gen)
    q, k, v = (_leaf(torch.randn(heads, n, c, generator=gen, dtype=F64)) for c in (d, d, e))
    graph = G.LocalWindow(shape, kernel_size=kernel, dilation=dilation, border="shift", rpb=rpb)
    y = nlgraph.aggregate(q, k, v, A.Softmax(), graph, backend="grid")
    coords = grid_coords(shape)
    strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]
    rows = []
    for h in range(heads):
        for c in coords:
            per_axis = []
            for x, s, kk, t in zip(c, shape, kernel, dilation, strict=True):
                if kk % 2:
                    start = natten_window_start(x, s, kk, t)
                    per_axis.append([start + u * t for u in range(kk)])
                else:
                    per_axis.append(natten_even_window(x, s, kk, t))
            i = sum(x * st for x, st in zip(c, strides, strict=True))
            logits, vals = [], []
            for key in itertools.product(*per_axis):
                j = sum(x * st for x, st in zip(key, strides, strict=True))
                rel = tuple(kj // t - x // t + kk - 1
                            for kj, x, t, kk in zip(key, c, dilation, kernel, strict=True))
                logits.append((q[h, i] * k[h, j]).sum() / math.sqrt(d) + rpb[(h, *rel)])
                vals.append(v[h, j])
            w = torch.softmax(torch.stack(logits), 0)
            rows.append((w[:, None] * torch.stack(vals)).sum(0))
    y_ref = torch.stack(rows).reshape(heads, n, e)
    _check(y, y_ref, [q, k, v, rpb], ["query", "key", "value", "rpb"])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("shape,kernel,dilation,causal", [
    ((12,), 5, 1, False), ((13,), 3, 2, True), ((9, 10), 3, 1, False), ((11, 12), (5, 3), (2, 1), False),
    ((9, 8), 3, 1, (True, False)), ((5, 6, 7), 3, (1, 2, 1), False)])
def test_shift_border_matches_natten(shape, kernel, dilation, causal):
    """border='shift' == NATTEN's own na1d/na2d/na3d (where natten installs; not a dependency): its
    heads-last layout (B, *shape, heads, d), forward (its CPU path has no backward), every backend."""
    natten = pytest.importorskip("natten.functional")
    na = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(shape)]
    gen = torch.Generator().manual_seed(11)
    heads, d = 2, 8
    n = math.prod(shape)
    q, k, v = (torch.randn(1, *shape, heads, d, generator=gen) for _ in range(3))
    y_natten = na(q, k, v, kernel_size=kernel, dilation=dilation, is_causal=causal)
    dims = tuple(range(1, len(shape) + 1))
    tokens = lambda t: t.permute(0, len(shape) + 1, *dims, len(shape) + 2).reshape(1, heads, n, d)  # noqa: E731
    graph = G.LocalWindow(shape, kernel_size=kernel, dilation=dilation, is_causal=causal, border="shift")
    for backend in nlgraph.dispatch.exact_backends(tokens(q), tokens(k), tokens(v), A.Softmax(), graph):
        y = nlgraph.aggregate(tokens(q), tokens(k), tokens(v), A.Softmax(), graph, backend=backend)
        # float32 softmax over <= 27 keys of width 8: a few ulps of the outputs' scale
        torch.testing.assert_close(y, tokens(y_natten), rtol=1e-5, atol=1e-5, msg=backend)


def test_window_dispatch_counts_offset_slots_and_gradients():
    """grid takes windows whose offset slots x (d + e) are at most MAX_WINDOW_WORK when a gradient is
    wanted and MAX_WINDOW_WORK_INFERENCE without; a shifted axis visits 2 k - 1 offsets."""
    from nlgraph.backends import grid

    shape = (64, 64)
    cases = [(G.LocalWindow(shape, 3), 49), (G.LocalWindow(shape, 6), 169),
             (G.LocalWindow(shape, kernel_size=7, border="shift"), 169),
             (G.LocalWindow(shape, kernel_size=13, border="shift"), 625),
             (G.LocalWindow(shape, kernel_size=(7, 3), is_causal=(True, False), border="shift"), 7 * 5)]
    with pytest.raises(TypeError, match=r"window_slots\(graph\) takes a LocalWindow, got CrissCross"):
        grid.window_slots(G.CrissCross(shape))
    for d in (16, 32, 64):
        q = torch.randn(1, 2, 64 * 64, d)
        leaf = q.clone().requires_grad_()
        for graph, slots in cases:
            assert grid.window_slots(graph) == slots
            work = slots * 2 * d
            for x, limit in ((q, grid.MAX_WINDOW_WORK_INFERENCE), (leaf, grid.MAX_WINDOW_WORK)):
                want = "grid" if work <= limit else "chunked"
                got = nlgraph.select_backend(x, q, q, A.Softmax(), graph)[0]
                assert got == want, (graph, d, x.requires_grad)
            with torch.no_grad():
                want = "grid" if work <= grid.MAX_WINDOW_WORK_INFERENCE else "chunked"
                assert nlgraph.select_backend(leaf, q, q, A.Softmax(), graph)[0] == want


# ---------------------------------------------------------------- options, errors, dispatch


def test_kernel_size_and_radius_are_the_same_window():
    a, b = G.LocalWindow((5, 6), 2), G.LocalWindow((5, 6), kernel_size=5)
    assert torch.equal(a.dense(30, 30), b.dense(30, 30))
    assert a.plain and b.plain and a.radius == b.radius == (2, 2) and repr(a) == repr(b)
    assert not G.LocalWindow((5, 6), kernel_size=4).plain
    assert G.LocalWindow((5, 6), kernel_size=(3, 4), border="shift").window_size == (3, 4)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(), ValueError, r"LocalWindow needs radius or kernel_size"),
    (dict(radius=1, kernel_size=3), ValueError, r"LocalWindow needs radius or kernel_size"),
    (dict(kernel_size=0), ValueError, r"LocalWindow\(kernel_size\) must be an int >= 1 or 2 of them, got 0"),
    (dict(kernel_size=(3, 3, 3)), ValueError, r"LocalWindow\(kernel_size\) must be an int >= 1 or 2 of them"),
    (dict(kernel_size=2.0), TypeError, r"LocalWindow\(kernel_size\) must be an int or a sequence of 2 ints"),
    (dict(kernel_size=3, dilation=0), ValueError, r"LocalWindow\(dilation\) must be an int >= 1"),
    (dict(kernel_size=3, is_causal=1), ValueError, r"LocalWindow\(is_causal\) must be a bool or 2 of them"),
    (dict(kernel_size=3, is_causal=(True,)), ValueError, r"LocalWindow\(is_causal\) must be a bool or 2"),
    (dict(kernel_size=3, border="reflect"), ValueError,
     r"LocalWindow\(border\) must be one of \('clip', 'shift'\)"),
    (dict(kernel_size=(3, 4), dilation=(1, 2), border="shift"), ValueError,
     r"needs kernel_size \* dilation <= the extent.*axis 1 has kernel_size 4, dilation 2 and extent 6"),
    (dict(kernel_size=3, rpb=torch.zeros(4, 5)), ValueError,
     r"LocalWindow\(rpb\) must have shape \(\.\.\., 5, 5\) \(2 kernel_size - 1 per axis\), got \(4, 5\)"),
    (dict(kernel_size=3, rpb=torch.zeros(5, 5, dtype=torch.long)), TypeError,
     r"LocalWindow\(rpb\) must be a floating-point tensor, got dtype torch.int64"),
    (dict(kernel_size=3, rpb=torch.full((5, 5), math.nan)), ValueError,
     r"LocalWindow\(rpb\) entries must be finite"),
])
def test_bad_options_raise(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        G.LocalWindow((5, 6), **kwargs)


def test_rpb_checked_at_every_call_and_on_the_device():
    rpb = torch.zeros(2, 5, 5)
    g = G.LocalWindow((5, 6), kernel_size=3, rpb=rpb)
    q = torch.randn(2, 30, 4)
    nlgraph.aggregate(q, q, q, graph=g)
    rpb[0, 0, 0] = math.nan  # the caller's tensor, edited in place
    with pytest.raises(ValueError, match=r"LocalWindow\(rpb\) entries must be finite"):
        nlgraph.aggregate(q, q, q, graph=g)
    with pytest.raises(ValueError, match=r"graph .* has leading dims \(3,\) that do not broadcast"):
        nlgraph.aggregate(q, q, q, graph=G.LocalWindow((5, 6), kernel_size=3, rpb=torch.zeros(3, 5, 5)))


def test_dispatch_and_capabilities():
    q = torch.randn(2, 4, 64 * 64, 8)
    assert nlgraph.select_backend(q, q, q, A.Softmax(), G.CrissCross((64, 64)))[0] == "grid"
    assert nlgraph.select_backend(q, q, q, A.Softmax(), G.LocalWindow((64, 64), 3))[0] == "grid"
    assert nlgraph.select_backend(q, q, q, A.Gaussian(1.0), G.LocalWindow((64, 64), kernel_size=4,
                                                                          border="shift"))[0] == "grid"
    mod = nlgraph.dispatch.get_backend("grid")
    ok, why = mod.can_run(q, q, q, A.DotProduct(), G.LocalWindow((64, 64), 1))
    assert not ok and "exp-kernel" in why
    permuted = G.LocalWindow((64, 64), 1, order=G.blocked_order((64, 64), 8))
    ok, why = mod.can_run(q, q, q, A.Softmax(), permuted)
    assert not ok and "row-major" in why
    ok, why = mod.can_run(q, q, q, A.Softmax(), G.LocalWindow((64, 64), 1) & G.ExcludeSelf())
    assert not ok and "alone" in why
    tri = nlgraph.dispatch.get_backend("triton")
    import os
    if q.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        assert tri.can_run(q, q, q, A.Softmax(), G.LocalWindow((64, 64), kernel_size=4, border="shift"))[0]
        ok, why = tri.can_run(q, q, q, A.Softmax(), G.LocalWindow((64, 64), kernel_size=4,
                                                                   rpb=torch.zeros(7, 7)))
        assert not ok and "relative position bias" in why


def test_grid_traces_under_torch_compile():
    """fullgraph=True: the grid backend's Functions trace (forward and backward) without a graph break."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(11)
    rpb = _leaf(torch.randn(2, 3, 5, generator=gen, dtype=F64))
    graph = G.LocalWindow((4, 5), kernel_size=(2, 3), border="shift", rpb=rpb)
    q, k, v = (_leaf(torch.randn(2, 20, 3, generator=gen, dtype=F64)) for _ in range(3))

    def fn(q, k, v):
        return (nlgraph.aggregate(q, k, v, A.Softmax(), graph, backend="grid")
                + nlgraph.aggregate(q, k, v, A.Softmax(), G.CrissCross((4, 5)), backend="grid"))

    y_eager = fn(q, k, v)
    g_eager = torch.autograd.grad(y_eager.square().sum(), [q, k, v, rpb])
    y = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(y, y_eager, **TOL)
    for a, b in zip(torch.autograd.grad(y.square().sum(), [q, k, v, rpb]), g_eager, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    torch._dynamo.reset()


@pytest.mark.parametrize("graph", [G.LocalWindow((4, 5), 1), G.CrissCross((4, 5))],
                         ids=["window", "criss_cross"])
@pytest.mark.parametrize("normalize", [True, False])
def test_cutoff_dropping_every_key_gives_zero(graph, normalize):
    """A truncated Gaussian whose cut-off drops a query's every key: that query gets 0 and zero
    gradients (no NaN), the others the formula's value, on every backend that takes the graph."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 20, 3, dtype=F64, generator=gen)
    k = torch.randn(2, 20, 3, dtype=F64, generator=gen)
    q[:, :7] += 10.0  # the first 7 queries are far from every key
    v = torch.randn(2, 20, 2, dtype=F64, generator=gen)
    adj = (window_options_adjacency((4, 5), (3, 3)) if isinstance(graph, G.LocalWindow)
           else criss_cross_adjacency(4, 5).to(F64))
    params = {"bandwidth": 1.0, "cutoff": 2.0}
    kind = "gaussian" if normalize else "gaussian_unnorm"
    aff = A.Gaussian(1.0, normalize=normalize, cutoff=2.0)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = aggregate_formula(kind, *leaves, params, adj)
    assert torch.equal(ref[:, :7], torch.zeros_like(ref[:, :7])) and ref[:, 7:].abs().max() > 0.1
    g_ref = torch.autograd.grad(ref.sum(), leaves)
    for backend in ("grid", "chunked", "reference", "pyg"):
        ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
        y = nlgraph.aggregate(*ins, aff, graph, backend=backend)
        torch.testing.assert_close(y, ref, **TOL, msg=backend)
        for g, gr in zip(torch.autograd.grad(y.sum(), ins), g_ref, strict=True):
            assert torch.isfinite(g).all(), backend
            torch.testing.assert_close(g, gr, **TOL, msg=backend)
