"""Low precision and degenerate inputs: fp16/bf16 accuracy, huge logits, constant inputs.

fp16/bf16 rule (as flash-attention's tests): compare against the float64 result and allow at most
twice the error that plain PyTorch makes in the same precision on the same inputs (plus a small
absolute floor for errors at the level of the output's own rounding).
"""

from __future__ import annotations

import pytest
import torch

import nlgraph
from nlgraph import affinity as A
from nlgraph import graph as G

from .formulas import aggregate_formula

LOW = [torch.float16, torch.bfloat16]


def _rounding_floor(dtype):
    return 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kind", ["softmax", "gaussian", "gaussian_unnorm", "dot"])
def test_low_precision_error_within_twice_plain_torch(dtype, kind):
    gen = torch.Generator().manual_seed(0)
    q64 = torch.randn(2, 64, 16, generator=gen, dtype=torch.float64)
    k64 = torch.randn(2, 80, 16, generator=gen, dtype=torch.float64)
    v64 = torch.randn(2, 80, 8, generator=gen, dtype=torch.float64)
    params = {"bandwidth": 2.0} if kind.startswith("gaussian") else {}
    aff = {"softmax": A.Softmax(), "gaussian": A.Gaussian(2.0),
           "gaussian_unnorm": A.Gaussian(2.0, normalize=False), "dot": A.DotProduct()}[kind]
    exact = aggregate_formula(kind, q64, k64, v64, params)
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    plain = aggregate_formula(kind, q, k, v, params)  # plain PyTorch, materialised in low precision
    err_plain = (plain.double() - exact).abs().max().item()
    for backend in nlgraph.dispatch.exact_backends(q, k, v, aff, None):
        y = nlgraph.aggregate(q, k, v, aff, backend=backend)
        assert y.dtype == dtype
        err = (y.double() - exact).abs().max().item()
        scale = exact.abs().max().item()
        assert err <= 2 * err_plain + _rounding_floor(dtype) * scale, (backend, err, err_plain)


@pytest.mark.parametrize("dtype", LOW + [torch.float32])
@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_logits_of_magnitude_1e4_stay_finite(dtype, backend):
    gen = torch.Generator().manual_seed(1)
    q = (torch.randn(1, 40, 4, generator=gen) * 50).to(dtype)  # |q.k| up to ~1e4 with scale 1
    k = (torch.randn(1, 40, 4, generator=gen) * 50).to(dtype)
    v = torch.randn(1, 40, 3, generator=gen).to(dtype)
    logits = q.double() @ k.double().transpose(-1, -2)
    assert logits.abs().max() > 5e3
    y = nlgraph.aggregate(q, k, v, A.Softmax(scale=1.0), backend=backend)
    assert torch.isfinite(y).all()
    exact = torch.softmax(logits, -1) @ v.double()
    # the exact softmax of these logits (gaps between a row's largest two >> the logits' rounding) is
    # one-hot to within exp(-gap): y is one value up to the weights' normalisation and the output's
    # rounding, a few eps of max |v|
    tol = 4 * torch.finfo(dtype).eps * v.double().abs().max().item()
    assert (y.double() - exact).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", LOW + [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["softmax", "gaussian", "gaussian_unnorm", "dot", "concat"])
def test_constant_inputs_give_no_nan_gradients(dtype, kind):
    q = torch.ones(2, 12, 4, dtype=dtype, requires_grad=True)
    k = torch.ones(2, 12, 4, dtype=dtype, requires_grad=True)
    v = torch.ones(2, 12, 3, dtype=dtype, requires_grad=True)
    bw = torch.ones(4, dtype=dtype, requires_grad=True)
    w = torch.ones(8, dtype=dtype, requires_grad=True)
    aff = {"softmax": A.Softmax(), "gaussian": A.Gaussian(bw),
           "gaussian_unnorm": A.Gaussian(bw, normalize=False), "dot": A.DotProduct(),
           "concat": A.Concatenation(w)}[kind]
    for backend in nlgraph.dispatch.exact_backends(q, k, v, aff, G.ExcludeSelf()):
        for graph in (None, G.ExcludeSelf()):
            y = nlgraph.aggregate(q, k, v, aff, graph, backend=backend)
            grads = torch.autograd.grad(y.float().sum(), [q, k, v] + list(aff.tensors()))
            assert torch.isfinite(y).all(), backend
            for g in grads:
                assert torch.isfinite(g).all(), (backend, graph)


