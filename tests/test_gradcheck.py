"""float64 gradcheck/gradgradcheck-free checks of the chunked backend's custom autograd."""

from __future__ import annotations

import math

import pytest
import torch

import nlgraph
from nlgraph import affinity as A
from nlgraph import graph as G

OPTS = {"block_n": 3, "block_m": 4}


def _t(*shape, seed=0, positive=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return (x.abs() + 0.5 if positive else x).requires_grad_(True)


@pytest.mark.parametrize("kind", ["softmax", "gaussian", "gaussian_c1", "gaussian_offset", "dot", "concat"])
@pytest.mark.parametrize("graph_kind", ["complete", "mask", "float_mask", "window"])
def test_gradcheck_chunked(kind, graph_kind):
    n, m, d, e = 6, 6, 3, 2
    q, k, v = _t(2, n, d, seed=1), _t(2, m, d, seed=2), _t(2, m, e, seed=3)
    extra = []
    if kind == "softmax":
        scale = _t(1, seed=4, positive=True)
        make_aff = lambda p: A.Softmax(scale=p[0].reshape(()))  # noqa: E731
        extra = [scale]
    elif kind in ("gaussian", "gaussian_c1", "gaussian_offset"):
        bw = _t(d, seed=4, positive=True)
        off = 0.7 if kind == "gaussian_offset" else 0.0
        make_aff = lambda p: A.Gaussian(bandwidth=p[0], normalize=kind != "gaussian_c1", offset=off)  # noqa: E731
        extra = [bw]
    elif kind == "dot":
        make_aff = lambda p: A.DotProduct()  # noqa: E731
    else:
        w = _t(2 * d, seed=4)
        make_aff = lambda p: A.Concatenation(p[0])  # noqa: E731
        extra = [w]
    bias = None
    if graph_kind == "mask":
        gen = torch.Generator().manual_seed(5)
        mask = torch.rand(n, m, generator=gen) > 0.4
        mask[0] = False
        make_graph = lambda b: G.Mask(mask)  # noqa: E731
    elif graph_kind == "float_mask":
        bias = _t(n, m, seed=5)
        make_graph = lambda b: G.Mask(b)  # noqa: E731
    elif graph_kind == "window":
        make_graph = lambda b: G.LocalWindow((2, 3), radius=1)  # noqa: E731
    else:
        make_graph = lambda b: None  # noqa: E731

    inputs = [q, k, v] + extra + ([bias] if bias is not None else [])
    n_extra = len(extra)

    def fn(*xs):
        q_, k_, v_ = xs[:3]
        params = xs[3:3 + n_extra]
        b = xs[3 + n_extra] if bias is not None else None
        return nlgraph.aggregate(q_, k_, v_, make_aff(params), make_graph(b), backend="chunked", options=OPTS)

    # central differences at eps = 1e-6 err by ~eps^2 |f^(3)| / 6 (~1e-12 x O(10)) plus
    # ~100 u |f| / eps (~1e-8): far below atol 1e-6 (+ rtol 1e-5 of the Jacobian entry)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_exclude_self_algebra_and_chunked():
    q, k, v = _t(5, 3, seed=1), _t(5, 3, seed=2), _t(5, 2, seed=3)
    w = _t(6, seed=4)
    for backend in ("algebra", "chunked"):
        for aff in (lambda: A.DotProduct(), lambda: A.Concatenation(w)):
            fn = lambda q_, k_, v_: nlgraph.aggregate(q_, k_, v_, aff(), G.ExcludeSelf(), backend=backend,  # noqa: E731
                                                     options=OPTS if backend == "chunked" else None)
            assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-5)  # as above


def test_no_nan_gradient_through_fully_masked_float_rows():
    q, k, v = _t(4, 3, seed=1), _t(4, 3, seed=2), _t(4, 2, seed=3)
    bias = torch.zeros(4, 4, dtype=torch.float64)
    bias[1] = -math.inf
    bias.requires_grad_(True)
    y = nlgraph.aggregate(q, k, v, graph=G.Mask(bias), backend="chunked", options=OPTS)
    assert torch.equal(y[1], torch.zeros(2, dtype=torch.float64))
    y.sum().backward()
    for t in (q, k, v, bias):
        assert torch.isfinite(t.grad).all()


# ---------------------------------------------------------------------------------------------
# torch.func: the custom Functions (setup_context, generated vmap rule) under vmap and jacrev.
# Both sides are float64 sums of a few terms of O(1) magnitude, computed in different orders:
# agreement to 1e-12 (u = 1.1e-16 times sums of at most ~20 terms, with room).
# ---------------------------------------------------------------------------------------------

