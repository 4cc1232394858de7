"""The ``sdpa`` backend and aggregate's SDPA arguments (is_causal, scale, enable_gqa).

Every path is compared with a materialised float64 formula written here (tests/formulas.py) and with
``torch.nn.functional.scaled_dot_product_attention`` itself, forward and every gradient. GQA, causal
and scale are compared with SDPA on every exact backend the dispatch lists for the case.

Tolerances: float64 throughout (formulas.TOLERANCES: rtol 1e-9, atol 1e-10: sums of <= 13 terms of
O(1) magnitude and softmax weights <= 1 round by ~1e-15), float32 against SDPA in float32 with the
table's float32 entry (its derivation covers these sizes: N, M <= 33, d <= 16).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import nlgraph
from nlgraph import affinity as A
from nlgraph import graph as G
from nlgraph.backends import sdpa
from nlgraph.dispatch import exact_backends, select_backend

from .formulas import TOLERANCES, aggregate_formula

F64 = torch.float64
RTOL, ATOL = TOLERANCES[F64]
B, H, N, M, D = 2, 3, 7, 9, 4


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _r(*shape, seed=0, grad=True, dtype=F64):
    return torch.randn(*shape, generator=_gen(seed), dtype=F64).to(dtype).requires_grad_(grad)


def _qkv(n=N, m=M, d=D, e=D, lead=(B, H), dtype=F64):
    return _r(*lead, n, d, seed=1, dtype=dtype), _r(*lead, m, d, seed=2, dtype=dtype), \
        _r(*lead, m, e, seed=3, dtype=dtype)


def _close(actual, expected, what, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check(y, y_ref, leaves, what, rtol=RTOL, atol=ATOL):
    """Forward and the gradient of every leaf (None where one side has none: zeros)."""
    _close(y, y_ref, f"forward, {what}", rtol, atol)
    dout = torch.randn(y_ref.shape, generator=_gen(9), dtype=F64).to(y.dtype)
    g = torch.autograd.grad(y, leaves, dout, allow_unused=True)
    g_ref = torch.autograd.grad(y_ref, leaves, dout, allow_unused=True)
    for i, (a, b) in enumerate(zip(g, g_ref, strict=True)):
        a = torch.zeros_like(leaves[i]) if a is None else a
        b = torch.zeros_like(leaves[i]) if b is None else b
        _close(a, b, f"d/d(leaf {i}), {what}", rtol, atol)


def _bool_mask(shape, seed=4):
    m = torch.rand(*shape, generator=_gen(seed)) > 0.4
    m[..., 0] = True
    return m


# ---------------------------------------------------------------------------------------------
# every case the backend takes == the formula and == SDPA
# ---------------------------------------------------------------------------------------------

def _softmax_cases():
    """(label, affinity, graph, formula params, adjacency, bias, SDPA kwargs, extra leaves)."""
    s = torch.tensor(0.6, dtype=F64, requires_grad=True)
    bm = _bool_mask((B, 1, N, M))
    fm = _r(1, H, N, M, seed=5)
    fm_fixed = _r(N, M, seed=6, grad=False)
    causal = torch.ones(N, M, dtype=torch.bool).tril()
    yield "plain", A.Softmax(), None, {}, None, None, {}, []
    yield "float scale", A.Softmax(scale=0.3), None, {"scale": 0.3}, None, None, {"scale": 0.3}, []
    yield "tensor scale", A.Softmax(scale=s), None, {"scale": s}, None, None, {"scale": None}, [s]
    yield "bool mask", A.Softmax(), G.Mask(bm), {}, bm, None, {"attn_mask": bm}, []
    yield "float mask with grad", A.Softmax(), G.Mask(fm), {}, None, fm, {"attn_mask": fm}, [fm]
    yield "float mask", A.Softmax(), G.Mask(fm_fixed), {}, None, fm_fixed, {"attn_mask": fm_fixed}, []
    yield "causal", A.Softmax(), G.Causal(), {}, causal, None, {"is_causal": True}, []
    yield ("causal & float mask", A.Softmax(), G.Causal() & G.Mask(fm), {}, causal, fm,
           {"attn_mask": fm.masked_fill(~causal, -math.inf)}, [fm])
    yield ("bool & float masks", A.Softmax(), G.Mask(bm) & G.Mask(fm), {}, bm, fm,
           {"attn_mask": fm.masked_fill(~bm, -math.inf)}, [fm])


@pytest.mark.parametrize("case", list(_softmax_cases()), ids=lambda c: c[0])
def test_softmax_cases_match_formula_and_sdpa(case):
    label, aff, graph, params, adj, bias, kwargs, extra = case
    q, k, v = _qkv()
    leaves = [q, k, v] + extra
    y = nlgraph.aggregate(q, k, v, aff, graph, backend="sdpa")
    _check(y, aggregate_formula("softmax", q, k, v, params, adj, bias), leaves, f"{label} vs formula")
    if kwargs.get("scale", 0) is None:  # a trainable scale: SDPA sees it folded into the queries
        y_ref = F.scaled_dot_product_attention(q * params["scale"], k, v, scale=1.0)
    else:
        y_ref = F.scaled_dot_product_attention(q, k, v, **kwargs)
    y = nlgraph.aggregate(q, k, v, aff, graph, backend="sdpa")
    _check(y, y_ref, leaves, f"{label} vs SDPA")
    assert select_backend(q, k, v, aff, graph)[0] == "sdpa"


def test_exclude_self_is_a_mask():
    q, k, v = _qkv(n=M)
    adj = 1.0 - torch.eye(M, dtype=F64)
    y = nlgraph.aggregate(q, k, v, graph=G.ExcludeSelf(), backend="sdpa")
    _check(y, aggregate_formula("softmax", q, k, v, {}, adj), [q, k, v], "ExcludeSelf vs formula")
    y = nlgraph.aggregate(q, k, v, graph=G.ExcludeSelf(), backend="sdpa")
    _check(y, F.scaled_dot_product_attention(q, k, v, attn_mask=adj > 0), [q, k, v], "ExcludeSelf vs SDPA")
    assert select_backend(q, k, v, A.Softmax(), G.ExcludeSelf())[0] == "sdpa"


@pytest.mark.parametrize("key_grad", [True, False], ids=["bias as a feature", "bias as a mask"])
@pytest.mark.parametrize("bandwidth", ["float", "tensor"])
def test_normalised_gaussian(key_grad, bandwidth):
    """softmax_j(-|q/b - k/b|^2 / 2): the formula's explicit pairwise differences, and SDPA fed the
    expanded form (q/b . k/b with the column bias -|k/b|^2/2 as a (..., 1, M) float mask)."""
    q, k, v = _qkv(e=3)
    k.requires_grad_(key_grad)
    b = torch.tensor([0.8, 1.3, 1.1, 2.0], dtype=F64, requires_grad=True) if bandwidth == "tensor" else 1.4
    leaves = [q, v] + [k] * key_grad + ([b] if bandwidth == "tensor" else [])
    y = nlgraph.aggregate(q, k, v, A.Gaussian(b), backend="sdpa")
    _check(y, aggregate_formula("gaussian", q, k, v, {"bandwidth": b}), leaves, "Gaussian vs formula")
    qb, kb = q / b, k / b
    col = -0.5 * (kb * kb).sum(-1)[..., None, :]
    y_ref = F.scaled_dot_product_attention(qb, kb, v, attn_mask=col, scale=1.0)
    y = nlgraph.aggregate(q, k, v, A.Gaussian(b), backend="sdpa")
    _check(y, y_ref, leaves, "Gaussian vs SDPA with the column bias")
    assert select_backend(q, k, v, A.Gaussian(b), None)[0] == "sdpa"
    lay = sdpa._layout(q, k, v, A.Gaussian(b), None)
    assert lay.augment == (key_grad or bandwidth == "tensor") and lay.mask == (not lay.augment)


def test_gaussian_with_masks_and_causal():
    q, k, v = _qkv()
    bm = _bool_mask((B, 1, N, M))
    causal = torch.ones(N, M, dtype=torch.bool).tril()
    for graph, adj in ((G.Mask(bm), bm), (G.Causal(), causal), (G.Causal() & G.Mask(bm), causal & bm)):
        y = nlgraph.aggregate(q, k, v, A.Gaussian(1.2), graph, backend="sdpa")
        _check(y, aggregate_formula("gaussian", q, k, v, {"bandwidth": 1.2}, adj), [q, k, v], repr(graph))


def test_leading_dims_broadcast_and_3d_inputs():
    """Any number of leading dims, broadcasting on any input and on the mask: 4-D views for SDPA."""
    q, k, v = _r(2, 1, 3, N, D, seed=1), _r(1, 4, 3, M, D, seed=2), _r(2, 4, 1, M, 5, seed=3)
    fm = _r(4, 1, N, M, seed=4)
    y = nlgraph.aggregate(q, k, v, graph=G.Mask(fm), backend="sdpa")
    _check(y, aggregate_formula("softmax", q, k, v, {}, None, fm), [q, k, v, fm], "5-D broadcast")
    q3, k3, v3 = _qkv(lead=(B,))
    y = nlgraph.aggregate(q3, k3, v3, backend="sdpa")
    _check(y, aggregate_formula("softmax", q3, k3, v3, {}), [q3, k3, v3], "3-D")
    q2, k2, v2 = _qkv(lead=())
    y = nlgraph.aggregate(q2, k2, v2, backend="sdpa")
    _check(y, aggregate_formula("softmax", q2, k2, v2, {}), [q2, k2, v2], "2-D")


@pytest.mark.parametrize("e", [2, 3, 4, 8, 9])
def test_value_width_padding(e):
    """e != d: zero-padded to equal widths within 2x (fused kernel), SDPA's math path beyond."""
    q, k, v = _qkv(e=e)
    y = nlgraph.aggregate(q, k, v, backend="sdpa")
    _check(y, aggregate_formula("softmax", q, k, v, {}), [q, k, v], f"e={e}")
    expected = "flash-cpu" if max(D, e) <= 2 * min(D, e) else "math"
    assert sdpa.kernel_for(q, k, v) == expected


