"""crf.densecrf / crf.utils run code written for pydensecrf unchanged, and agree with pydensecrf.

Three kinds of checks, each run on pydensecrf (the pydensecrf2 build) and on ours:

* our versions of what pydensecrf's own test suite and examples check: the 2-D and generic CRFs
  on the suite's 10x10 toy problem, a float64 compatibility, the "Non RGB" example (one-channel
  bilateral features), the unary utilities (also the deprecated ``compute_unary`` /
  ``softmax_to_unary``), ``ConstUnary`` / ``LogisticUnary`` / ``setUnary`` /
  ``setUnaryEnergy(u, f)``, integral floats for sizes and ``niter``;
* energies of +inf (-log of an exact 0: the label is impossible), which pydensecrf's mean field
  handles, and the inputs it turns into NaN, which raise here;
* post-processing helpers in the style real projects ship (a U-Net's ``-log`` of a saturated
  sigmoid with exact 0/1, float64 softmax probabilities, BGR views of an image, Fortran-order arrays).
  pydensecrf needs float32 C-contiguous arrays (its helpers call ``np.ascontiguousarray``); ours takes
  the raw arrays too, and the results are compared.

Tolerance, from the arithmetic: both sides run the same float32 algorithm (the same lattice), so
they differ by rounding only. Each mean-field step rounds a logit of magnitude at most
S = max|finite U| + sum |w| (w: kernel weights; normalised kernels give |K Q| <= ~1) a bounded
number of times: 2 (d + 1)^2 covers the lattice's splat, d + 1 blur passes and slice over d + 1
vertices plus the normalisation (d: feature dims <= 5). Softmax is 1-Lipschitz in the max norm, and
the errors of ``niter`` steps add: |Q_ours - Q_theirs| <= niter * 2 (d + 1)^2 * 2^-24 * S. A label
may differ only where pydensecrf's own top-two margin is below twice that.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import crf.densecrf as ours
import crf.utils as ours_utils

pydensecrf = pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (test dependency) not installed")
pd_utils = pytest.importorskip("pydensecrf.utils")
skdata = pytest.importorskip("skimage.data", reason="scikit-image (test dependency) not installed")

U32 = 2.0 ** -24


def q_tol(unary, weights, niter, d=5) -> float:
    """The bound of the module docstring for unary energies ``unary`` and kernel weights ``weights``."""
    u = np.asarray(unary, dtype=np.float64)
    s = np.abs(u[np.isfinite(u)]).max() + sum(abs(w) for w in weights)
    return max(niter, 1) * 2 * (d + 1) ** 2 * U32 * s


def compare(q_theirs, q_ours, tol):
    q_theirs, q_ours = np.array(q_theirs), np.array(q_ours)
    assert q_ours.dtype == np.float32 and q_ours.shape == q_theirs.shape
    assert np.isfinite(q_ours).all()
    diff = np.abs(q_theirs.astype(np.float64) - q_ours).max()
    assert diff <= tol, (diff, tol)
    top2 = np.sort(q_theirs, axis=0)[-2:]
    margin = top2[1] - top2[0]
    differ = q_theirs.argmax(0) != q_ours.argmax(0)
    assert (margin[differ] <= 2 * tol).all(), (differ.sum(), margin[differ].max())


def run_both(script, *args):
    return [np.array(script(mod, *args)) for mod in (pydensecrf, ours)]


# ---------------------------------------------------------------- pydensecrf's test suite, our versions


def simple_unary():
    """pydensecrf/tests/test_dcrf.py's toy problem: a frame and a centre square, probabilities (2, 100)."""
    u1 = np.zeros((10, 10), dtype=np.float32)
    u1[:, [0, -1]] = u1[[0, -1], :] = 1
    u2 = np.zeros((10, 10), dtype=np.float32)
    u2[4:7, 4:7] = 1
    u = np.vstack([u1.flat, u2.flat])
    return (u + 1) / (np.sum(u, axis=0) + 2)


def simple_img():
    img = np.zeros((10, 10, 3), dtype=np.uint8)
    img[2:8, 2:8, :] = 255
    return img


