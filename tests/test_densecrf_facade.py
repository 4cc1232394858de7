"""crf.densecrf / crf.utils == pydensecrf (the `pydensecrf2` build) on scikit-image photos.

Unaries come from a noisy ground truth (30% of labels replaced at random), 5 mean-field
iterations, the same parameters on both sides.

Tolerance (:func:`mean_field_tolerance`): both sides run the same float32 algorithm (our lattice
repeats pydensecrf's elevation step for step) and differ in the order of their float32 sums. Those
sums build the logits -U - compatibility * K(Q), whose magnitude M (up to ~1.4e3 with raw filter
sums in the hundreds, ~14 with normalised kernels) sets the size of every rounding: per step each
side's logits carry ~10 u M (the lattice's sums of non-negative terms, ~sqrt(100) roundings on their
longest path, plus the logit's own rounding), the two sides' logits differ by ~2 x that, and Q, a
softmax (infinity-norm Lipschitz constant 1/2), by ~10 u M. Over k steps these add up (earlier
differences are damped where Q is decided, not amplified): ~10 k u M, asserted as 16 k u M. A label
can then differ only where pydensecrf's top two marginals are within 2 x that bound.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import crf.densecrf as ours
import crf.utils as ours_utils

pydensecrf = pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (test dependency) not installed")
pydensecrf_utils = pytest.importorskip("pydensecrf.utils")
skdata = pytest.importorskip("skimage.data", reason="scikit-image (test dependency) not installed")

IMAGES = {"chelsea": lambda: skdata.chelsea()[::3, ::3], "astronaut": lambda: skdata.astronaut()[::4, ::4]}


def noisy_labels(img, n, seed=0):
    gray = img.astype(np.float64).mean(-1)
    gt = np.minimum((gray / 256 * n).astype(np.int64), n - 1)
    rng = np.random.default_rng(seed)
    return np.where(rng.random(gt.shape) < 0.3, rng.integers(0, n, gt.shape), gt)


U32 = float(np.finfo(np.float32).eps) / 2  # float32 unit roundoff, 2^-24


def logit_scale(d, iters: int) -> float:
    """M: the largest |logit| (tmp1 = -U - pairwise) over ``iters`` mean-field steps of our CRF ``d``
    (a magnitude: both sides compute the same logits up to rounding)."""
    q, tmp1, tmp2 = d.startInference()
    m = 0.0
    for _ in range(iters):
        d.stepInference(q, tmp1, tmp2)
        m = max(m, float(np.abs(tmp1).max()))
    return m


def mean_field_tolerance(m: float, iters: int) -> float:
    """Max |Q difference| of two float32 mean-field runs that round differently (module docstring)."""
    return 16 * iters * U32 * m


def run_both(build, iters: int):
    """(pydensecrf's Q, our Q, the bound) after ``iters`` steps of the CRF ``build(module)`` makes."""
    q_theirs, q_ours = (np.array(build(mod).inference(iters)) for mod in (pydensecrf, ours))
    return q_theirs, q_ours, mean_field_tolerance(logit_scale(build(ours), iters), iters)


def compare(q_theirs, q_ours, tol):
    assert q_ours.dtype == np.float32 and q_ours.shape == q_theirs.shape
    max_diff = np.abs(q_theirs - q_ours).max()
    assert max_diff <= tol, (max_diff, tol)
    differ = q_theirs.argmax(0) != q_ours.argmax(0)
    top2 = np.sort(q_theirs, axis=0)[-2:]
    assert ((top2[1] - top2[0])[differ] <= 2 * tol).all(), "a label differs away from a near-tie"


@pytest.mark.parametrize("image", list(IMAGES))
@pytest.mark.parametrize("n_labels", [2, 21])
@pytest.mark.parametrize("kernels", ["gaussian", "bilateral", "both"])
def test_inference_matches_pydensecrf(image, n_labels, kernels):
    img = np.ascontiguousarray(IMAGES[image]())
    h, w = img.shape[:2]
    unary = pydensecrf_utils.unary_from_labels(noisy_labels(img, n_labels), n_labels, gt_prob=0.7,
                                               zero_unsure=False)

    def build(dcrf):
        d = dcrf.DenseCRF2D(w, h, n_labels)
        d.setUnaryEnergy(unary)
        if kernels in ("gaussian", "both"):
            d.addPairwiseGaussian(sxy=3, compat=3)
        if kernels in ("bilateral", "both"):
            d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10)
        return d

    compare(*run_both(build, 5))


