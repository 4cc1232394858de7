"""The permutohedral lattice differentiated w.r.t. its features and bandwidth (issue 18, item 1).

The derivative is that of the lattice's own output (splat/slice weights linear in the points inside
a simplex, the blur fixed): checked against directional central differences of the lattice itself
(float64, away from simplex boundaries) and gradcheck; then against the exact Gaussian's gradient
(the materialised formula of tests/formulas.py) within the band the interpolation argument gives.
"""

from __future__ import annotations

import pytest
import torch

import nlgraph
from nlgraph import affinity as A
from nlgraph.backends import permutohedral as P

from .formulas import aggregate_formula
from .test_permutohedral import crf_like_features, rel_error

F64 = torch.float64
U64 = torch.finfo(F64).eps / 2


def _structure(q: torch.Tensor, k: torch.Tensor, same: bool):
    lat = P.build_lattice(q.detach(), k.detach(), same, corners=True)
    return lat.corners, lat.positions, lat.num_vertices


def _case(d, same, seed, batch=2, n=40, m=30):
    gen = torch.Generator().manual_seed(seed)
    q = torch.rand(batch, n, d, generator=gen, dtype=F64) * 4
    k = q if same else torch.rand(batch, m, d, generator=gen, dtype=F64) * 4
    v = torch.rand(batch, k.shape[1], 3, generator=gen, dtype=F64)
    bw = 0.8 + torch.rand(d, generator=gen, dtype=F64)
    return gen, q, k, v, bw