@pytest.mark.parametrize("kind", ["2d", "generic"])
def test_the_suites_calls(kind):
    unary, img = -np.log(simple_unary()), simple_img()

    def script(dcrf):
        if kind == "2d":
            d = dcrf.DenseCRF2D(10, 10, 2)
            d.setUnaryEnergy(unary)
            d.addPairwiseBilateral(sxy=20, srgb=20, rgbim=img, compat=10)
        else:
            d = dcrf.DenseCRF(100, 2)
            d.setUnaryEnergy(unary)
            feats = (pd_utils if dcrf is pydensecrf else ours_utils).create_pairwise_bilateral(
                sdims=(20, 20), schan=(20, 20, 20), img=img, chdim=2)
            d.addPairwiseEnergy(feats, compat=10)
        return d.inference(10)

    theirs, mine = run_both(script)
    assert np.argmax(mine, axis=0).reshape(10, 10).shape == (10, 10)
    compare(theirs, mine, q_tol(unary, [10], 10))


def test_2d_and_generic_paths_agree():
    unary, img = -np.log(simple_unary()), simple_img()
    d = ours.DenseCRF(100, 2)
    d2 = ours.DenseCRF2D(10, 10, 2)
    d.setUnaryEnergy(unary)
    d2.setUnaryEnergy(unary)
    feats = ours_utils.create_pairwise_bilateral(sdims=(20, 20), schan=(20, 20, 20), img=img, chdim=2)
    d.addPairwiseEnergy(feats, compat=10)
    d2.addPairwiseBilateral(sxy=20, srgb=20, rgbim=img, compat=10)
    q1, q2 = np.array(d.inference(10)), np.array(d2.inference(10))
    np.testing.assert_array_equal(q1.argmax(0), q2.argmax(0))
    np.testing.assert_allclose(q1, q2, rtol=0, atol=q_tol(unary, [10], 10))


def test_a_float64_compatibility():
    """pydensecrf's suite expects a float64 compat to raise there (a buffer dtype mismatch); here it is
    the same compatibility as its float32 copy."""
    unary = np.ones((2, 100), dtype=np.float32)
    rng = np.random.default_rng(0)
    unary[0] += rng.random(100).astype(np.float32)
    img = simple_img()
    compat = np.array([1.0, 2.0])
    d = pydensecrf.DenseCRF2D(10, 10, 2)
    d.setUnaryEnergy(unary)
    with pytest.raises(ValueError):
        d.addPairwiseBilateral(sxy=(3, 3), srgb=(3, 3, 3), rgbim=img, compat=compat)

    def script(dcrf, c):
        d = dcrf.DenseCRF2D(10, 10, 2)
        d.setUnaryEnergy(unary)
        d.addPairwiseBilateral(sxy=(3, 3), srgb=(3, 3, 3), rgbim=img, compat=c)
        return d.inference(2)

    theirs = np.array(script(pydensecrf, compat.astype(np.float32)))
    compare(theirs, np.array(script(ours, compat)), q_tol(unary, [2.0], 2))
    with pytest.raises(ValueError, match=r"compat vector must have one entry per label \(2,\), got \(3,\)"):
        ours.DenseCRF2D(10, 10, 2).addPairwiseGaussian(3, compat=np.ones(3))