def test_empty_rows_give_zeros():
    q, k, v = _qkv()
    bm = _bool_mask((N, M))
    bm[2] = False
    y = nlgraph.aggregate(q, k, v, graph=G.Mask(bm), backend="sdpa")
    assert torch.equal(y[..., 2, :], torch.zeros_like(y[..., 2, :]))
    _check(y, aggregate_formula("softmax", q, k, v, {}, bm), [q, k, v], "empty row")


def test_float32_matches_sdpa():
    q, k, v = _qkv(n=33, m=29, d=16, e=16, dtype=torch.float32)
    rtol, atol = TOLERANCES[torch.float32]
    y = nlgraph.aggregate(q, k, v, backend="sdpa")
    _check(y, F.scaled_dot_product_attention(q, k, v), [q, k, v], "float32", rtol, atol)


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------

def test_dropout_structure_determinism_and_rng():
    """With one-hot values the op returns the dropped weights: each 0 or the undropped weight / (1 - p);
    the same generator seed gives the same mask (y == W @ v), and the global RNG is not advanced."""
    q, k, v = (t.detach() for t in _qkv())
    eye = torch.eye(M, dtype=F64).expand(B, H, M, M)
    p = 0.3
    assert select_backend(q, k, eye, A.Softmax(), None, dropout_p=p)[0] == "sdpa"
    w_full = nlgraph.aggregate(q, k, eye, backend="sdpa")
    w_drop = nlgraph.aggregate(q, k, eye, backend="sdpa", dropout_p=p, generator=_gen(1))
    kept = w_drop != 0
    assert 0 < kept.sum() < kept.numel()
    # weights <= 1 computed in two orders (a few u each, u = 1.1e-16)
    _close(w_drop[kept], w_full[kept] / (1 - p), "kept weights", 1e-12, 1e-14)
    state = torch.get_rng_state()
    y = nlgraph.aggregate(q, k, v, backend="sdpa", dropout_p=p, generator=_gen(1))
    assert torch.equal(torch.get_rng_state(), state)
    # sums of M = 9 terms |w v| <= 4 on each side: <= 2 x 9 u x 4 ~ 1e-14
    _close(y, w_drop @ v, "y == W_dropped @ v", 1e-12, 1e-12)
    torch.manual_seed(5)
    a = nlgraph.aggregate(q, k, v, backend="sdpa", dropout_p=p)
    torch.manual_seed(5)
    assert torch.equal(a, nlgraph.aggregate(q, k, v, backend="sdpa", dropout_p=p))
    assert sdpa.kernel_for(q, k, v, dropout_p=p) == "math"