# ---------------------------------------------------------------------------------------------
# The exact Gaussian far from the origin (pixel coordinates of large images, crops at an offset)
#
# Error model (u = 2^-24, float32). The lowering centres q and k on a common shift inside the
# keys' convex hull, so every centred feature, in bandwidth units, has norm <= D, the diameter of
# the point set q U k / b (computed below in float64, independent of the shift the library picks).
# q' = fl((q - m) / b) carries <= 2u relative error per component; the score s = q'.k' + r + c
# (d-term dot product, two d-term squared norms, three additions, and the softmax's subtraction of
# the running max) then has absolute error
#     delta <= (2 d + 10) u (|q'||k'| + |q'|^2 / 2 + |k'|^2 / 2) <= (2 d + 10) u * 2 D^2,
# so each weight exp(s) is off by a relative e^delta - 1 ~ delta (+ u for exp). A normalised
# output y_i = sum_j p_ij v_j moves by at most 2 delta' max|v| (weights renormalised) plus the
# summation's (M + 4) u max|v|; an unnormalised one (C = 1) by (delta' + (M + 4) u) sum_j f_ij |v_j|.
# Gradients: dq_i = (1/b) sum_j g_ij (k'_j - q'_i) with g = P o (dP - D) (C = sum f) or F o dP
# (C = 1) is summed as products with centred features of norm <= D, so its error is at most
# 4 (delta + (M + d + 8) u) (D / b) sum_j |g_ij| (dk alike over i); dv_j = sum_i p_ij dO_i errs by
# at most 2 (delta + (N + 4) u) sum_i p_ij |dO_i|. Without centring D is replaced by the distance
# from the origin: at 3e3 the relative error was 0.73, at 1e4 ~3.7e6 (issue 13), far outside.
# ---------------------------------------------------------------------------------------------

U32 = 2.0 ** -24


def _gaussian64(q, k, v, b, normalize, offset):
    """float64 formula from explicit differences: y, and the pieces the error bounds need."""
    diff = (q[:, None, :] - k[None, :, :]) / b
    dist = 0.5 * (diff * diff).sum(-1)
    if offset:
        dist = torch.clamp(dist - offset, min=0.0)
    f = torch.exp(-dist)
    if not normalize:
        return f @ v, f
    p = f / f.sum(-1, keepdim=True)
    return p @ v, p


def _diameter(q, k, b):
    pts = torch.cat([q, k]) / b
    return torch.cdist(pts, pts).max().item()


@pytest.mark.parametrize("offset_xy", [0.0, 3e3, 1e4, 1e6])
@pytest.mark.parametrize("kind", ["normalized", "unnormalized", "flat_top"])
def test_gaussian_far_from_origin_matches_float64(offset_xy, kind):
    gen = torch.Generator().manual_seed(7)
    n, m, d, e, b = 24, 20, 3, 2, 1.5
    q = (torch.randn(n, d, generator=gen, dtype=torch.float64) * 2 + offset_xy).float()
    k = (torch.randn(m, d, generator=gen, dtype=torch.float64) * 2 + offset_xy).float()
    v = torch.randn(m, e, generator=gen)
    dout = torch.randn(n, e, generator=gen)
    normalize, off = kind != "unnormalized", (0.5 if kind == "flat_top" else 0.0)
    aff = A.Gaussian(b, normalize=normalize, offset=off)
    q64, k64, v64, do64 = (t.double().requires_grad_(True) for t in (q, k, v, dout))
    y64, w64 = _gaussian64(q64, k64, v64, b, normalize, off)
    gq64, gk64, gv64 = torch.autograd.grad((y64 * do64).sum(), [q64, k64, v64])

    dia = _diameter(q.double(), k.double(), b)
    delta = (2 * d + 10) * U32 * 2 * dia ** 2
    wd = w64.detach()
    dp = do64.detach() @ v64.detach().T  # dP_ij = dO_i . v_j
    if normalize:
        g = wd * (dp - (dp * wd).sum(-1, keepdim=True))
        tol_y = (2 * (delta + U32) + (m + 4) * U32) * 1.1 * v.abs().max().item()
    else:
        g = wd * dp
        tol_y = (delta + U32 + (m + 4) * U32) * 1.1 * (wd @ v64.detach().abs()).max().item()
    tol_q = 4 * (delta + (m + d + 8) * U32) * dia / b * g.abs().sum(1).max().item()
    tol_k = 4 * (delta + (n + d + 8) * U32) * dia / b * g.abs().sum(0).max().item()
    tol_v = 2 * (delta + (n + 4) * U32) * (wd.T @ do64.detach().abs()).max().item()
    assert delta < 1e-2  # the bound is meaningful: the data's spread is small in bandwidth units

    for backend in nlgraph.dispatch.exact_backends(q, k, v, aff, None):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        y = nlgraph.aggregate(qq, kk, vv, aff, backend=backend)
        gq, gk, gv = torch.autograd.grad((y * dout).sum(), [qq, kk, vv])
        for name, got, want, tol in (("y", y, y64, tol_y), ("dq", gq, gq64, tol_q), ("dk", gk, gk64, tol_k),
                                     ("dv", gv, gv64, tol_v)):
            err = (got.double() - want.detach()).abs().max().item()
            assert err <= tol, f"{backend} {name}: error {err:.3g} > bound {tol:.3g} at offset {offset_xy}"