def test_step_inference_and_kl_divergence_match():
    img = np.ascontiguousarray(IMAGES["chelsea"]())
    h, w = img.shape[:2]
    unary = pydensecrf_utils.unary_from_labels(noisy_labels(img, 5), 5, gt_prob=0.6, zero_unsure=False)
    out = []
    for dcrf in (pydensecrf, ours):
        d = dcrf.DenseCRF2D(w, h, 5)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=60, srgb=10, rgbim=img, compat=5)
        q, tmp1, tmp2 = d.startInference()
        steps = []
        for _ in range(4):
            d.stepInference(q, tmp1, tmp2)
            steps.append((d.klDivergence(q), np.array(q, np.float64), np.array(tmp1, np.float64)))
        out.append(steps)
    theirs, mine = out
    compare(theirs[-1][1].astype(np.float32), mine[-1][1].astype(np.float32),
            mean_field_tolerance(max(np.abs(t1).max() for _, _, t1 in mine), len(mine)))
    # KL = sum Q log Q + sum U Q + sum Q P with P = -U - tmp1 (tmp1: our logits). Two parts bound the
    # difference: each side evaluates its own Q, first order sum |dKL/dQ| |Q_theirs - Q_ours| with
    # dKL/dQ = log Q + 1 + U + 2 P; and pydensecrf sums Q P in float32 over n = N L terms, which under
    # random rounding errs by at most lambda sqrt(n) u sum |Q P| with probability 1 - 2 exp(-lambda^2 / 2)
    # (Higham and Mary 2019), lambda = 5 (our sums run in float64; the other terms' float32 products
    # add ~u sum |terms| each).
    u64 = unary.astype(np.float64)
    for (kl_t, q_t, _), (kl_o, q_o, t1) in zip(theirs, mine, strict=True):
        p = -u64 - t1
        grad = np.log(np.maximum(q_o, 1e-20)) + 1 + u64 + 2 * p
        entropy = q_o * np.log(np.maximum(q_o, 1e-20))
        terms = np.abs(q_o * p).sum() + np.abs(entropy).sum() + np.abs(u64 * q_o).sum()
        tol = (np.abs(grad) * np.abs(q_t - q_o)).sum() + 5 * np.sqrt(q_o.size) * U32 * terms
        assert abs(kl_o - kl_t) <= tol, (kl_o, kl_t, tol)
    assert mine[-1][0] <= mine[0][0]  # mean field decreases the KL


@pytest.mark.parametrize("compat", ["scalar", "vector", "matrix"])
@pytest.mark.parametrize("normalization", ["NO_NORMALIZATION", "NORMALIZE_BEFORE", "NORMALIZE_AFTER",
                                           "NORMALIZE_SYMMETRIC"])
def test_compatibility_forms_and_normalisations(compat, normalization):
    img = np.ascontiguousarray(IMAGES["astronaut"]()[::2, ::2])
    h, w = img.shape[:2]
    n = 4
    rng = np.random.default_rng(1)
    c = {"scalar": 4.0, "vector": rng.random(n).astype(np.float32) * 4,
         "matrix": rng.random((n, n)).astype(np.float32) * 4}[compat]
    # pydensecrf needs C-contiguous arrays (its README wraps them in np.ascontiguousarray)
    probs = rng.dirichlet(np.ones(n), size=(h * w)).T
    unary = np.ascontiguousarray(pydensecrf_utils.unary_from_softmax(probs))
    feats = pydensecrf_utils.create_pairwise_bilateral(sdims=(30, 30), schan=(20, 20, 20), img=img, chdim=2)

    def build(dcrf):
        d = dcrf.DenseCRF(h * w, n)
        d.setUnaryEnergy(unary)
        d.addPairwiseEnergy(feats, compat=c, kernel=dcrf.DIAG_KERNEL,
                            normalization=getattr(dcrf, normalization))
        return d

    compare(*run_both(build, 3))