def test_dropout_gradcheck():
    q, k, v = (t.detach()[:1, :1].requires_grad_(True) for t in _qkv())

    def fn(q, k, v):
        return nlgraph.aggregate(q, k, v, backend="sdpa", dropout_p=0.4, generator=_gen(3))

    # central differences at eps = 1e-6 (truncation ~1e-11, rounding ~1e-8): far below atol 1e-6
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# is_causal, scale, enable_gqa on every exact backend
# ---------------------------------------------------------------------------------------------

SDPA_ARGS = [dict(is_causal=True), dict(scale=0.4), dict(enable_gqa=True),
             dict(enable_gqa=True, is_causal=True, scale=0.2)]


def _backends_for(q, k, v, kwargs, graph=None):
    """The exact backends of the lowered case (as aggregate lowers it)."""
    aff = A.Softmax(scale=kwargs.get("scale"))
    if kwargs.get("is_causal"):
        graph = G.Causal() if graph is None else graph & G.Causal()
    if kwargs.get("enable_gqa"):
        g = q.shape[-3] // k.shape[-3]
        q, k, v = q.unflatten(-3, (k.shape[-3], g)), k.unsqueeze(-3), v.unsqueeze(-3)
        graph = nlgraph.core._gqa_graph(graph, g, g * k.shape[-4])
    return exact_backends(q, k, v, aff, graph)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kwargs", SDPA_ARGS, ids=lambda kw: ",".join(kw))