def _assert_float32_gaussian_within_bound(x, v, b: float) -> None:
    """Every exact backend's float32 normalised Gaussian on (x, x, v) within the bound derived from the
    centred features' diameter (in bandwidth units) against the float64 result."""
    n, d = x.shape
    y64, _ = _gaussian64(x.double(), x.double(), v.double(), b, True, 0.0)
    dia = _diameter(x.double(), x.double(), b)
    delta = (2 * d + 10) * U32 * 2 * dia ** 2
    tol = (2 * (delta + U32) + (n + 4) * U32) * 1.1 * v.abs().max().item()
    for backend in nlgraph.dispatch.exact_backends(x, x, v, A.Gaussian(b), None):
        err = (nlgraph.aggregate(x, x, v, A.Gaussian(b), backend=backend).double() - y64).abs().max().item()
        assert err <= tol, (backend, err, tol)


def test_gaussian_tiny_bandwidth_on_clustered_features():
    """Gaussian(1e-4) on features 1 + 1e-4 * noise: in bandwidth units they sit at 1e4 from the origin."""
    gen = torch.Generator().manual_seed(8)
    n, d, e, b = 32, 2, 3, 1e-4
    x = (1.0 + 1e-4 * torch.randn(n, d, generator=gen, dtype=torch.float64)).float()
    v = torch.randn(n, e, generator=gen)
    _assert_float32_gaussian_within_bound(x, v, b)


def test_gaussian_centring_keeps_shapes_and_broadcasting():
    """q (N, d) against keys with a batch dim: the shift broadcasts without copying q per batch."""
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(6, 2, generator=gen, dtype=torch.float64) + 5e3
    k = torch.randn(3, 7, 2, generator=gen, dtype=torch.float64) + 5e3
    v = torch.randn(3, 7, 2, generator=gen, dtype=torch.float64)
    form = A.Gaussian(2.0).form(q, k)
    assert form.query.shape == (6, 2) and form.key.shape == (3, 7, 2)
    want = torch.stack([_gaussian64(q, k[i], v[i], 2.0, True, 0.0)[0] for i in range(3)])
    for backend in nlgraph.dispatch.exact_backends(q, k, v, A.Gaussian(2.0), None):
        torch.testing.assert_close(nlgraph.aggregate(q, k, v, A.Gaussian(2.0), backend=backend), want,
                                   rtol=1e-9, atol=1e-10, msg=backend)


# ---------------------------------------------------------------------------------------------
# Scores that overflow: finite float32 inputs near 1e20 (q.k ~ 1e40 > 3.4e38)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["softmax", "gaussian", "gaussian_unnorm", "dot", "concat"])
def test_overflowing_scores_raise_a_clear_error(kind):
    gen = torch.Generator().manual_seed(10)
    q = torch.randn(6, 3, generator=gen) * 1e20
    v = torch.randn(6, 2, generator=gen)
    aff = {"softmax": A.Softmax(), "gaussian": A.Gaussian(1.0),
           "gaussian_unnorm": A.Gaussian(1.0, normalize=False), "dot": A.DotProduct(),
           "concat": A.Concatenation(torch.full((6,), 1e20))}[kind]
    assert torch.isfinite(q).all()
    # every exact backend (the lattice's own range guard is tested with the lattice)
    for backend in nlgraph.dispatch.exact_backends(q, q, v, aff, None):
        with pytest.raises(ValueError, match="float32 holds at most"):
            nlgraph.aggregate(q, q, v, aff, backend=backend)


@pytest.mark.parametrize("kind", ["softmax", "gaussian", "dot"])
def test_the_same_values_in_float64_give_the_right_answer(kind):
    """What the error suggests works: 1e40 scores fit float64 (the formulas are float64 too)."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(6, 3, generator=gen, dtype=torch.float64) * 1e20
    k = torch.randn(7, 3, generator=gen, dtype=torch.float64) * 1e20
    v = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    aff = {"softmax": A.Softmax(scale=1.0), "gaussian": A.Gaussian(1.0), "dot": A.DotProduct()}[kind]
    # float64 formulas in their stable form (exp(1e40) itself overflows float64; softmax does not)
    diff = q[:, None, :] - k[None, :, :]
    want = {"softmax": lambda: torch.softmax(q @ k.T, -1) @ v,
            "gaussian": lambda: torch.softmax(-0.5 * (diff * diff).sum(-1), -1) @ v,
            "dot": lambda: (q @ k.T) @ v / k.shape[0]}[kind]()
    assert torch.isfinite(want).all()
    for backend in nlgraph.dispatch.exact_backends(q, k, v, aff, None):
        y = nlgraph.aggregate(q, k, v, aff, backend=backend)
        # float64 relative rounding of d-term scores, then of the M-term sums: far below 1e-12
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12 * want.abs().max().item(), msg=backend)


def test_gaussian_on_float32_values_near_1e20_is_right_when_the_spread_fits():
    """Centred, features clustered at 1e20 (spread 1e14, bandwidth 1e14) lose nothing in float32."""
    gen = torch.Generator().manual_seed(12)
    n, d, e, b = 16, 2, 2, 1e14
    x = (1e20 * (1 + 1e-6 * torch.randn(n, d, generator=gen, dtype=torch.float64))).float()
    v = torch.randn(n, e, generator=gen)
    assert torch.isfinite(x).all() and x.abs().min() > 9e19
    _assert_float32_gaussian_within_bound(x, v, b)