def test_constants_equal_pydensecrf():
    for name in ("CONST_KERNEL", "DIAG_KERNEL", "FULL_KERNEL", "NO_NORMALIZATION", "NORMALIZE_BEFORE",
                 "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC"):
        assert int(getattr(ours, name)) == int(getattr(pydensecrf, name)), name


def test_utils_equal_pydensecrf_utils():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 6, size=(7, 9))
    for zero_unsure in (True, False):
        n_labels = 6 if not zero_unsure else 5
        np.testing.assert_array_equal(
            ours_utils.unary_from_labels(labels, n_labels, 0.8, zero_unsure=zero_unsure),
            pydensecrf_utils.unary_from_labels(labels, n_labels, 0.8, zero_unsure=zero_unsure))
    sm = rng.dirichlet(np.ones(4), size=(7, 9)).transpose(2, 0, 1)
    for scale in (None, 0.6):
        np.testing.assert_array_equal(ours_utils.unary_from_softmax(sm, scale=scale),
                                      pydensecrf_utils.unary_from_softmax(sm, scale=scale))
    np.testing.assert_array_equal(ours_utils.create_pairwise_gaussian((3, 5), (7, 9)),
                                  pydensecrf_utils.create_pairwise_gaussian((3, 5), (7, 9)))
    img = rng.integers(0, 256, size=(7, 9, 3)).astype(np.uint8)
    np.testing.assert_array_equal(
        ours_utils.create_pairwise_bilateral((3, 5), (10, 20, 30), img, chdim=2),
        pydensecrf_utils.create_pairwise_bilateral((3, 5), (10, 20, 30), img, chdim=2))
    np.testing.assert_array_equal(ours_utils.create_pairwise_bilateral((3, 5), 10, img[..., 0]),
                                  pydensecrf_utils.create_pairwise_bilateral((3, 5), 10, img[..., 0]))


SCRIPT = """
import numpy as np
import torch
import {module} as dcrf
from {utils} import unary_from_softmax
rng = np.random.default_rng(0)
img = (rng.random((20, 30, 3)) * 255).astype(np.uint8)
probs = rng.dirichlet(np.ones(3), size=(20, 30)).transpose(2, 0, 1)
d = dcrf.DenseCRF2D(30, 20, 3)
d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
d.addPairwiseGaussian(sxy=(3, 3), compat=3, kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
d.addPairwiseBilateral(sxy=(80, 80), srgb=(13, 13, 13), rgbim=img, compat=10)
Q = d.inference(5)
print(np.argmax(Q, axis=0).reshape((20, 30)).sum(), float(np.array(Q).sum()))
"""


def test_an_unchanged_pydensecrf_script_runs_after_swapping_the_import():
    outs = []
    for module, utils in (("pydensecrf.densecrf", "pydensecrf.utils"), ("crf.densecrf", "crf.utils")):
        proc = subprocess.run([sys.executable, "-c", SCRIPT.format(module=module, utils=utils)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout.split())
    assert outs[0][0] == outs[1][0]  # identical label map (sum of labels)
    # sum of Q over n = 600 pixels x L = 3 labels: n exactly, up to each pixel's normalisation ((L + 1) u
    # each) and numpy's pairwise float32 sum (log2(n L) u of the total), on either side
    n, labels = 600, 3
    assert abs(float(outs[0][1]) - float(outs[1][1])) <= 2 * (math.log2(n * labels) + labels + 1) * U32 * n


def test_input_on_which_pydensecrf_segfaults_raises_here():
    """NaN features crash pydensecrf (SIGSEGV, checked in a subprocess); here they are a ValueError."""
    crash = ("import numpy as np, pydensecrf.densecrf as P\n"
             "d = P.DenseCRF(100, 3); d.setUnaryEnergy(np.random.rand(3, 100).astype(np.float32))\n"
             "d.addPairwiseEnergy(np.full((2, 100), np.nan, np.float32), compat=3.0); d.inference(2)\n")
    proc = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True)
    assert proc.returncode != 0  # -11 (SIGSEGV) on the machines we tried
    d = ours.DenseCRF(100, 3)
    with pytest.raises(ValueError, match="features contains NaN or Inf"):
        d.addPairwiseEnergy(np.full((2, 100), np.nan, np.float32), compat=3.0)