def test_the_non_rgb_example():
    """pydensecrf's examples/Non RGB Example.ipynb, smaller: a one-channel 'image' as bilateral feature."""
    h, w = 40, 51
    pos = np.stack(np.mgrid[0:h, 0:w], axis=2).astype(np.float64)
    blob = np.exp(-(((pos - [h // 2, w // 2]) ** 2) / [(h // 4) ** 2, (w // 4) ** 2]).sum(-1))
    probs = (blob - blob.min()) / (blob.max() - blob.min())
    probs = 0.5 + 0.2 * (probs - 0.5)
    probs = np.tile(probs[np.newaxis, :, :], (2, 1, 1))
    probs[1, :, :] = 1 - probs[0, :, :]
    img = np.zeros((h, w, 1), np.uint8)
    img[h // 3:2 * h // 3, w // 4:3 * w // 4, :] = 1

    def script(dcrf):
        utils = pd_utils if dcrf is pydensecrf else ours_utils
        u = utils.unary_from_softmax(probs)
        d = dcrf.DenseCRF2D(w, h, 2)
        d.setUnaryEnergy(u)
        feats = utils.create_pairwise_gaussian(sdims=(10, 10), shape=img.shape[:2])
        d.addPairwiseEnergy(feats, compat=3, kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
        feats = utils.create_pairwise_bilateral(sdims=(10, 10), schan=(0.01,), img=img, chdim=2)
        d.addPairwiseEnergy(feats, compat=10, kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
        return d.inference(5)

    theirs, mine = run_both(script)
    compare(theirs, mine, q_tol(pd_utils.unary_from_softmax(probs), [3, 10], 5, d=3))
    # the example's point: the square in the one-channel image shapes the result
    assert (mine.argmax(0).reshape(h, w) != np.array(probs).argmax(0)).any()


def test_unary_utilities_and_their_deprecated_names():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, size=(6, 7))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(ours_utils.compute_unary(labels, 4, 0.7),
                                      pd_utils.compute_unary(labels, 4, 0.7))
        np.testing.assert_array_equal(ours_utils.compute_unary(labels, 4), pd_utils.compute_unary(labels, 4))
    assert any("compute_unary is deprecated" in str(w.message) for w in caught)
    sm = rng.dirichlet(np.ones(3), size=(6, 7)).transpose(2, 0, 1)
    sm[0, 0, :3] = 0.0  # exact zeros: +inf energies without clipping
    sm[1, 0, :3] = 1.0 - sm[2, 0, :3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for gt in (1, 0.8):
            with np.errstate(divide="ignore"):
                np.testing.assert_array_equal(ours_utils.softmax_to_unary(sm, gt),
                                              pd_utils.softmax_to_unary(sm, gt))
        assert np.isposinf(ours_utils.softmax_to_unary(sm)[0, :3]).all()
    # probabilities a hair outside [0, 1] (float32 softmax, bilinear upsampling) are clipped, as there
    hair = sm.astype(np.float32)
    hair[0, 1, 0], hair[1, 1, 1], hair[2, 2, 2] = -1e-7, 1.0 + 1e-6, -3e-3
    for scale, clip in ((None, 1e-5), (0.7, 1e-5), (None, 1e-3), (0.9, 0.2)):
        np.testing.assert_array_equal(ours_utils.unary_from_softmax(hair, scale=scale, clip=clip),
                                      pd_utils.unary_from_softmax(hair, scale=scale, clip=clip))
    with np.errstate(divide="ignore"):
        np.testing.assert_array_equal(ours_utils.unary_from_softmax(sm, clip=None),
                                      pd_utils.unary_from_softmax(sm, clip=None))
    nan = sm.copy()
    nan[1, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"sm contains NaN"):
        ours_utils.unary_from_softmax(nan)
    with pytest.raises(ValueError, match=r"with clip=None, sm must hold finite probabilities >= 0"):
        ours_utils.unary_from_softmax(hair, clip=None)
    with pytest.raises(ValueError, match=r"schan must be positive finite numbers, got \(0,\)"):
        ours_utils.create_pairwise_bilateral(sdims=(3, 3), schan=0, img=labels)
    with pytest.raises(ValueError, match=r"sdims must be positive finite numbers, got \(3, 0\)"):
        ours_utils.create_pairwise_bilateral(sdims=(3, 0), schan=(1,), img=labels[..., None], chdim=2)
    with pytest.raises(ValueError, match=r"schan must be positive finite numbers"):
        ours_utils.create_pairwise_bilateral(sdims=(3, 3), schan=(1, float("nan"), 1),
                                             img=np.zeros((4, 4, 3)), chdim=2)


def test_const_and_logistic_unaries():
    rng = np.random.default_rng(2)
    n, nl = 30, 3
    u = rng.random((nl, n)).astype(np.float32) * 3
    f = rng.random((n, n)).astype(np.float32) / n
    # grid features, as images give (sparse random points in 5-D are where the lattices part: see the README)
    feats = pd_utils.create_pairwise_gaussian(sdims=(2, 2), shape=(5, 6))
    for setter in ("setUnaryEnergy(u)", "setUnary(ConstUnary(u))", "setUnaryEnergy(u, f)",
                   "setUnary(LogisticUnary(u, f))"):

        def script(dcrf):
            d = dcrf.DenseCRF(n, nl)
            eval("d." + setter, {"d": d, "u": u, "f": f, "ConstUnary": dcrf.ConstUnary,
                                 "LogisticUnary": dcrf.LogisticUnary})
            d.addPairwiseEnergy(feats, compat=2.0)
            return d.inference(3)

        theirs, mine = run_both(script)
        energy = u @ f if "f" in setter else u
        compare(theirs, mine, q_tol(energy, [2.0], 3, d=2))
    # the logistic form: L (n_labels, D) @ f (D, n_vars) for any D (pydensecrf's wrapper needs D = n_vars)
    d = ours.DenseCRF(n, nl)
    d.setUnaryEnergy(u[:, :4], f[:4])
    q = np.array(d.inference(0))
    e = np.exp(-(u[:, :4].astype(np.float64) @ f[:4]))
    np.testing.assert_allclose(q, e / e.sum(0), rtol=0, atol=8 * U32)
    one = ours.ConstUnary(u)
    for _ in range(2):  # an instance serves several CRFs (pydensecrf's is moved into the first)
        d = ours.DenseCRF(n, nl)
        d.setUnary(one)
        np.testing.assert_allclose(np.array(d.inference(0)), np.exp(-u) / np.exp(-u).sum(0), rtol=0,
                                   atol=8 * U32)
    with pytest.raises(ValueError, match=r"Bad shape for unary energy \(need \(3, 30\), got \(3, 29\)\)"):
        ours.DenseCRF(n, nl).setUnary(ours.ConstUnary(u[:, :29]))
    with pytest.raises(TypeError, match=r"setUnary expects a ConstUnary or LogisticUnary, got ndarray"):
        ours.DenseCRF(n, nl).setUnary(u)
    with pytest.raises(ValueError, match=r"LogisticUnary: L \(3, 30\) and f \(29, 30\) do not multiply"):
        ours.DenseCRF(n, nl).setUnaryEnergy(u, f[:29])
    with pytest.raises(TypeError, match=r"Unary is abstract"):
        ours.Unary()


def test_integral_floats_for_sizes_and_niter():
    rng = np.random.default_rng(3)
    u = rng.random((2, 16)).astype(np.float32) * 2

    def script(dcrf, w, h, nl, niter):
        d = dcrf.DenseCRF2D(w, h, nl)
        d.setUnaryEnergy(u)
        d.addPairwiseGaussian(sxy=2.0, compat=3.0)
        return d.inference(niter)

    tol = q_tol(u, [3.0], 2, d=2)
    for args in ((4.0, 4, 2, 2.0), (np.float32(4), np.int64(4), 2.0, np.float64(2)), (4, 4, 2, np.int32(2))):
        compare(*run_both(script, *args), tol)
    compare(pydensecrf.DenseCRF(16.0, 2.0).inference(1), ours.DenseCRF(16.0, 2.0).inference(1), tol)
    # pydensecrf truncates what is not integral (4.5 -> 4, 2.5 -> 2): a clear error here
    compare(np.array(script(pydensecrf, 4.5, 4, 2, 2.5)), np.array(script(ours, 4, 4, 2, 2)), tol)
    with pytest.raises(ValueError, match=r"w must be an int >= 1, got 4.5 \(pydensecrf would silently "
                                         r"truncate it\)"):
        ours.DenseCRF2D(4.5, 4, 2)
    with pytest.raises(ValueError, match=r"niter must be an int >= 0, got 2.5"):
        script(ours, 4, 4, 2, 2.5)
    with pytest.raises(TypeError, match=r"nlabels must be an int >= 1, got bool True"):
        ours.DenseCRF(16, True)
    with pytest.raises(TypeError, match=r"niter must be an int >= 0, got str '2'"):
        script(ours, 4, 4, 2, "2")


# ---------------------------------------------------------------- infinite energies


def _inf_problem(seed=4):
    img = np.ascontiguousarray(skdata.astronaut()[::12, ::12])
    h, w = img.shape[:2]
    rng = np.random.default_rng(seed)
    u = (rng.random((3, h * w)) * 4).astype(np.float32)
    u[0, rng.random(h * w) < 0.3] = np.inf  # label 0 impossible at 30% of the pixels
    u[1, :50] = np.inf
    return img, u


def test_infinite_unary_energies_mean_impossible_labels():
    img, u = _inf_problem()
    h, w = img.shape[:2]

    def script(dcrf):
        d = dcrf.DenseCRF2D(w, h, 3)
        d.setUnaryEnergy(u)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=30, srgb=13, rgbim=img, compat=10)
        return d.inference(5)

    theirs, mine = run_both(script)
    compare(theirs, mine, q_tol(u, [3, 10], 5))
    assert (mine[np.isinf(u)] == 0).all() and (theirs[np.isinf(u)] == 0).all()


def test_infinite_energies_in_step_inference_and_kl():
    img, u = _inf_problem(5)
    h, w = img.shape[:2]
    crfs = {}
    for dcrf in (pydensecrf, ours):
        d = dcrf.DenseCRF2D(w, h, 3)
        d.setUnaryEnergy(u)
        d.addPairwiseBilateral(sxy=30, srgb=13, rgbim=img, compat=10)
        crfs[dcrf] = d
    d = crfs[ours]
    q, tmp1, tmp2 = d.startInference()
    for _ in range(3):
        d.stepInference(q, tmp1, tmp2)
    assert np.isneginf(tmp1[np.isinf(u)]).all() and (q[np.isinf(u)] == 0).all()
    q_theirs = crfs[pydensecrf].inference(3)
    compare(q_theirs, q, q_tol(u, [10], 3))
    # pydensecrf's KL multiplies inf by Q = 0 (NaN); the limit of that term is 0: the same KL as with the
    # impossible energies replaced by any finite number, which pydensecrf computes on its own Q
    assert np.isnan(crfs[pydensecrf].klDivergence(q_theirs))
    finite = pydensecrf.DenseCRF2D(w, h, 3)
    finite.setUnaryEnergy(np.where(np.isinf(u), np.float32(0), u))
    finite.addPairwiseBilateral(sxy=30, srgb=13, rgbim=img, compat=10)
    kl_ref = finite.klDivergence(q_theirs)
    kl = d.klDivergence(np.ascontiguousarray(np.array(q_theirs)))
    np.testing.assert_allclose(kl, kl_ref, rtol=1e-4)


def test_energies_pydensecrf_turns_into_nan_raise_here():
    img, u = _inf_problem(6)
    h, w = img.shape[:2]
    bad = {"nan": (0, 7, np.nan), "-inf": (2, 9, -np.inf)}
    for name, (lab, var, val) in bad.items():
        v = u.copy()
        v[lab, var] = val
        d = pydensecrf.DenseCRF2D(w, h, 3)
        d.setUnaryEnergy(v)
        d.addPairwiseGaussian(sxy=3, compat=3)
        assert np.isnan(np.array(d.inference(2))).any(), name  # pydensecrf: NaN marginals
        with pytest.raises(ValueError, match=rf"unary energy contains NaN or -inf \(first at label {lab}, "
                                             rf"variable {var}\)"):
            ours.DenseCRF2D(w, h, 3).setUnaryEnergy(v)
    v = u.copy()
    v[:, [11, 40]] = np.inf
    d = pydensecrf.DenseCRF2D(w, h, 3)
    d.setUnaryEnergy(v)
    d.addPairwiseGaussian(sxy=3, compat=3)
    nan_pixels = np.isnan(np.array(d.inference(2))).any(0)
    assert nan_pixels[[11, 40]].all() and nan_pixels.sum() > 2  # the lattice spreads NaN to neighbours
    with pytest.raises(ValueError, match=r"unary energy is \+inf for every label at 2 variable\(s\) \(first: "
                                         r"\[11, 40\]\): such a variable has no possible label"):
        ours.DenseCRF2D(w, h, 3).setUnaryEnergy(v)
    with pytest.raises(ValueError, match=r"unary energy contains NaN or -inf"):
        ours.ConstUnary(np.full((3, 4), np.nan))


# ---------------------------------------------------------------- post-processing helpers as projects ship


def unet_dense_crf(dcrf, img, output_probs):
    """A U-Net repository's helper (binary segmentation): -log of the sigmoid output and its complement."""
    h, w = output_probs.shape
    output_probs = np.expand_dims(output_probs, 0)
    output_probs = np.append(1 - output_probs, output_probs, axis=0)
    d = dcrf.DenseCRF2D(w, h, 2)
    with np.errstate(divide="ignore"):
        U = -np.log(output_probs)
    U = U.reshape((2, -1))
    U = np.ascontiguousarray(U)
    img = np.ascontiguousarray(img)
    d.setUnaryEnergy(U)
    d.addPairwiseGaussian(sxy=20, compat=3)
    d.addPairwiseBilateral(sxy=30, srgb=20, rgbim=img, compat=10)
    Q = d.inference(5)
    return np.array(Q)


def deeplab_crf(dcrf, utils, image, probs, contiguous):
    """A DeepLab-style helper: float64 softmax probabilities, an OpenCV (BGR) image, 10 iterations."""
    c, h, w = probs.shape
    U = utils.unary_from_softmax(probs)  # float32 (c, h*w)
    if contiguous:  # what the helper must do for pydensecrf; ours takes the views as they are
        U, image = np.ascontiguousarray(U), np.ascontiguousarray(image)
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(U)
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=50, srgb=5, rgbim=image, compat=4)
    return np.array(d.inference(10)).reshape((c, h, w))


def fortran_unary_crf(dcrf, image, unary):
    """A helper that builds its unary with column-major numpy code (e.g. read from MATLAB)."""
    c = unary.shape[0]
    h, w = image.shape[:2]
    d = dcrf.DenseCRF(h * w, c)
    d.setUnaryEnergy(unary)
    d.addPairwiseEnergy(np.asarray(pd_utils.create_pairwise_gaussian(sdims=(3, 3), shape=(h, w))), compat=3)
    return np.array(d.inference(5))


def test_unet_helper_with_a_saturated_sigmoid():
    img = np.ascontiguousarray(skdata.coffee()[::10, ::10])
    h, w = img.shape[:2]
    logits = (img.astype(np.float32).mean(-1) - 120) * 1.5  # |logits| up to ~200: sigmoid is exactly 0 or 1
    probs = (1 / (1 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    assert (probs == 0).any() and (probs == 1).any()
    theirs, mine = unet_dense_crf(pydensecrf, img, probs), unet_dense_crf(ours, img, probs)
    with np.errstate(divide="ignore"):
        u = -np.log(np.stack([1 - probs, probs]).reshape(2, -1))
    compare(theirs, mine, q_tol(u, [3, 10], 5))
    # float64 probabilities (the same helper fed numpy's default dtype): pydensecrf refuses the float64
    # unary; ours computes what pydensecrf computes on the float32 energies
    p64 = 1 / (1 + np.exp(-logits.astype(np.float64)))
    with pytest.raises(ValueError, match="Buffer dtype mismatch"):
        unet_dense_crf(pydensecrf, img, p64)
    with np.errstate(divide="ignore"):
        u64 = -np.log(np.stack([1 - p64, p64]).reshape(2, -1))
    d = pydensecrf.DenseCRF2D(w, h, 2)
    d.setUnaryEnergy(u64.astype(np.float32))
    d.addPairwiseGaussian(sxy=20, compat=3)
    d.addPairwiseBilateral(sxy=30, srgb=20, rgbim=img, compat=10)
    compare(d.inference(5), unet_dense_crf(ours, img, p64), q_tol(u64, [3, 10], 5))


def test_deeplab_helper_with_float64_probabilities_and_a_bgr_view():
    rgb = skdata.astronaut()[::8, ::8]
    bgr = rgb[:, :, ::-1]  # cv2.imread order, as a negative-stride view
    h, w = rgb.shape[:2]
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(4, h, w)) + 3 * np.eye(4)[(rgb.mean(-1) // 64).astype(int)].transpose(2, 0, 1)
    probs = np.exp(logits) / np.exp(logits).sum(0)  # float64
    with pytest.raises(ValueError, match="not C-contiguous"):
        deeplab_crf(pydensecrf, pd_utils, bgr, probs, contiguous=False)
    theirs = deeplab_crf(pydensecrf, pd_utils, bgr, probs, contiguous=True)
    mine = deeplab_crf(ours, ours_utils, bgr, probs, contiguous=False)
    compare(theirs.reshape(4, -1), mine.reshape(4, -1), q_tol(pd_utils.unary_from_softmax(probs), [3, 4], 10))


def test_fortran_order_arrays():
    img = skdata.camera()[::16, ::16]
    h, w = img.shape
    rng = np.random.default_rng(8)
    unary = np.asfortranarray(rng.random((3, h * w)).astype(np.float32) * 3)
    with pytest.raises(ValueError, match="not C-contiguous"):
        fortran_unary_crf(pydensecrf, img, unary)
    theirs = fortran_unary_crf(pydensecrf, img, np.ascontiguousarray(unary))
    compare(theirs, fortran_unary_crf(ours, img, unary), q_tol(unary, [3], 5, d=2))


def test_crf_layer_compatibility_must_be_finite():
    """crf.DenseCRF (the differentiable layer): a NaN compatibility is refused, naming the argument."""
    import torch

    from crf import DenseCRF

    with pytest.raises(ValueError, match=r"compatibility must be finite, got a \(3, 3\) tensor with NaN"):
        DenseCRF(3, compatibility=torch.full((3, 3), float("nan")))
    with pytest.raises(TypeError, match=r"must be 'potts' or a float \(3, 3\) tensor, got float nan"):
        DenseCRF(3, compatibility=float("nan"))
