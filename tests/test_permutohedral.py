"""The permutohedral backend: approximation error vs the exact Gaussian filter, exact adjoint, batching."""

from __future__ import annotations

import math

import pytest
import torch

import nlgraph
from nlgraph import affinity as A
from nlgraph import graph as G
from nlgraph.backends import permutohedral as P
from nlgraph.backends.permutohedral import lattice as lattice_module


def crf_like_features(b, h, w, theta_xy, theta_rgb=None, seed=0, dtype=torch.float32):
    """Positions / theta_xy (and a smooth random colour image / theta_rgb): (B, H*W, 2 or 5)."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    pos = torch.stack([ys, xs], -1).reshape(-1, 2) / theta_xy
    feats = [pos.expand(b, -1, -1)]
    if theta_rgb is not None:
        img = torch.rand(b, 3, h // 4 + 1, w // 4 + 1, generator=gen, dtype=dtype) * 255
        img = torch.nn.functional.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)
        feats.append(img.flatten(2).transpose(1, 2) / theta_rgb)
    return torch.cat(feats, -1)


def rel_error(approx, exact):
    return ((approx - exact).norm() / exact.norm()).item()


# Relative errors ||lattice - exact|| / ||exact|| are printed by `pytest -s`; BOUNDS (below) sit
# ~1.3-2.5x above the measurement. These bound the algorithm's approximation error, a deterministic
# function of the points (float rounding moves it by ~1e-6 relative), not a rounding error: the same
# on every machine, so a measured value with a margin is a bound here.
CASES = {
    "smoothness d=2": (dict(theta_xy=3.0), None),
    "appearance d=5": (dict(theta_xy=8.0, theta_rgb=13.0), None),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("normalize", [False, True])
def test_lattice_approximates_exact_gaussian_filter(case, normalize):
    kw, _ = CASES[case]
    f = crf_like_features(2, 24, 20, **kw)
    gen = torch.Generator().manual_seed(1)
    v = torch.softmax(torch.randn(2, f.shape[1], 4, generator=gen), -1)
    aff = A.Gaussian(1.0, normalize=normalize)
    approx = nlgraph.aggregate(f, f, v, aff, backend="permutohedral")
    exact = nlgraph.aggregate(f.double(), f.double(), v.double(), aff, backend="chunked").float()
    err = rel_error(approx, exact)
    print(f"\nlattice vs exact ({case}, normalize={normalize}): relative error {err:.4f}")
    assert err < BOUNDS[(case, normalize)]


# Measured on 2026-11-25 (`pytest -s tests/test_permutohedral.py`): 0.127 / 0.612 unnormalised and
# 0.008 / 0.124 normalised for d = 2 / d = 5. pydensecrf's own lattice shows the same deviation
# (test_matches_pydensecrf_lattice): it is the algorithm's, not this implementation's.
BOUNDS = {("smoothness d=2", False): 0.2, ("appearance d=5", False): 0.8,
          ("smoothness d=2", True): 0.02, ("appearance d=5", True): 0.2}


def test_backward_is_the_exact_adjoint_of_the_forward_filter():
    """grad through the lattice == autograd of the lattice operator materialised as a matrix."""
    f = crf_like_features(1, 6, 7, theta_xy=2.0, theta_rgb=40.0)[0].double()
    n = f.shape[0]
    aff = A.Gaussian(1.0, normalize=False)
    # materialise the (linear) lattice filter column by column: L = filter(I)
    lmat = nlgraph.aggregate(f, f, torch.eye(n, dtype=torch.float64), aff, backend="permutohedral")
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(n, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = nlgraph.aggregate(f, f, v, aff, backend="permutohedral")
    # each entry of lmat errs by <= b |lmat| (b: _operator_bound), the filter of v by <= b |lmat| |v|,
    # and the dense product by <= n u |lmat| |v|
    b = _operator_bound(P.build_lattice(f[None], f[None], True), f.shape[1], torch.float64)
    tol = (2 * b + n * torch.finfo(torch.float64).eps / 2)
    torch.testing.assert_close(y, lmat @ v, rtol=0, atol=tol * float((lmat.abs() @ v.detach().abs()).max()))
    dy = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    (g,) = torch.autograd.grad(y, v, dy)
    v2 = v.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(lmat @ v2, v2, dy)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=tol * float((lmat.abs().T @ dy.abs()).max()))
    # (each blur is symmetric, but on a sparse lattice the d + 1 directions do not commute, so the
    # operator itself is not: the adjoint runs the blurs in reverse order, which the above checks)
    # linear: central differences have no truncation error, only the filter's rounding (~b |lmat| |v|
    # ~ 1e-14 here) over 2 eps: ~1e-8, within atol 1e-7
    assert torch.autograd.gradcheck(lambda t: nlgraph.aggregate(f, f, t, aff, backend="permutohedral"),
                                    (v2,), eps=1e-6, atol=1e-7)


def test_batched_lattice_equals_per_image_lattices():
    f = crf_like_features(3, 10, 9, theta_xy=3.0, theta_rgb=20.0, seed=2)
    v = torch.rand(3, f.shape[1], 5)
    aff = A.Gaussian(1.0, normalize=False)
    batched = nlgraph.aggregate(f, f, v, aff, backend="permutohedral")
    for i in range(3):
        single = nlgraph.aggregate(f[i], f[i], v[i], aff, backend="permutohedral")
        # one image's block of the batched lattice is its own lattice: the same non-negative terms,
        # at most in another order (each side within _operator_bound)
        rtol = 2 * _operator_bound(P.build_lattice(f[i:i + 1], f[i:i + 1], True), f.shape[-1], torch.float32)
        torch.testing.assert_close(batched[i], single, rtol=rtol, atol=0)


def test_cross_filter_queries_differ_from_keys():
    gen = torch.Generator().manual_seed(3)
    k = torch.rand(400, 3, generator=gen, dtype=torch.float64) * 6
    q = torch.rand(150, 3, generator=gen, dtype=torch.float64) * 6
    v = torch.rand(400, 2, generator=gen, dtype=torch.float64)
    aff = A.Gaussian(1.0, normalize=True)
    approx = nlgraph.aggregate(q, k, v, aff, backend="permutohedral")
    exact = nlgraph.aggregate(q, k, v, aff, backend="reference")
    assert rel_error(approx, exact) < 0.05  # the approximation error (as BOUNDS), measured 0.0128


def test_bandwidth_and_lattice_cache():
    f = crf_like_features(1, 8, 8, theta_xy=1.0)
    v = torch.rand(1, 64, 2)
    bw = torch.tensor([3.0, 2.0])
    y1 = nlgraph.aggregate(f, f, v, A.Gaussian(bw, normalize=False), backend="permutohedral")
    y2 = nlgraph.aggregate(f / bw, f / bw, v, A.Gaussian(1.0, normalize=False), backend="permutohedral")
    # the same points (f / bw bit for bit), as one point set and as two: each within _operator_bound
    rtol = 2 * _operator_bound(P.build_lattice(f / bw, f / bw, True), f.shape[-1], torch.float32)
    torch.testing.assert_close(y1, y2, rtol=rtol, atol=0)
    P.clear_cache()
    g = A.Gaussian(1.0, normalize=False)
    nlgraph.aggregate(f, f, v, g, backend="permutohedral")
    lat = P._cache[0].lattice
    nlgraph.aggregate(f, f, v * 2, g, backend="permutohedral")
    assert P._cache[0].lattice is lat  # same features: lattice reused
    fc = f.clone()
    y_copy = nlgraph.aggregate(fc, fc, v, g, backend="permutohedral")
    assert P._cache[0].lattice is lat  # equal features in another tensor (a same-size image): reused
    torch.testing.assert_close(y_copy, nlgraph.aggregate(f, f, v, g, backend="permutohedral"), rtol=0, atol=0)
    f.mul_(1.5)  # in-place change of the features: a new lattice, and the cached copy is not aliased
    y_new = nlgraph.aggregate(f, f, v, g, backend="permutohedral")
    assert P._cache[0].lattice is not lat
    P.clear_cache()
    torch.testing.assert_close(y_new, nlgraph.aggregate(f, f, v, g, backend="permutohedral"), rtol=0, atol=0)
    other = f.clone()
    other[0, 5, 1] += 0.25  # one point differs: no false hit
    y_other = nlgraph.aggregate(other, other, v, g, backend="permutohedral")
    P.clear_cache()
    torch.testing.assert_close(y_other, nlgraph.aggregate(other, other, v, g, backend="permutohedral"),
                               rtol=0, atol=0)


def test_capability_checks_and_dispatch():
    f = torch.rand(50, 3)
    v = torch.rand(50, 2)
    g = A.Gaussian(1.0, normalize=False)
    for aff, graph, needle in ((A.Softmax(), None, "Gaussian affinities only"),
                               (g, G.ExcludeSelf(), "complete graph"),
                               (A.Gaussian(1.0), G.LocalWindow((50,), 2), "complete graph")):
        with pytest.raises(nlgraph.BackendError, match=needle):
            nlgraph.aggregate(f, f, v, aff, graph, backend="permutohedral")
    with pytest.raises(nlgraph.BackendError, match=r"d <= 16"):
        nlgraph.aggregate(torch.rand(5, 17), torch.rand(5, 17), torch.rand(5, 1), g, backend="permutohedral")
    fg = f.clone().requires_grad_(True)  # accepted by name: the lattice's derivative (test_lattice_grad)
    assert nlgraph.aggregate(fg, fg, v, g, backend="permutohedral").requires_grad
    # automatic dispatch: exact for small problems and whenever the features need gradients
    assert nlgraph.select_backend(f, f, v, g, None)[0] == "chunked"
    big = torch.rand(2100, 5)
    assert nlgraph.select_backend(big, big, torch.rand(2100, 2), g, None)[0] == "permutohedral"
    assert nlgraph.select_backend(big.requires_grad_(True), big, torch.rand(2100, 2), g, None)[0] == "chunked"


@pytest.mark.parametrize("kw", [dict(theta_xy=3.0), dict(theta_xy=8.0, theta_rgb=13.0)])
def test_matches_pydensecrf_lattice(kw):
    """Our lattice == the one in pydensecrf's C++ (same filter to float32 rounding).

    pydensecrf does not expose its filter, so one mean-field step exposes it: with a Potts weight of 1
    and no normalisation, log Q1 = -U + L(Q0) - log Z_i, i.e. L(Q0) up to a per-pixel constant.
    """
    dcrf = pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (test dependency) not installed")
    import numpy as np

    f = crf_like_features(1, 24, 20, **kw)[0]
    gen = torch.Generator().manual_seed(1)
    v = torch.softmax(torch.randn(f.shape[0], 4, generator=gen), -1)
    d = dcrf.DenseCRF(f.shape[0], 4)
    d.setUnaryEnergy(np.ascontiguousarray(-np.log(v.numpy()).T))
    d.addPairwiseEnergy(np.ascontiguousarray(f.numpy().T), compat=1.0, kernel=dcrf.DIAG_KERNEL,
                        normalization=dcrf.NO_NORMALIZATION)
    theirs = torch.from_numpy(np.log(np.array(d.inference(1)).T) - np.log(v.numpy()))
    ours = nlgraph.aggregate(f, f, v, A.Gaussian(1.0, normalize=False), backend="permutohedral")
    centred = lambda x: x - x.mean(1, keepdim=True)  # noqa: E731
    # both float32 filters err by <= b |L(Q0)| (b: _operator_bound); pydensecrf's logits -U + L
    # (U = -log Q0), its softmax and our log of it add ~8 u (|L| + |U|); centring cancels, so relative
    # to the centred norm the bound is multiplied by || |L| + |U| || / ||centred L|| (~14-18 here)
    u = torch.finfo(torch.float32).eps / 2
    mag = (ours.double().abs() + v.double().log().abs()).norm() / centred(ours.double()).norm()
    b = _operator_bound(P.build_lattice(f[None], f[None], True), f.shape[1], torch.float32)
    bound = (2 * b + 8 * u) * mag
    assert rel_error(centred(ours), centred(theirs)) < bound


@pytest.mark.parametrize("jit", [True, False], ids=["compiled", "tensor"])
@pytest.mark.parametrize("same", [True, False])
def test_lattice_matrices_satisfy_csr_invariants(monkeypatch, same, jit):
    """Every splat / slice / blur matrix is a valid CSR tensor (rows column-sorted, no duplicates),
    as torch's sparse kernels assume; checked by torch's own validator, for both builders."""
    if jit:
        pytest.importorskip("numba")
    monkeypatch.setattr(lattice_module, "USE_JIT", jit)
    gen = torch.Generator().manual_seed(1)
    q = torch.rand(2, 300, 5, generator=gen) * 4
    k = q if same else torch.rand(2, 200, 5, generator=gen) * 4
    lat = P.build_lattice(q, k, same)
    mats = [lat.splat, lat.splat_t, lat.slice, lat.slice_t, *lat.blurs]
    for m in mats:
        torch.sparse_csr_tensor(m.crow_indices(), m.col_indices(), m.values(), m.shape, check_invariants=True)
    # the splat applied through its point order == the transposed slice of the same points
    v = torch.rand(k.shape[0] * k.shape[1], 3, generator=gen)
    dense_splat = lat.splat_t.to_dense().T
    # sums of at most s non-negative products on either side (the dense zeros add nothing): 2 s u
    s = int(lat.splat.crow_indices().diff().max())
    splat = P._csr_mm(lat.splat, lattice_module.gather(v, lat.splat_order))
    torch.testing.assert_close(splat, dense_splat @ v,
                               rtol=2 * s * torch.finfo(torch.float32).eps / 2, atol=0)


def test_lexicographic_simplex_sort_gives_the_same_lattice(monkeypatch):
    """Wide feature ranges sort simplices by several int64 keys; that path builds the same lattice."""
    monkeypatch.setattr(P.lattice, "USE_JIT", False)  # (the tensor path's sorts)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 400, 6, generator=gen) * 3
    one_key = P.build_lattice(q, q, True)
    monkeypatch.setattr(P, "_ONE_KEY_BITS", 0)  # force (point code, rank digits...) as separate keys
    several = P.build_lattice(q, q, True)
    assert one_key.num_vertices == several.num_vertices
    for a, b in zip([one_key.splat, one_key.slice, *one_key.blurs],
                    [several.splat, several.slice, *several.blurs], strict=True):
        assert torch.equal(a.crow_indices(), b.crow_indices())
        assert torch.equal(a.col_indices(), b.col_indices())
        assert torch.equal(a.values(), b.values())
    assert torch.equal(one_key.splat_order, several.splat_order)


@pytest.mark.parametrize("lo,span", [(-5, 40), (-(2**40), 2**31 - 1), (2**50, 2**31), (0, 2**62)])
def test_narrow_sort_equals_torch_stable_sort(lo, span):
    """Keys whose range fits 32 bits are sorted as int32 offsets: the same sorted keys and the same
    (stable) permutation as torch's int64 sort, with many ties; wider ranges take torch's sort."""
    gen = torch.Generator().manual_seed(5)
    n = 3 * P.lattice._NARROW_SORT_MIN
    key = lo + (torch.rand(n, generator=gen, dtype=torch.float64) * span).long()
    key[:50] = key[50:100]  # ties
    key[0], key[1] = lo, lo + span  # the range's ends
    ordered, perm = P.lattice._sort(key)
    want, want_perm = torch.sort(key, stable=True)
    assert ordered.dtype == torch.long and torch.equal(ordered, want) and torch.equal(perm, want_perm)


def test_narrow_sort_builds_the_same_lattice(monkeypatch):
    """The lattice built through the int32 sorts is the one built through torch's int64 sort."""
    monkeypatch.setattr(P.lattice, "USE_JIT", False)  # (the tensor path's sorts)
    gen = torch.Generator().manual_seed(6)
    q = torch.rand(1, 6000, 3, generator=gen) * 20
    narrow = P.build_lattice(q, q, True)
    monkeypatch.setattr(P.lattice, "_NARROW_SORT_MIN", 1 << 62)
    wide = P.build_lattice(q, q, True)
    for a, b in zip([narrow.splat, narrow.slice, *narrow.blurs], [wide.splat, wide.slice, *wide.blurs],
                    strict=True):
        assert torch.equal(a.crow_indices(), b.crow_indices())
        assert torch.equal(a.col_indices(), b.col_indices())
        assert torch.equal(a.values(), b.values())
    assert torch.equal(narrow.splat_order, wide.splat_order)