def test_inputs_pydensecrf_silently_misuses_raise_here():
    d = ours.DenseCRF(100, 3)
    feats = np.ones((2, 100), np.float32)
    with pytest.raises(ValueError, match=r"compat vector must have one entry per label \(3,\), got \(50,\)"):
        d.addPairwiseEnergy(feats, compat=np.ones(50, np.float32))
    with pytest.raises(ValueError, match=r"compat matrix must be \(3, 3\), got \(1, 1\)"):
        d.addPairwiseEnergy(feats, compat=np.ones((1, 1), np.float32))
    with pytest.raises(ValueError, match=r"Bad shape for unary energy \(need \(3, 100\), got \(100, 3\)\)"):
        d.setUnaryEnergy(np.ones((100, 3), np.float32))
    u = np.ones((3, 100), np.float32)
    u[0, 0] = np.nan
    with pytest.raises(ValueError, match="unary energy contains NaN"):
        d.setUnaryEnergy(u)
    with pytest.raises(ValueError,
                       match=r"Bad shape for pairwise energy \(Need \(\?, 100\), got \(2, 99\)\)"):
        d.addPairwiseEnergy(np.ones((2, 99), np.float32), compat=1.0)
    with pytest.raises(TypeError, match="unary energy must be a real-valued array"):
        d.setUnaryEnergy(np.full((3, 100), "a"))
    d2 = ours.DenseCRF2D(10, 8, 3)
    with pytest.raises(ValueError,
                       match=r"Bad shape for pairwise bilateral \(Need \(8, 10, 3\), got \(10, 8, 3\)\)"):
        d2.addPairwiseBilateral(5, 5, np.zeros((10, 8, 3), np.uint8), 3)
    with pytest.raises(ValueError, match="rgbim must be a uint8"):
        d2.addPairwiseBilateral(5, 5, np.zeros((8, 10, 3), np.float64), 3)
    with pytest.raises(ValueError, match="normalization must be one of"):
        d2.addPairwiseGaussian(3, 3, normalization=7)
    with pytest.raises(ValueError, match=r"niter must be an int >= 0"):
        d2.inference(-1)


def test_non_contiguous_and_float64_inputs_work():
    """pydensecrf rejects these ('ndarray is not C-contiguous', dtype mismatch); they are valid here."""
    rng = np.random.default_rng(3)
    u = rng.random((40, 3)).T  # non-contiguous float64
    f = rng.random((40, 2)).T * 3
    d1, d2 = ours.DenseCRF(40, 3), ours.DenseCRF(40, 3)
    d1.setUnaryEnergy(u)
    d1.addPairwiseEnergy(f, compat=2.0)
    d2.setUnaryEnergy(np.ascontiguousarray(u, dtype=np.float32))
    d2.addPairwiseEnergy(np.ascontiguousarray(f, dtype=np.float32), compat=2.0)
    np.testing.assert_array_equal(d1.inference(3), d2.inference(3))


@pytest.mark.parametrize("n_labels", [3, 21])
def test_inference_with_reused_buffers_equals_fresh_steps(n_labels):
    """inference() reuses its buffers (and, above 4 labels, a softmax written into one); stepping by
    hand runs the plain path with fresh arrays. Both give the same Q (float32 rounding)."""
    img = np.ascontiguousarray(IMAGES["astronaut"]())
    h, w = img.shape[:2]
    unary = pydensecrf_utils.unary_from_labels(noisy_labels(img, n_labels), n_labels, gt_prob=0.7,
                                               zero_unsure=False)
    d = ours.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10)
    q, tmp1, tmp2 = d.startInference()
    for _ in range(4):
        d.stepInference(q, tmp1, tmp2)
    # the same float32 ops on differently allocated arrays: vectorised kernels may round the unaligned
    # ends differently, and mean field carries such differences like any other (module docstring)
    np.testing.assert_allclose(d.inference(4), q, rtol=0, atol=mean_field_tolerance(logit_scale(d, 4), 4))


@pytest.mark.parametrize("normalization", ["NO_NORMALIZATION", "NORMALIZE_BEFORE", "NORMALIZE_AFTER",
                                           "NORMALIZE_SYMMETRIC"])