FUNC_CASES = {
    "softmax": (lambda t: A.Softmax(), lambda t: None),
    "gaussian_c1_mask": (lambda t: A.Gaussian(1.3, normalize=False), lambda t: G.Mask(t["bool_mask"])),
    "gaussian_offset": (lambda t: A.Gaussian(0.8, offset=0.5), lambda t: G.ExcludeSelf()),
    "gaussian_cutoff": (lambda t: A.Gaussian(0.8, offset=0.2, cutoff=0.9), lambda t: G.ExcludeSelf()),
    "softmax_float_mask": (lambda t: A.Softmax(), lambda t: G.Mask(t["float_mask"])),
    "dot_window": (lambda t: A.DotProduct(), lambda t: G.LocalWindow((2, 3), radius=1)),
    "concat": (lambda t: A.Concatenation(t["w"]), lambda t: G.Mask(t["bool_mask"])),
}


def _func_tensors():
    gen = torch.Generator().manual_seed(21)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    mask = torch.rand(6, 6, generator=gen) > 0.3
    mask[2] = False  # an empty row
    return {"q": rnd(6, 3), "k": rnd(6, 3), "v": rnd(6, 2), "w": rnd(6), "bool_mask": mask,
            "float_mask": rnd(6, 6), "qb": rnd(4, 6, 3)}


@pytest.mark.parametrize("case", list(FUNC_CASES))
def test_chunked_under_torch_func_matches_reference(case):
    t = _func_tensors()
    make_aff, make_graph = FUNC_CASES[case]

    def fn(backend):
        def f(q, k, v):
            return nlgraph.aggregate(q, k, v, make_aff(t), make_graph(t), backend=backend,
                                     options=OPTS if backend == "chunked" else None)
        return f

    q, k, v = t["q"], t["k"], t["v"]
    for argnum in (0, 1, 2):
        jac = torch.func.jacrev(fn("chunked"), argnums=argnum)(q, k, v)
        want = torch.func.jacrev(fn("reference"), argnums=argnum)(q, k, v)
        torch.testing.assert_close(jac, want, atol=1e-12, rtol=1e-12,
                                   msg=lambda m: f"jacrev argnum {argnum}: {m}")
    # vmap over a batch of queries (per-sample code, batched by the generated rule) == the batched op
    y = torch.func.vmap(fn("chunked"), in_dims=(0, None, None))(t["qb"], k, v)
    torch.testing.assert_close(y, fn("reference")(t["qb"], k, v), atol=1e-12, rtol=1e-12)
    # vmap of per-sample gradients (vmap over grad): the backward runs batched
    g = torch.func.vmap(torch.func.grad(lambda q_: fn("chunked")(q_, k, v).sum()))(t["qb"])
    g_ref = torch.stack([torch.func.grad(lambda q_: fn("reference")(q_, k, v).sum())(qi) for qi in t["qb"]])
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("blocks", [(3, 4), (2, 6), (6, 6), (4, 5)])
def test_chunked_reused_tiles_full_float_mask(blocks):
    """The tile loop reuses one score buffer and one dP buffer for all tiles; a float mask with every
    batch dim has a gradient tile that is dP's buffer itself, which must be kept, not overwritten by
    the next tile (found by this test: max error 2.2 before the copy). Forward and every gradient ==
    the materialised float64 formula."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 6, 3, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    b = torch.randn(2, 6, 6, generator=gen, dtype=torch.float64).requires_grad_()
    dy = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64)
    opts = {"block_n": blocks[0], "block_m": blocks[1]}
    y = nlgraph.aggregate(q, k, v, None, G.Mask(b), backend="chunked", options=opts)
    want = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(3) + b, -1) @ v
    got_g = torch.autograd.grad(y, (q, k, v, b), dy)
    want_g = torch.autograd.grad(want, (q, k, v, b), dy)
    # float64 chains of length <= 12 with |terms| <= ~10: ~1e-14; TOL as the other float64 checks
    torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-10)
    for g, w in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", ["chunked", "chunked_mask", "window", "criss_cross", "permutohedral"])
def test_inference_skips_the_function_bit_for_bit(case):
    """Without gradients the backends run their Function's forward directly (no autograd bookkeeping):
    the same bits as through ``apply`` with gradients on."""
    gen = torch.Generator().manual_seed(3)
    shape = (2, 12, 4) if case != "permutohedral" else (1, 40, 2)
    q, k, v = (torch.randn(*shape, generator=gen) for _ in range(3))
    aff, graph, backend, opts = None, None, "chunked", {"block_n": 5, "block_m": 7}
    if case == "chunked_mask":
        graph = G.Mask(torch.rand(12, 12, generator=gen) > 0.3)
    elif case == "window":
        graph, backend, opts = G.LocalWindow((3, 4), radius=1), "grid", None
    elif case == "criss_cross":
        graph, backend, opts = G.CrissCross((3, 4)), "grid", None
    elif case == "permutohedral":
        aff, backend, opts = A.Gaussian(bandwidth=1.0), "permutohedral", None
    with torch.no_grad():
        plain = nlgraph.aggregate(q, k, v, aff, graph, backend=backend, options=opts)
    tracked = nlgraph.aggregate(*(t.clone().requires_grad_() for t in (q, k, v)), aff, graph, backend=backend,
                                options=opts)
    assert tracked.grad_fn is not None
    assert torch.equal(plain, tracked.detach())