def test_sdpa_arguments_match_sdpa_on_every_backend(kwargs, masked):
    q, k, v = _r(B, 6, N, D, seed=1), _r(B, 2, M, D, seed=2), _r(B, 2, M, 5, seed=3)
    if not kwargs.get("enable_gqa"):
        k, v = (t.detach().repeat_interleave(3, -3).requires_grad_(True) for t in (k, v))
    mask = _bool_mask((B, 6, N, M)) if masked else None
    if masked and kwargs.get("is_causal"):
        pytest.skip("SDPA refuses attn_mask together with is_causal")
    graph = None if mask is None else G.Mask(mask)
    backends = _backends_for(q, k, v, kwargs, graph)
    assert {"sdpa", "chunked", "reference"} <= set(backends)
    for b in backends:
        y = nlgraph.aggregate(q, k, v, graph=graph, backend=b, **kwargs)
        y_ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
        _check(y, y_ref, [q, k, v], f"{b}, {kwargs}")


def test_causal_rectangular_is_top_left_aligned():
    for n, m in ((4, 9), (9, 4)):
        q, k, v = _qkv(n=n, m=m)
        adj = torch.ones(n, m, dtype=F64).tril()
        for b in _backends_for(q, k, v, {"is_causal": True}):
            y = nlgraph.aggregate(q, k, v, is_causal=True, backend=b,
                                  options={"block_n": 3, "block_m": 2} if b == "chunked" else None)
            _check(y, aggregate_formula("softmax", q, k, v, {}, adj), [q, k, v], f"{b} N={n} M={m}")


def test_gqa_is_views_and_scale_on_dot_product():
    q, k, v = _r(B, 6, N, D, seed=1), _r(B, 2, M, D, seed=2), _r(B, 2, M, D, seed=3)
    call = sdpa._plan(q.unflatten(-3, (2, 3)), k.unsqueeze(-3), v.unsqueeze(-3), A.Softmax(), None)
    assert call.key.data_ptr() == k.data_ptr() and call.key.stride(1) == 0  # no copy of the keys
    kr, vr = (t.repeat_interleave(3, -3) for t in (k, v))
    y = nlgraph.aggregate(q, k, v, A.DotProduct(), enable_gqa=True, scale=0.5)
    _check(y, aggregate_formula("dot", q, kr, vr, {"scale": 0.5}), [q, k, v], "DotProduct scale, GQA")