def test_segmented_arange_with_empty_runs():
    """The run-wise ranges the vertex-major splat is built from, against a loop, with empty runs
    (inside, first and last) and 32- and 64-bit outputs."""
    gen = torch.Generator().manual_seed(3)
    run = torch.randint(0, 4, (50,), generator=gen)
    run[0] = run[17] = run[-1] = 0
    off = torch.randint(-20, 20, (50,), generator=gen)
    run_start = run.cumsum(0) - run
    total = int(run.sum())
    for step, dtype in ((1, torch.int32), (6, torch.long)):
        expected = [k * step + int(o) for r, o, s in zip(run.tolist(), off, run_start.tolist(), strict=True)
                    for k in range(s, s + r)]
        got = P._segmented_arange(off, run_start, total, step, dtype)
        assert got.dtype == dtype and got.tolist() == expected


@pytest.mark.parametrize("d,scale", [(2, 6.0), (5, 1.0)])  # code spaces of ~1e4 and ~1e7
def test_dense_table_and_binary_search_find_the_same_neighbours(monkeypatch, d, scale):
    """Blur neighbours come from a dense code table in small code spaces and a binary search
    otherwise; forcing each path builds the identical lattice."""
    monkeypatch.setattr(P.lattice, "USE_JIT", False)  # (the tensor path's code look-ups)
    gen = torch.Generator().manual_seed(4)
    q = torch.rand(2, 500, d, generator=gen) * scale
    lattices = []
    for factor in (0, 1 << 40):  # binary search only / dense table only
        monkeypatch.setattr(P, "_DENSE_LOOKUP", factor)
        monkeypatch.setattr(P, "_DENSE_MAX", factor)
        lattices.append(P.build_lattice(q, q, True))
    a, b = lattices
    for x, y in zip(a.blurs, b.blurs, strict=True):
        assert torch.equal(x.crow_indices(), y.crow_indices())
        assert torch.equal(x.col_indices(), y.col_indices())
    present = (a.blurs[0].col_indices().view(-1, 3)[:, [0, 2]] % (a.num_vertices + 1) != 0).sum()
    assert present > 0  # the lattice has neighbours to find


