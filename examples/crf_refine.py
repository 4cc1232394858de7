"""A pydensecrf script, unchanged but for its import: refine a noisy segmentation of a photo.

    python examples/crf_refine.py [--pydensecrf] [--size 256]

The body below is what pydensecrf users write (``DenseCRF2D``, ``unary_from_labels``,
``addPairwiseGaussian``, ``addPairwiseBilateral``, ``inference``); it runs on ``crf.densecrf``,
nlgraph's drop-in, or with ``--pydensecrf`` on the original, and prints label accuracy before and
after the CRF against the (generated) ground truth.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def refine(dcrf, utils, image: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    # ---- a typical pydensecrf script from here on ----
    h, w = labels.shape
    d = dcrf.DenseCRF2D(w, h, n_labels)
    unary = utils.unary_from_labels(labels, n_labels, gt_prob=0.6, zero_unsure=False)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=(3, 3), compat=2, kernel=dcrf.DIAG_KERNEL,
                          normalization=dcrf.NORMALIZE_SYMMETRIC)
    d.addPairwiseBilateral(sxy=(10, 10), srgb=(15, 15, 15), rgbim=image, compat=4, kernel=dcrf.DIAG_KERNEL,
                           normalization=dcrf.NORMALIZE_SYMMETRIC)
    q = d.inference(5)
    return np.argmax(q, axis=0).reshape((h, w))


def scene(size: int, seed: int = 0):
    """A scikit-image photo, a 3-label ground truth from its intensity, and noisy labels (35% flipped)."""
    from skimage import data
    from skimage.filters import gaussian, threshold_multiotsu

    image = np.ascontiguousarray(data.coffee()[:size, :size])
    gray = gaussian(image.mean(-1), sigma=2)
    truth = np.digitize(gray, threshold_multiotsu(gray, classes=3))
    rng = np.random.default_rng(seed)
    noisy = np.where(rng.random(truth.shape) < 0.35, rng.integers(0, 3, truth.shape), truth)
    return image, truth, noisy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pydensecrf", action="store_true", help="run on the original pydensecrf instead")
    ap.add_argument("--size", type=int, default=256, help="crop side (default 256)")
    args = ap.parse_args(argv)
    if args.size < 16:
        ap.error("--size must be >= 16")
    if args.pydensecrf:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as utils
    else:
        import crf.densecrf as dcrf
        import crf.utils as utils
    image, truth, noisy = scene(args.size)
    t = time.perf_counter()
    refined = refine(dcrf, utils, image, noisy, 3)
    elapsed = time.perf_counter() - t
    print(f"{dcrf.__name__}: label accuracy {np.mean(noisy == truth):.3f} -> {np.mean(refined == truth):.3f} "
          f"({elapsed:.2f}s, {args.size}x{args.size}, 5 iterations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