def test_fused_potts_terms_equal_the_plain_step(normalization, monkeypatch):
    """On the lattice the kernel normalisation is folded into a scaled lattice's weights and a Potts
    term's scaling and subtraction into its slice (one product); through the core op (any other
    backend) a Potts term's scaling is folded into its subtraction (one pass); a matrix term beside
    it subtracts its applied term. Each equals stepInference's plain path through the core op (filter,
    then each factor, then subtract) to float32 rounding, for every normalisation; with no pairwise
    term each step is softmax(-U)."""
    img = np.ascontiguousarray(IMAGES["astronaut"]()[::4, ::4])
    h, w = img.shape[:2]
    n = 5
    rng = np.random.default_rng(7)
    unary = pydensecrf_utils.unary_from_labels(noisy_labels(img, n), n, gt_prob=0.7, zero_unsure=False)
    norm = getattr(ours, normalization)
    d = ours.DenseCRF2D(w, h, n)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=3, compat=3, normalization=norm)
    d.addPairwiseBilateral(sxy=60, srgb=13, rgbim=img, compat=rng.random((n, n)).astype(np.float32) * 5,
                           normalization=norm)
    d.addPairwiseGaussian(sxy=9, compat=2.5, normalization=norm)
    fused = d.inference(3)  # on the scaled lattices
    assert all(p._lattice() is not None for p in d._pairwise)
    with monkeypatch.context() as m:
        m.setattr(ours._Pairwise, "_lattice", lambda self: None)  # the core op's path
        q, tmp1, tmp2 = d.startInference()
        for _ in range(3):
            d.stepInference(q, tmp1, tmp2)
        core = d.inference(3)
    tol = mean_field_tolerance(logit_scale(d, 3), 3)
    np.testing.assert_allclose(fused, q, rtol=0, atol=tol)
    np.testing.assert_allclose(core, q, rtol=0, atol=tol)
    bare = ours.DenseCRF2D(w, h, n)
    bare.setUnaryEnergy(unary)
    e = -unary.astype(np.float64)
    softmax = np.exp(e - e.max(0)) / np.exp(e - e.max(0)).sum(0)
    np.testing.assert_allclose(bare.inference(2), softmax, rtol=0, atol=8 * U32)


def test_a_reused_feature_buffer_does_not_change_earlier_crfs():
    """One feature buffer refilled for each of six CRFs (more than the lattice cache holds): every CRF
    keeps the features it was given, as pydensecrf (which copies them) does. Each equals a CRF built
    from a private copy of its features (bit for bit: the same computation)."""
    img = np.ascontiguousarray(IMAGES["chelsea"]()[::4, ::4])
    h, w = img.shape[:2]
    unary = pydensecrf_utils.unary_from_labels(noisy_labels(img, 3), 3, gt_prob=0.7, zero_unsure=False)
    frames = [np.ascontiguousarray(np.roll(img, 11 * i, axis=1)) for i in range(6)]
    feats = [pydensecrf_utils.create_pairwise_bilateral(sdims=(20, 20), schan=(13, 13, 13), img=f, chdim=2)
             for f in frames]
    buf = np.empty_like(feats[0])
    shared = []
    for f in feats:
        buf[...] = f
        d = ours.DenseCRF(h * w, 3)
        d.setUnaryEnergy(unary)
        d.addPairwiseEnergy(buf, compat=5.0)
        shared.append(d)
    for d, f in zip(shared, feats, strict=True):
        own = ours.DenseCRF(h * w, 3)
        own.setUnaryEnergy(unary)
        own.addPairwiseEnergy(f.copy(), compat=5.0)
        np.testing.assert_array_equal(d.inference(3), own.inference(3))