# ----------------------------------------------------------------------------- the lattice cache
# Every case below once returned a stale lattice (or raised). Each result is compared with the same
# call on an empty cache (a fresh build: the identical computation, so bit-equal) and, where the
# features change, with the exact Gaussian filter within the lattice's approximation bound.


#: lattice vs exact for the unnormalised filter on these d <= 5 cases: the loosest of BOUNDS
LOOSEST = max(BOUNDS.values())


def _fresh(q, k, v, aff):
    """The same call with nothing cached: a fresh lattice."""
    P.clear_cache()
    return nlgraph.aggregate(q, k, v, aff, backend="permutohedral")


def _exact(q, k, v, aff):
    return nlgraph.aggregate(q.double(), k.double(), v.double(), aff, backend="chunked").to(v.dtype)


def _lattice(q, k, v, aff):
    return nlgraph.aggregate(q, k, v, aff, backend="permutohedral")


def _case_features(seed=0):
    """A 12 x 10 colour image's bilateral-like features (120, 3) and values (120, 2)."""
    gen = torch.Generator().manual_seed(seed)
    f = crf_like_features(1, 12, 10, theta_xy=2.0, seed=seed)[0]
    f = torch.cat([f, torch.rand(f.shape[0], 1, generator=gen) * 4], 1)
    return f, torch.rand(f.shape[0], 2, generator=gen)