def test_argument_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"scale is the logit scale of Softmax or DotProduct; Gaussian"):
        nlgraph.aggregate(q, k, v, A.Gaussian(1.0), scale=0.5)
    with pytest.raises(TypeError, match="scale must be None, a float or a one-entry tensor, got str"):
        nlgraph.aggregate(q, k, v, scale="0.5")
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        nlgraph.aggregate(q, k, v, is_causal=1)
    with pytest.raises(ValueError, match=r"enable_gqa needs key and value .* got query \(2, 3, 7, 4\), "
                                         r"key \(2, 2, 9, 4\)"):
        nlgraph.aggregate(q, k[:, :2], v[:, :2], enable_gqa=True)
    with pytest.raises(ValueError, match=r"enable_gqa needs a heads dim \(-3\) .* key has shape \(9, 4\)"):
        nlgraph.aggregate(q, k[0, 0], v[0, 0], enable_gqa=True)
    with pytest.raises(ValueError, match=r"Mask\(mask\) of shape \(2, 2, 7, 9\) has 2 heads"):
        nlgraph.aggregate(q[:, :2].repeat(1, 3, 1, 1), k[:, :2], v[:, :2],
                          graph=G.Mask(_bool_mask((B, 2, N, M))), enable_gqa=True)


# ---------------------------------------------------------------------------------------------
# dispatch and kernel diagnostics
# ---------------------------------------------------------------------------------------------

def test_dispatch_takes_sdpa_only_where_it_is_exact():
    q, k, v = (t.detach() for t in _qkv(n=M))
    for aff, graph in ((A.Softmax(), None), (A.Softmax(), G.Mask(_bool_mask((M, M)))),
                       (A.Gaussian(1.0), None), (A.Softmax(), G.Causal() & G.ExcludeSelf())):
        assert select_backend(q, k, v, aff, graph)[0] == "sdpa", (aff, graph)
    w = torch.ones(M, dtype=F64)
    others = [(A.Gaussian(1.0, normalize=False), None, "C = 1"),
              (A.Gaussian(1.0, offset=0.5), None, "flat top"),
              (A.Gaussian(1.0, cutoff=2.0), None, "cut-off"),
              (A.DotProduct(), None, "not attention"), (A.Softmax(), G.LocalWindow((3, 3), 1), "not "),
              (A.Softmax(), G.EdgeIndex(torch.stack([torch.arange(M)] * 2), w), "not ")]
    for aff, graph, reason in others:
        assert select_backend(q, k, v, aff, graph)[0] != "sdpa", (aff, graph)
        assert reason in sdpa.can_run(q, k, v, aff, graph)[1] or aff.norm != "sum"
    with pytest.raises(nlgraph.BackendError, match="flat top"):
        nlgraph.aggregate(q, k, v, A.Gaussian(1.0, offset=0.5), backend="sdpa")


def test_math_path_left_to_chunked_when_large():
    """A float mask that requires grad runs SDPA's math path (N x M scores): taken only while small."""
    n = 4097
    q = torch.zeros(1, 1, n, 2)
    big = torch.zeros(n, n, requires_grad=True)
    small = torch.zeros(8, 8, requires_grad=True)
    assert select_backend(q, q, q, A.Softmax(), G.Mask(big))[0] == "chunked"
    q8 = q[..., :8, :]
    assert select_backend(q8, q8, q8, A.Softmax(), G.Mask(small))[0] == "sdpa"
    assert sdpa.kernel_for(q8, q8, q8, A.Softmax(), G.Mask(small)) == "math"
    with torch.no_grad():
        assert select_backend(q, q, q, A.Softmax(), G.Mask(big))[0] == "sdpa"  # no grad: the fused kernel