@pytest.mark.parametrize("d", [2, 5])
@pytest.mark.parametrize("same", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
def test_directional_derivative_matches_central_differences(d, same, normalize):
    """<grad, t> == (L(x + eps t) - L(x - eps t)) / (2 eps) for features AND a (d,) bandwidth.

    Away from simplex boundaries (asserted: the perturbed points build the same simplices) the
    lattice output is a rational function of degree <= 2 over 2 in eps (bilinear in the query and
    key weights, each linear in the points), so the central difference is exact up to O(eps^2)
    (normalised) and rounding: each output is a sum of non-negative terms with relative error
    <= c u, c = (max splat row + 4 (d+1) + 4) as in test_permutohedral's _operator_bound, so the
    difference quotient errs by <= 2 c u sum |g y| / (2 eps) (x2 for the normalising division)."""
    gen, q0, k0, v, bw0 = _case(d, same, seed=10 * d + 2 * same + normalize)
    q = q0.clone().requires_grad_(True)
    k = q if same else k0.clone().requires_grad_(True)
    bw = bw0.clone().requires_grad_(True)

    def loss(q, k, b, g):
        y = nlgraph.aggregate(q, k, v, A.Gaussian(b, normalize=normalize), backend="permutohedral")
        return (y * g).sum(), y

    g = torch.randn(q.shape[0], q.shape[1], v.shape[-1], generator=gen, dtype=F64)
    (ref, y) = loss(q, k, bw, g)
    inputs = (q, bw) if same else (q, k, bw)
    grads = torch.autograd.grad(ref, inputs)
    tangents = [torch.randn(t.shape, generator=gen, dtype=F64) for t in inputs]
    eps = 1e-6

    def moved(sign):
        x = [t.detach() + sign * eps * dt for t, dt in zip(inputs, tangents, strict=True)]
        return (x[0], x[0], x[1]) if same else tuple(x)

    plus, minus = moved(1), moved(-1)
    base = _structure(q0 / bw0, k0 / bw0, same)
    for pq, pk, pb in (plus, minus):
        moved_structure = _structure(pq / pb, pk / pb, same)
        assert moved_structure[2] == base[2]
        assert torch.equal(moved_structure[0], base[0]) and torch.equal(moved_structure[1], base[1])
    with torch.no_grad():
        fd = (loss(*plus, g)[0] - loss(*minus, g)[0]) / (2 * eps)
    analytic = sum((gr * t).sum() for gr, t in zip(grads, tangents, strict=True))
    lat = P.build_lattice(q0 / bw0, k0 / bw0, same)
    c = int(lat.splat.crow_indices().diff().max()) + 4 * (d + 1) + 4
    tol = 2 * (2 * c * U64 * float((g * y.detach()).abs().sum()) / (2 * eps)) + 1e-9 * abs(float(fd))
    assert abs(float(fd - analytic)) <= tol, (float(fd), float(analytic), tol)


@pytest.mark.parametrize("same", [True, False])
def test_gradcheck_features_and_bandwidth(same):
    """float64 gradcheck of the custom backward w.r.t. features and bandwidth on a small case (the
    values' gradient is gradchecked in test_permutohedral); one lattice build per perturbed input."""
    _, q0, k0, v, bw0 = _case(2, same, seed=5, batch=1, n=8, m=6)
    q = q0.clone().requires_grad_(True)
    k = k0.clone().requires_grad_(True)
    bw = bw0.clone().requires_grad_(True)
    if same:
        fn = lambda q, b: nlgraph.aggregate(q, q, v, A.Gaussian(b, normalize=True),  # noqa: E731
                                            backend="permutohedral")
        assert torch.autograd.gradcheck(fn, (q, bw), eps=1e-6, atol=1e-7)
    else:
        fn = lambda q, k, b: nlgraph.aggregate(q, k, v, A.Gaussian(b, normalize=False),  # noqa: E731
                                               backend="permutohedral")
        assert torch.autograd.gradcheck(fn, (q, k, bw), eps=1e-6, atol=1e-7)


# Measured (`pytest -s`, 2026-12-01), relative errors against the exact Gaussian, unnormalised filter
# (what the dense CRF's messages use), 2 x 24 x 20 crf-like images:
#   smoothness d=2: value 0.127, feature gradient 0.186 (cosine 0.984), bandwidth gradient 0.085;
#   appearance d=5: value 0.603, feature gradient 0.750 (cosine 0.662), bandwidth gradient 0.695.
# The band: the lattice slices a blurred field by piecewise-linear interpolation over cells of width
# h; linear interpolation errs by <= h^2/8 |F''| in value but by <= h/2 |F''| in slope, and for a
# Gaussian-profile field of std s, |F'| ~ |F| / s: the relative slope error is ~4 s / h times the
# relative value error. The lattice is scaled so that its blur is a Gaussian of about one lattice step
# (h ~ s), so a gradient error within 4x the value error on the same points is the expected order;
# measured ratios are 0.67-1.5. (Like the value errors in test_permutohedral, these are the
# algorithm's deterministic errors, not rounding: the same on every machine.)
GRAD_BAND = 4.0


@pytest.mark.parametrize("kw", [dict(theta_xy=3.0), dict(theta_xy=8.0, theta_rgb=13.0)])
def test_gradient_agrees_with_the_exact_gaussian_within_the_band(kw):
    f0 = crf_like_features(2, 24, 20, dtype=F64, **kw)
    gen = torch.Generator().manual_seed(1)
    v = torch.softmax(torch.randn(2, f0.shape[1], 4, generator=gen, dtype=F64), -1)
    # a positive cotangent, as a message's (softmax marginals times positive kernel weights): with a
    # signed one the bandwidth gradient (a sum over every point) cancels to noise in both
    g = torch.rand(2, f0.shape[1], 4, generator=gen, dtype=F64)
    bw0 = torch.ones(f0.shape[-1], dtype=F64)
    out = {}
    for name in ("lattice", "exact"):
        f = f0.clone().requires_grad_(True)
        bw = bw0.clone().requires_grad_(True)
        if name == "lattice":
            y = nlgraph.aggregate(f, f, v, A.Gaussian(bw, normalize=False), backend="permutohedral")
        else:
            y = aggregate_formula("gaussian_unnorm", f, f, v, dict(bandwidth=bw))
        out[name] = (y.detach(), *torch.autograd.grad((y * g).sum(), (f, bw)))
    (ya, gfa, gba), (ye, gfe, gbe) = out["lattice"], out["exact"]
    val, feat, band = rel_error(ya, ye), rel_error(gfa, gfe), rel_error(gba, gbe)
    cos = float((gfa * gfe).sum() / gfa.norm() / gfe.norm())
    print(f"\nlattice vs exact gradient {kw}: value {val:.3f}, features {feat:.3f} (cosine {cos:.3f}), "
          f"bandwidth {band:.3f}")
    assert feat <= GRAD_BAND * val and band <= GRAD_BAND * val


def test_unsupported_derivatives_refuse_clearly():
    """Forward mode and vmap through a lattice whose features need gradients raise; the explicit
    backend accepts features that need gradients, automatic dispatch still picks an exact backend."""
    f = torch.rand(30, 3, dtype=F64) * 3
    v = torch.rand(30, 2, dtype=F64)
    aff = A.Gaussian(1.0, normalize=False)
    fn = lambda f: nlgraph.aggregate(f, f, v, aff, backend="permutohedral").sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(fn, (f,), (torch.ones_like(f),))
    fr = f.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(fr), fr)
    torch.testing.assert_close(torch.func.grad(fn)(f), g, rtol=0, atol=0)  # torch.func.grad: the same
    lat = P.build_lattice(f[None], f[None], True, corners=True)
    with pytest.raises(NotImplementedError, match="vmap"):
        torch.func.vmap(lambda x: P._LatticePointFilter.apply(v, x, x, lat))(f[None])
    assert nlgraph.select_backend(fr, fr, v, aff, None)[0] != "permutohedral"