def test_cache_keys_on_tensor_bandwidth_values():
    """Gaussian(tensor([1, 1, 1])) then Gaussian(tensor([3, 3, 3])): the repr of both prints only the
    shape; the second once reused the first's lattice (off by 31)."""
    f, v = _case_features()
    P.clear_cache()
    for bw in (torch.tensor([1.0, 1.0, 1.0]), torch.tensor([3.0, 3.0, 3.0]), torch.tensor([1.0, 2.0, 3.0])):
        aff = A.Gaussian(bw, normalize=False)
        y = _lattice(f, f, v, aff)
        assert rel_error(y, _exact(f, f, v, aff)) < LOOSEST
        torch.testing.assert_close(y, _fresh(f, f, v, aff), rtol=0, atol=0)


def test_cache_sees_in_place_edits_the_version_counter_misses():
    """An in-place edit of the bandwidth tensor, ``x.data.mul_()`` and an edit through numpy-shared
    memory (neither bumps the version counter) all change the answer."""
    f, v = _case_features(1)
    g = A.Gaussian(1.0, normalize=False)
    bw = torch.tensor([1.0, 1.0, 1.0])
    gt = A.Gaussian(bw, normalize=False)
    P.clear_cache()
    _lattice(f, f, v, gt)
    bw.mul_(2.0)
    torch.testing.assert_close(_lattice(f, f, v, gt), _fresh(f, f, v, gt), rtol=0, atol=0)
    x = f.clone()
    _lattice(x, x, v, g)
    x.data.mul_(1.5)
    y = _lattice(x, x, v, g)
    torch.testing.assert_close(y, _fresh(x, x, v, g), rtol=0, atol=0)
    assert rel_error(y, _exact(x, x, v, g)) < LOOSEST
    arr = f.numpy().copy()
    xn = torch.from_numpy(arr)
    _lattice(xn, xn, v, g)
    arr *= 0.5  # through numpy: the tensor's version counter does not move
    y = _lattice(xn, xn, v, g)
    torch.testing.assert_close(y, _fresh(xn, xn, v, g), rtol=0, atol=0)
    assert rel_error(y, _exact(xn, xn, v, g)) < LOOSEST