def test_scaled_lattices_follow_the_backend_and_inference_mode():
    """Each term keeps its scaled lattice for the backend it was made on: switching ``backend`` after
    an inference runs the new backend (the exact sums of ``chunked`` == a CRF switched before its first
    inference, bit for bit), switching back the lattice again; made under ``torch.inference_mode`` they
    serve later calls outside it (and the other way round), with the same Q."""
    rng = np.random.default_rng(0)
    img = (rng.random((20, 30, 3)) * 255).astype(np.uint8)
    unary = rng.random((4, 600)).astype(np.float32)

    def build(backend="permutohedral"):
        d = ours.DenseCRF2D(30, 20, 4)
        d.backend = backend
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=10, srgb=13, rgbim=img, compat=10)
        return d

    d = build()
    with torch.inference_mode():
        lattice_q = d.inference(3)
    np.testing.assert_array_equal(d.inference(3), lattice_q)
    d.backend = "chunked"
    exact_q = d.inference(3)
    fresh = build()  # (the kernel normalisation is the backend's the term was added on)
    fresh.backend = "chunked"
    np.testing.assert_array_equal(exact_q, fresh.inference(3))
    assert np.abs(exact_q - lattice_q).max() > 1e-3  # (a different filter: the switch took effect)
    d.backend = "permutohedral"
    np.testing.assert_array_equal(d.inference(3), lattice_q)
    d2 = build()
    q2 = d2.inference(3)
    with torch.inference_mode():
        np.testing.assert_array_equal(d2.inference(3), q2)
    np.testing.assert_array_equal(q2, lattice_q)


def test_bilateral_terms_keep_a_lattice_of_their_own():
    """addPairwiseBilateral's lattice is the term's own (no cache entry, no copy of the image's
    features kept; its weights scaled in place by the kernel normalisation), addPairwiseGaussian's the
    core op's cached one; the CRF's Q equals one whose terms both come through addPairwiseEnergy
    (cached lattices, scaled copies) on the features written out in pydensecrf's float arithmetic,
    bit for bit, and a second inference gives it again."""
    from nlgraph.backends import permutohedral
    from nlgraph.backends.permutohedral import cache as cache_module

    img = np.ascontiguousarray(IMAGES["astronaut"]()[::8, ::8])
    h, w = img.shape[:2]
    unary = pydensecrf_utils.unary_from_labels(noisy_labels(img, 4), 4, gt_prob=0.7, zero_unsure=False)
    permutohedral.clear_cache()
    d = ours.DenseCRF2D(w, h, 4)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=3, compat=3)
    assert len(cache_module._cache) == 1
    d.addPairwiseBilateral(sxy=20, srgb=13, rgbim=img, compat=10)
    assert len(cache_module._cache) == 1
    q = d.inference(3)
    np.testing.assert_array_equal(d.inference(3), q)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    x, y = xx.reshape(-1), yy.reshape(-1)
    col = img.reshape(-1, 3).astype(np.float32)
    f13 = np.float32(13)
    bilateral = np.stack([x / np.float32(20), y / np.float32(20), col[:, 0] / f13, col[:, 1] / f13,
                          col[:, 2] / f13])
    assert torch.equal(d._pairwise[1].features, torch.from_numpy(bilateral).T)
    e = ours.DenseCRF(h * w, 4)
    e.setUnaryEnergy(unary)
    e.addPairwiseEnergy(np.stack([x / np.float32(3), y / np.float32(3)]), compat=3)
    e.addPairwiseEnergy(bilateral, compat=10)
    np.testing.assert_array_equal(e.inference(3), q)


def test_the_kernel_normalisation_is_filtered_at_the_first_inference(monkeypatch):
    """On the lattice, addPairwise* builds each term's lattice and filters nothing (the terms' builds
    run back to back); the normalisation's K 1 is filtered at the first inference, once per term, and
    Q is the one of a CRF whose normalisations were forced right after each term was added."""
    from nlgraph.backends import permutohedral
    from nlgraph.backends.permutohedral import Lattice

    permutohedral.clear_cache()
    rng = np.random.default_rng(3)
    img = (rng.random((24, 20, 3)) * 255).astype(np.uint8)
    unary = rng.random((3, 480)).astype(np.float32)
    calls = []
    filt = Lattice.filter

    def counted(self, *args, **kwargs):
        calls.append(self)
        return filt(self, *args, **kwargs)

    monkeypatch.setattr(Lattice, "filter", counted)

    def build(force: bool):
        d = ours.DenseCRF2D(20, 24, 3)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=3, compat=3)
        if force:
            assert d._pairwise[-1].norm.shape == (480,)
        d.addPairwiseBilateral(sxy=10, srgb=13, rgbim=img, compat=10)
        if force:
            assert d._pairwise[-1].norm.shape == (480,)
        return d

    lazy = build(False)
    assert calls == []  # nothing filtered while adding terms
    q = lazy.inference(2)
    assert len(calls) == 2 + 2 * 2  # K 1 of each term once, then a filter per term and step
    assert all(p._norm is not None for p in lazy._pairwise)
    calls.clear()
    permutohedral.clear_cache()  # (else the positions term's norm comes from its cached lattice)
    eager = build(True)
    assert len(calls) == 2
    np.testing.assert_array_equal(eager.inference(2), q)