def test_static_kernel_rule_agrees_with_torch():
    """prefer's static rule (no torch call, traceable) == the kernel torch picks (kernel_for)."""
    q, k, v = _qkv()
    fm = _r(N, M, seed=5)
    cases = [(q, k, v, A.Softmax(), None, 0.0), (q, k, v[..., :3], A.Softmax(), None, 0.0),
             (q, k, v[..., :1], A.Softmax(), None, 0.0), (q, k, v, A.Softmax(), G.Mask(fm), 0.0),
             (q, k, v, A.Softmax(), G.Mask(fm.detach()), 0.0), (q, k, v, A.Gaussian(1.0), G.Causal(), 0.0),
             (q, k, v, A.Softmax(), G.Causal(), 0.3),
             (q.transpose(-1, -2).detach().mT, k, v, A.Softmax(), None, 0.0)]
    for q_, k_, v_, aff, graph, p in cases:
        lay = sdpa._layout(q_, k_, v_, aff, graph)
        fused = sdpa._fused_expected(lay, q_.device, p)
        assert (sdpa.kernel_for(q_, k_, v_, aff, graph, dropout_p=p) == "flash-cpu") == fused, (aff, graph, p)


def test_info_names_the_kernel(capsys):
    from nlgraph.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "sdpa" in out and "flash-cpu" in out


# ---------------------------------------------------------------------------------------------
# PyTorch workflows: torch.func and torch.compile on the sdpa backend
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("aff", [A.Softmax(), A.Gaussian(1.3)], ids=["softmax", "gaussian"])
def test_torch_func_vmap_and_jacrev(aff):
    q, k, v = (t.detach() for t in _qkv(lead=(2,)))
    mask = G.Mask(_bool_mask((N, M)))

    def fn(backend):
        return lambda q_, k_, v_: nlgraph.aggregate(q_, k_, v_, aff, mask, backend=backend)

    for argnum in (0, 1, 2):
        jac = torch.func.jacrev(fn("sdpa"), argnums=argnum)(q, k, v)
        want = torch.func.jacrev(fn("reference"), argnums=argnum)(q, k, v)
        _close(jac, want, f"jacrev argnum {argnum}")
    qb = torch.randn(3, *q.shape, generator=_gen(8), dtype=F64)
    _close(torch.func.vmap(fn("sdpa"), in_dims=(0, None, None))(qb, k, v), fn("reference")(qb, k, v), "vmap")


def test_compiles_fullgraph_with_causal_and_gqa():
    q, k, v = _r(B, 6, N, D, seed=1), _r(B, 2, M, D, seed=2), _r(B, 2, M, D, seed=3)

    def fn(q_, k_, v_):
        return nlgraph.aggregate(q_, k_, v_, A.Gaussian(1.5), is_causal=True, enable_gqa=True)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        y, y_eager = compiled(q, k, v), fn(q, k, v)
        _check(y, y_eager, [q, k, v], "compiled vs eager")
    finally:
        torch._dynamo.reset()