def test_cache_tells_a_square_tensor_from_its_transpose():
    """x then (x, x.T): the same storage, version and shape, different points (three of them: too few
    for the lattice's approximation to be compared with the exact filter; a fresh build is the check)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(3, 3, generator=gen) * 2
    v = torch.rand(3, 2, generator=gen)
    g = A.Gaussian(1.0, normalize=False)
    P.clear_cache()
    _lattice(x, x, v, g)
    y = _lattice(x, x.T, v, g)
    torch.testing.assert_close(y, _fresh(x, x.T, v, g), rtol=0, atol=0)
    torch.testing.assert_close(_lattice(x.T, x, v, g), _fresh(x.T, x, v, g), rtol=0, atol=0)


def test_cache_keys_on_the_broadcast_batch_shape():
    """The same query tensor with values of different leading dims: the lattice spans the broadcast
    batch (once stale, or an IndexError in the filter)."""
    f, _ = _case_features(2)
    gen = torch.Generator().manual_seed(6)
    g = A.Gaussian(1.0, normalize=False)
    for shapes in (((f.shape[0], 2), (3, f.shape[0], 2)), ((3, f.shape[0], 2), (f.shape[0], 2)),
                   ((2, 1, f.shape[0], 2), (1, 3, f.shape[0], 2))):
        P.clear_cache()
        for shape in shapes:
            v = torch.rand(*shape, generator=gen)
            y = _lattice(f, f, v, g)
            assert y.shape == shape
            torch.testing.assert_close(y, _fresh(f, f, v, g), rtol=0, atol=0)


def test_cache_reuses_lattices_by_value_and_holds_private_copies(monkeypatch):
    """The fast paths: the same features at every call (a CRF's iterations), equal features in another
    tensor (every same-size image's smoothness kernel), normalised or not, build once. The cache keeps
    copies: nothing it holds shares memory with the caller's tensors."""
    f, v = _case_features(3)
    builds = []
    real = P.build_lattice
    monkeypatch.setattr(P, "build_lattice", lambda *a, **kw: builds.append(1) or real(*a, **kw))
    P.clear_cache()
    bw = torch.tensor([2.0, 2.0, 2.0])
    for q, aff in ((f, A.Gaussian(1.0, normalize=False)), (f, A.Gaussian(1.0)), (f.clone(), A.Gaussian(1.0)),
                   (f * 2, A.Gaussian(bw)), (f * 2, A.Gaussian(bw.clone(), normalize=False))):
        _lattice(q, q, v, aff)
    assert len(builds) == 2
    caller = {t.untyped_storage().data_ptr() for t in (f, bw)}
    held = {t.untyped_storage().data_ptr() for t in P._cached_tensors()}
    assert held and not held & caller


def test_lattice_works_under_inference_mode():
    """Inference tensors have no version counter; the lattice (and the modules that use it, and
    automatic dispatch) work under torch.inference_mode, and lattices cached there serve later calls
    with gradients."""
    from crf import DenseCRF

    f, v = _case_features(4)
    g = A.Gaussian(1.0, normalize=False)
    ref = _fresh(f, f, v, g)
    P.clear_cache()
    with torch.inference_mode():
        fi, vi = f.clone(), v.clone()
        torch.testing.assert_close(_lattice(fi, fi, vi, g), ref, rtol=0, atol=0)
        torch.testing.assert_close(_lattice(fi, fi, vi, g), ref, rtol=0, atol=0)
        big = torch.rand(2100, 3)
        assert nlgraph.select_backend(big, big, torch.rand(2100, 2), g, None)[0] == "permutohedral"
        nlgraph.aggregate(big, big, torch.rand(2100, 2), g)
        crf = DenseCRF(num_labels=3, num_iterations=2)
        q_inf = crf(torch.randn(1, 3, 9, 8, generator=torch.Generator().manual_seed(0)),
                    torch.rand(1, 3, 9, 8, generator=torch.Generator().manual_seed(1)))
    vg = v.clone().requires_grad_(True)
    y = _lattice(f, f, vg, g)  # the lattice built under inference mode, now in a graph
    (grad,) = torch.autograd.grad(y.sum(), vg)
    P.clear_cache()
    vg2 = v.clone().requires_grad_(True)
    (grad_fresh,) = torch.autograd.grad(_lattice(f, f, vg2, g).sum(), vg2)
    torch.testing.assert_close(grad, grad_fresh, rtol=0, atol=0)
    q_eager = crf(torch.randn(1, 3, 9, 8, generator=torch.Generator().manual_seed(0)),
                  torch.rand(1, 3, 9, 8, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(q_inf, q_eager, rtol=0, atol=0)


def test_cache_is_thread_safe():
    """Three threads filtering images through the shared cache get the single-threaded results: equal
    features in fresh tensors (hits by value; once a ``list.remove`` race: "x not in list"), then more
    images than cache slots (entries evicted and rebuilt under contention)."""
    import threading

    gen = torch.Generator().manual_seed(7)
    cases = [(torch.rand(4000, 3, generator=gen) * 5, torch.rand(4000, 2, generator=gen)) for _ in range(6)]
    g = A.Gaussian(1.0, normalize=False)
    expected = [_fresh(f, f, v, g) for f, v in cases]
    errors, results = [], {}

    def work(t):
        try:
            for r in range(36):
                i = (r // 3) % 2 if r < 24 else (t + r) % len(cases)
                f, v = cases[i]
                f = f.clone()
                results[(t, r)] = (i, _lattice(f, f, v, g))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(results) == 108
    for i, y in results.values():
        torch.testing.assert_close(y, expected[i], rtol=0, atol=0)


def test_cache_hits_in_three_threads_at_once(monkeypatch):
    """The interleaving that raced, forced: three threads all find the same entry before any of them
    moves it to the front (the comparison waits until all three are in it)."""
    import threading

    f, v = _case_features(8)
    g = A.Gaussian(1.0, normalize=False)
    expected = _fresh(f, f, v, g)
    barrier = threading.Barrier(3, timeout=30)
    real = P._bits_equal
    waiting = threading.local()

    def synchronised(a, b):
        if not getattr(waiting, "done", False):
            waiting.done = True
            barrier.wait()
        return real(a, b)

    monkeypatch.setattr(P, "_bits_equal", synchronised)
    errors, results = [], []

    def work():
        try:
            fc = f.clone()
            results.append(_lattice(fc, fc, v, g))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(results) == 3 and len(P._cache) == 1
    for y in results:
        torch.testing.assert_close(y, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- range and precision


def test_features_beyond_the_lattice_range_raise_a_clear_error():
    """Features of 1e18 once became lattice coordinates of ~1e23, wrapped around in the int64
    conversion and passed the code-space check; now they, a too wide span, and non-finite points
    (possible only below the validated public function) are ValueErrors naming the features."""
    g = A.Gaussian(1.0, normalize=False)
    v = torch.rand(20, 2)
    for offset in (1e18, 1e12):
        f = torch.rand(20, 2) + offset
        with pytest.raises(ValueError, match=r"features divided by the bandwidth reach \|x\| = 1e\+"):
            nlgraph.aggregate(f, f, v, g, backend="permutohedral")
    with pytest.raises(ValueError, match=r"reach \|x\| = 1e\+18"):
        nlgraph.aggregate(torch.ones(20, 2), torch.ones(20, 2), v, A.Gaussian(1e-18, normalize=False),
                          backend="permutohedral")
    wide = torch.zeros(20, 5)
    wide[10:] = 1e10
    with pytest.raises(ValueError, match=r"span too wide a range to index the lattice .* bits of 62"):
        nlgraph.aggregate(wide, wide, v, g, backend="permutohedral")
    bad = torch.rand(1, 20, 2)
    bad[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"reach \|x\| = nan"):
        P.build_lattice(bad, bad, True)


@pytest.mark.parametrize("offset", [0.0, 3e4, 1e7])
def test_float32_features_far_from_the_origin_give_the_float64_lattice(offset):
    """Pixel coordinates of large images and volumes: float32 cannot resolve the barycentric weights
    there, so such points are scaled and elevated in float64. The float32 result then differs from the
    float64 lattice's only by the float32 filter arithmetic: every entry is a sum of non-negative terms
    through splat (at most ``s`` points per vertex), d + 1 three-term blurs and a (d + 1)-term slice,
    plus the weights' and values' own rounding, so its relative error is at most ~(s + 4 (d + 1) + 4) u."""
    f64 = crf_like_features(1, 16, 12, theta_xy=1.5, dtype=torch.float64)[0] + offset
    f32 = f64.float()
    f64 = f32.double()  # the same points
    gen = torch.Generator().manual_seed(9)
    v = torch.rand(f32.shape[0], 3, generator=gen)
    g = A.Gaussian(1.0, normalize=False)
    y32 = nlgraph.aggregate(f32, f32, v, g, backend="permutohedral")
    y64 = nlgraph.aggregate(f64, f64, v.double(), g, backend="permutohedral")
    lat = P.build_lattice(f64[None], f64[None], True)
    s = int(lat.splat.crow_indices().diff().max())
    d = f32.shape[1]
    u = torch.finfo(torch.float32).eps / 2
    torch.testing.assert_close(y32.double(), y64, rtol=(s + 4 * (d + 1) + 4) * u, atol=0)


# ----------------------------------------------------------------------------- torch.func


def _operator_bound(lat, d, dtype):
    """Relative rounding bound of one lattice filter entry (sums of non-negative terms: see
    test_float32_features_far_from_the_origin_give_the_float64_lattice)."""
    s = int(lat.splat.crow_indices().diff().max())
    return (s + 4 * (d + 1) + 4) * torch.finfo(dtype).eps / 2


def test_lattice_filter_is_torch_func_compatible():
    """The autograd Function is setup_context style with jvp and vmap rules: torch.func's jacrev (of the
    public op), jvp, vmap and second derivatives agree with the materialised linear operator."""
    f = crf_like_features(1, 6, 5, theta_xy=1.5, theta_rgb=40.0)[0].double()
    n, d = f.shape
    aff = A.Gaussian(1.0, normalize=False)
    fn = lambda t: nlgraph.aggregate(f, f, t, aff, backend="permutohedral")  # noqa: E731
    lmat = fn(torch.eye(n, dtype=torch.float64))  # column j: the filter of the j-th unit vector
    lat = P.build_lattice(f[None], f[None], True)
    rtol = 2 * _operator_bound(lat, d, torch.float64)  # two computations of one entry, each within the bound
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    jac = torch.func.jacrev(fn)(v)  # through the transposed filter, one unit cotangent per batch entry
    torch.testing.assert_close(jac, torch.einsum("ij,ab->iajb", lmat, torch.eye(3, dtype=torch.float64)),
                               rtol=rtol, atol=0)
    t = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    y, dy = torch.func.jvp(fn, (v,), (t,))
    torch.testing.assert_close(y, fn(v), rtol=0, atol=0)
    torch.testing.assert_close(dy, fn(t), rtol=0, atol=0)  # linear: the JVP is the filter itself
    vs = torch.rand(4, n, 3, generator=gen, dtype=torch.float64)
    batched = torch.func.vmap(lambda x: P._LatticeFilter.apply(x, lat, False))(vs)
    torch.testing.assert_close(batched, torch.stack([lat.filter(x) for x in vs]), rtol=rtol, atol=0)
    batched_t = torch.func.vmap(lambda x: P._LatticeFilter.apply(x, lat, True), in_dims=2, out_dims=2)(
        vs.permute(1, 2, 0))
    torch.testing.assert_close(batched_t, torch.stack([lat.filter(x, transpose=True) for x in vs], 2),
                               rtol=rtol, atol=0)
    # second order: the backward is this Function again (a few inputs: gradgradcheck is O(inputs) filters)
    vg = v[:, :1].clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(fn, (vg,), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- scaled lattices


@pytest.mark.parametrize("jit", [True, False], ids=["compiled", "tensor"])
@pytest.mark.parametrize("same", [True, False])
def test_scaled_lattice_is_the_diagonally_scaled_filter(monkeypatch, same, jit):
    """``lattice_of`` is the core op's lattice (bitwise the same filter); ``scaled(r, c)`` filters as
    ``diag(r) K diag(c)`` and its adjoint as ``diag(c) K^T diag(r)``; ``filter``'s ``scale`` / ``add`` /
    ``out`` give ``scale K v + add`` in place, for both builders (the tensor one orders its columns)."""
    if jit:
        pytest.importorskip("numba")
    monkeypatch.setattr(lattice_module, "USE_JIT", jit)
    P.clear_cache()
    gen = torch.Generator().manual_seed(5)
    q = torch.rand(70, 3, generator=gen, dtype=torch.float64) * 5
    k = q if same else torch.rand(50, 3, generator=gen, dtype=torch.float64) * 5
    n, m = q.shape[0], k.shape[0]
    aff = A.Gaussian(1.0, normalize=False)
    lat = P.lattice_of(q, k, aff)
    assert (lat.splat_order is None) == jit
    v = torch.rand(m, 4, generator=gen, dtype=torch.float64)
    assert torch.equal(lat.filter(v), nlgraph.aggregate(q, k, v, aff, backend="permutohedral"))
    kmat = lat.filter(torch.eye(m, dtype=torch.float64))  # (n, m): column j filters unit vector j
    r = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    c = r if same else torch.rand(m, generator=gen, dtype=torch.float64) + 0.5
    # every quantity is a sum of non-negative terms: each side within the filter's relative bound b
    # of the exact value, plus the dense product's m u and the scalings' few roundings
    b = _operator_bound(lat, q.shape[1], torch.float64)
    rtol = 2 * b + (m + 6) * torch.finfo(torch.float64).eps / 2
    for rows, cols in ((r, c), (r, None), (None, c)):
        sl = lat.scaled(rows, cols)
        rr = torch.ones(n, dtype=torch.float64) if rows is None else rows
        cc = torch.ones(m, dtype=torch.float64) if cols is None else cols
        torch.testing.assert_close(sl.filter(v), rr[:, None] * (kmat @ (cc[:, None] * v)), rtol=rtol, atol=0)
        w = torch.rand(n, 2, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(sl.filter(w, transpose=True), cc[:, None] * (kmat.T @ (rr[:, None] * w)),
                                   rtol=rtol, atol=0)
    sl = lat.scaled(r, c)
    add = torch.rand(n, 4, generator=gen, dtype=torch.float64)
    want = 2.5 * sl.filter(v) + add
    out = torch.empty(n, 4, dtype=torch.float64)
    assert sl.filter(v, scale=2.5, add=add, out=out) is out
    torch.testing.assert_close(out, want, rtol=2 * torch.finfo(torch.float64).eps, atol=0)
    aliased = add.clone()
    sl.filter(v, scale=2.5, add=aliased, out=aliased)  # out may be add (the CRF's in-place accumulation)
    torch.testing.assert_close(aliased, want, rtol=2 * torch.finfo(torch.float64).eps, atol=0)
    into = torch.full((n, 4), float("nan"), dtype=torch.float64)  # beta = 0: nothing of out is read
    torch.testing.assert_close(sl.filter(v, scale=-1.0, out=into), -sl.filter(v), rtol=0, atol=0)


def test_scaled_and_lattice_of_refuse_bad_arguments():
    q = torch.rand(30, 2, dtype=torch.float64)
    lat = P.lattice_of(q, q, A.Gaussian(1.0, normalize=False))
    with pytest.raises(ValueError, match=r"rows must be \(30,\) torch.float64, got \(29,\)"):
        lat.scaled(torch.ones(29, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"cols must be \(30,\) torch.float64, got \(30,\) torch.float32"):
        lat.scaled(None, torch.ones(30))
    with pytest.raises(ValueError, match="plain Gaussians"):
        P.lattice_of(q, q, A.Gaussian(1.0, offset=1.0))
    with pytest.raises(ValueError, match="plain Gaussians"):
        P.lattice_of(q, q, A.DotProduct())
    with pytest.raises(TypeError, match="query must be a floating"):
        P.lattice_of(q.long(), q, A.Gaussian(1.0))
    with pytest.raises(ValueError, match="one feature dim"):
        P.lattice_of(q, torch.rand(30, 3, dtype=torch.float64), A.Gaussian(1.0))
    with pytest.raises(ValueError, match="do not broadcast"):
        P.lattice_of(torch.rand(2, 30, 2), torch.rand(3, 30, 2), A.Gaussian(1.0))


@pytest.mark.parametrize("jit", [True, False], ids=["compiled", "tensor"])
@pytest.mark.parametrize("same", [True, False])
def test_in_place_scaling_equals_the_scaled_copy(monkeypatch, same, jit):
    """``lattice_of(..., cache=False)`` is the cached lattice's twin (the same filter, bit for bit) and
    leaves the cache as it was; ``scaled(..., inplace=True)`` on it filters as ``scaled(...)`` on the
    cached one, both ways, reusing the twin's own weights where every use of a matrix takes the same
    factor (and leaving the cached lattice untouched)."""
    if jit:
        pytest.importorskip("numba")
    monkeypatch.setattr(lattice_module, "USE_JIT", jit)
    from nlgraph.backends.permutohedral import cache as cache_module

    P.clear_cache()
    gen = torch.Generator().manual_seed(6)
    q = torch.rand(80, 3, generator=gen) * 5
    k = q if same else torch.rand(60, 3, generator=gen) * 5
    aff = A.Gaussian(1.0, normalize=False)
    cached = P.lattice_of(q, k, aff)
    v = torch.rand(k.shape[0], 3, generator=gen)
    w = torch.rand(q.shape[0], 2, generator=gen)
    before = cached.filter(v)
    r = torch.rand(q.shape[0], generator=gen) + 0.5
    c = r if same else torch.rand(k.shape[0], generator=gen) + 0.5
    for rows, cols in ((r, c), (r, None), (None, c)):
        entries = len(cache_module._cache)
        own = P.lattice_of(q, k, aff, cache=False)
        assert len(cache_module._cache) == entries
        assert own is not cached and torch.equal(own.filter(v), before)
        weights = {own.splat.values().data_ptr(), own.slice.values().data_ptr()}
        copy, inplace = cached.scaled(rows, cols), own.scaled(rows, cols, inplace=True)
        assert torch.equal(inplace.filter(v), copy.filter(v))
        assert torch.equal(inplace.filter(w, transpose=True), copy.filter(w, transpose=True))
        if rows is not None and (cols is rows or not same):  # every use alike: no new weights
            assert inplace.slice.values().data_ptr() in weights
        if not same or (rows is not None and cols is rows):
            assert inplace.splat.values().data_ptr() in weights or cols is None
    assert torch.equal(cached.filter(v), before)  # the cached lattice was never scaled


def test_unit_bandwidth_builds_on_the_features_unchanged():
    """A float bandwidth of 1 skips the division (the build reads the caller's features): the same
    lattice as a tensor bandwidth of 1 (which divides), and the features are left as they were."""
    gen = torch.Generator().manual_seed(8)
    q = torch.rand(2, 90, 3, generator=gen) * 4
    keep = q.clone()
    v = torch.rand(2, 90, 2, generator=gen)
    P.clear_cache()
    a = nlgraph.aggregate(q, q, v, A.Gaussian(1.0), backend="permutohedral")
    P.clear_cache()
    b = nlgraph.aggregate(q, q, v, A.Gaussian(torch.tensor(1.0)), backend="permutohedral")
    assert torch.equal(a, b) and torch.equal(q, keep)


def test_the_elevation_bound_is_the_largest_magnitude():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(300, 4, generator=gen, dtype=torch.float64) * 7
    gain = lattice_module._elevation_gain(4)
    want = float(x.abs().max()) * gain
    for t in (x, x.float(), x.T.contiguous().T, x[::3], -x, x._neg_view()):
        assert lattice_module._elevation_bound(t) == pytest.approx(float(t.abs().max()) * gain, rel=0, abs=0)
    assert lattice_module._elevation_bound(x, x[:2] * 3) == max(want, float(x[:2].abs().max() * 3) * gain)
    bad = x.clone()
    bad[5, 1] = float("nan")
    assert math.isnan(lattice_module._elevation_bound(bad))
    bad[5, 1] = float("-inf")
    assert lattice_module._elevation_bound(bad) == float("inf")