def test_a_dropped_crf_and_its_lattices_go_without_the_cyclic_collector():
    """No reference cycle between a CRF and its terms: dropping the last reference frees the CRF, its
    terms and their lattices at once (with the cyclic collector off), so a stream of images reuses
    the memory of the last one's lattices."""
    import gc
    import weakref

    rng = np.random.default_rng(4)
    img = (rng.random((24, 20, 3)) * 255).astype(np.uint8)
    was = gc.isenabled()
    gc.disable()
    try:
        d = ours.DenseCRF2D(20, 24, 3)
        d.setUnaryEnergy(rng.random((3, 480)).astype(np.float32))
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=10, srgb=13, rgbim=img, compat=10)
        d.inference(2)
        refs = [weakref.ref(d)] + [weakref.ref(p) for p in d._pairwise]
        values = weakref.ref(d._pairwise[1]._lattice().splat.values())
        del d
        assert all(r() is None for r in refs) and values() is None
    finally:
        if was:
            gc.enable()


def test_the_unary_finiteness_check_on_numpy():
    """crf.densecrf._finite: NaN and +-inf anywhere are found; finite entries whose float32 sum
    overflows are still finite (the elementwise test decides); no warning escapes."""
    import warnings

    from crf.densecrf import _finite

    a = np.ones((3, 50_000), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _finite(a) and _finite(a.astype(np.float64))
        for bad in (np.nan, np.inf, -np.inf):
            b = a.copy()
            b[2, 49_999] = bad
            assert not _finite(b)
        both = a.copy()
        both[0, 0], both[1, 1] = np.inf, -np.inf  # the sum is NaN
        assert not _finite(both)
        huge = np.full((2, 1000), 3e38, np.float32)  # the sum overflows to inf; every entry is finite
        assert _finite(huge)


def test_same_size_crfs_share_the_positions_terms_normalised_lattice():
    """The positions (smoothness) term's lattice comes from the core op's cache for every same-size
    image; its kernel normalisation and scaled lattice are kept with it (``Lattice.derived``) and
    serve the next CRF with the same normalisation: the same tensors, no K 1 filter, and the same Q as
    a CRF built on an empty cache, bit for bit. The bilateral term (its own lattice) and another
    normalisation share nothing; a term made under inference mode leaves tensors usable outside it."""
    from nlgraph.backends import permutohedral

    rng = np.random.default_rng(6)
    unary = rng.random((3, 480)).astype(np.float32)
    imgs = [(rng.random((24, 20, 3)) * 255).astype(np.uint8) for _ in range(2)]

    def build(img, normalization=ours.NORMALIZE_SYMMETRIC):
        d = ours.DenseCRF2D(20, 24, 3)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=3, compat=3, normalization=normalization)
        d.addPairwiseBilateral(sxy=10, srgb=13, rgbim=img, compat=10)
        return d

    permutohedral.clear_cache()
    with torch.inference_mode():
        first = build(imgs[0])
        q_first = first.inference(2)
    second = build(imgs[1])
    q_second = second.inference(2)
    g1, g2 = first._pairwise[0], second._pairwise[0]
    assert g1.norm is g2.norm and g1._lattice() is g2._lattice()
    assert first._pairwise[1]._lattice() is not second._pairwise[1]._lattice()
    assert not g2.norm.is_inference()
    other = build(imgs[1], ours.NORMALIZE_BEFORE)
    other.inference(1)
    assert other._pairwise[0]._lattice() is not g2._lattice()
    permutohedral.clear_cache()
    np.testing.assert_array_equal(build(imgs[1]).inference(2), q_second)
    permutohedral.clear_cache()
    np.testing.assert_array_equal(build(imgs[0]).inference(2), q_first)