def test_bench_attention_peers_compute_the_same_op():
    """The peers of ``nlgraph bench attention`` compute what ours computes (so the ratios compare like with
    like), and every row kind runs at a tiny size. float32 vs float32: bounds of formulas.TOLERANCES[f32]
    scaled by the sizes (N, M <= 64, d <= 8: logit sums <= ~30) are well inside 1e-4."""
    from nlgraph import NonLocal2d
    from nlgraph.bench import attention as bench

    torch.manual_seed(0)
    block = NonLocal2d(8, inter_channels=4, mode="embedded_gaussian")
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(bench._SDPANonLocal(block)(x), block(x), rtol=1e-4, atol=1e-5)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    kb = k / 4.0
    peer = F.scaled_dot_product_attention(q / 4.0, kb, v, attn_mask=-0.5 * (kb * kb).sum(-1)[..., None, :],
                                          scale=1.0)
    torch.testing.assert_close(nlgraph.aggregate(q, k, v, A.Gaussian(4.0)), peer, rtol=1e-4, atol=1e-5)
    for case in (dict(kind="core", n=16, d=8, heads=2, mode="fwd+bwd", impl="auto"),
                 dict(kind="masked", mask="float", n=16, d=8, heads=2, mode="fwd", impl="sdpa", path="math"),
                 dict(kind="masked", mask="padding", n=16, d=8, heads=2, mode="fwd+bwd", impl="auto"),
                 dict(kind="gaussian", n=16, d=8, heads=2, mode="fwd+bwd", impl="sdpa", path="flash-cpu"),
                 dict(kind="mha", n=16, batch=2, impl="nlgraph"),
                 dict(kind="nonlocal", size=4, impl="sdpa-block", path="flash-cpu")):
        bench.make_step(case)()
    names = [bench.describe(p) for p in bench.plan(False, sizes=[1024, 4096])]
    assert "MultiheadAttention B=2 N=1024 E=256 H=8 fwd+bwd" in names
    assert "Gaussian auto H=8 N=4096 d=64 fwd+bwd (peer: constant mask)" in names
    assert "Gaussian auto H=8 N=4096 d=64 fwd+bwd (peer: same gradients)" in names
    # the "same gradients" peer: both of its paths == ours, forward and every gradient
    for path in ("math", "flash-cpu+augmented"):
        bench.make_step(dict(kind="gaussian", n=16, d=8, heads=2, mode="fwd+bwd", impl="sdpa", path=path,
                             grads="same"))()
        q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
        y = bench.gaussian_same_grads(q, k, v, 4.0, path)
        ours = nlgraph.aggregate(q, k, v, A.Gaussian(4.0))
        torch.testing.assert_close(y, ours, rtol=1e-9, atol=1e-10)
        dy = torch.randn_like(y)
        for a, b in zip(torch.autograd.grad(y, (q, k, v), dy), torch.autograd.grad(ours, (q, k, v), dy),
                        strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("scale", [0.0, -0.5, 1e-300, 2.0**-149])
@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_causal_with_a_scale_that_is_not_positive_in_float32(scale, backend):
    """torch's CPU flash kernel masks is_causal's scores with -inf before scaling: scale <= 0 (or one that
    rounds to 0 in float32) gave NaN there; the backend then passes the triangle as a bool mask."""
    q, k, v = (torch.randn(1, 2, 5, 4, generator=_gen(s)) for s in range(3))
    y = nlgraph.aggregate(q, k, v, is_causal=True, scale=scale, backend=backend)
    adj = torch.ones(5, 5, dtype=F64).tril()
    want = aggregate_formula("softmax", q.double(), k.double(), v.double(), {"scale": scale}, adj=adj)
    torch.testing.assert_close(y.double(), want, rtol=2e-4, atol=2e-5)


def test_wide_heads_in_training_run_sdpas_math_kernel_on_cpu(monkeypatch):
    """d >= 512 with gradients, small N M: the math kernel (measured faster there); else flash."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, 2, 24, 512, generator=_gen(s)) for s in range(3))
    assert sdpa.kernel_for(q, k, v) == "flash-cpu"  # no gradient wanted
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    assert sdpa.kernel_for(qg, kg, vg) == "math"
    with torch.no_grad():
        assert sdpa.kernel_for(qg, kg, vg) == "flash-cpu"
    assert sdpa.kernel_for(qg[..., :256], kg[..., :256], vg[..., :256]) == "flash-cpu"  # narrower heads
    y = nlgraph.aggregate(qg, kg, vg)
    with sdpa_kernel([SDPBackend.MATH]):
        want = F.scaled_dot_product_attention(qg, kg, vg)
    assert torch.equal(y, want)  # the math kernel ran (same op, same order)
    dy = torch.randn(y.shape, generator=_gen(9))
    for a, b in zip(torch.autograd.grad(y, (qg, kg, vg), dy), torch.autograd.grad(want, (qg, kg, vg), dy),
                    strict=True):
        assert torch.equal(a, b)
    monkeypatch.setattr(sdpa, "MATH_GRAD_MAX_PAIRS", 24 * 24 - 1)  # just above the limit: flash again
    assert sdpa.kernel_for(qg, kg, vg) == "flash-cpu"
