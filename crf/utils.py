"""Drop-in replacement for ``pydensecrf.utils``: unaries from labels / softmax, pairwise features.

Same names (the deprecated ``compute_unary`` and ``softmax_to_unary`` included), argument names,
defaults and return shapes/dtypes (float32) as pydensecrf's utils; invalid arguments raise
ValueError instead of asserting (asserts vanish under ``python -O``) or returning NaN energies.
"""

from __future__ import annotations

import math
import warnings
from numbers import Number
from typing import cast

import numpy as np

__all__ = ["unary_from_labels", "unary_from_softmax", "compute_unary", "softmax_to_unary",
           "create_pairwise_gaussian", "create_pairwise_bilateral"]


def _positive_finite(v: object) -> bool:
    """A bandwidth: a number (not a bool), finite and > 0."""
    if isinstance(v, bool) or not isinstance(v, Number):
        return False
    x = cast(float, v)  # numbers.Number declares no arithmetic; the real types registered with it do
    return math.isfinite(x) and x > 0


def _scales(name: str, values) -> tuple:
    """Bandwidths: positive finite numbers (a zero would make every feature infinite)."""
    vals = tuple(values)
    bad = [v for v in vals if not _positive_finite(v)]
    if bad:
        raise ValueError(f"{name} must be positive finite numbers, got {vals!r}")
    return vals


def unary_from_labels(labels, n_labels, gt_prob, zero_unsure=True):
    """Unary energies (n_labels, n_pixels) from a label map trusted with probability ``gt_prob``.

    Args:
        labels: integer label map of any shape (flattened in C order).
        n_labels: number of labels (without the "unsure" 0 when ``zero_unsure``).
        gt_prob: certainty of the labels, in (0, 1).
        zero_unsure: treat label 0 as "could be anything" (uniform unary), labels then run 1..n_labels.
    """
    if not 0 < gt_prob < 1:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob!r}")
    if isinstance(n_labels, bool) or not isinstance(n_labels, (int, np.integer)) or n_labels < 2:
        raise ValueError(f"n_labels must be an int >= 2, got {n_labels!r}")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer array, got dtype {labels.dtype}")
    labels = labels.flatten()
    lo, hi = (1, n_labels) if zero_unsure else (0, n_labels - 1)
    bad = (labels < (0 if zero_unsure else lo)) | (labels > hi)
    if bad.any():
        raise ValueError(f"labels must lie in [{0 if zero_unsure else lo}, {hi}] for n_labels={n_labels} and "
                         f"zero_unsure={zero_unsure}, found {labels[bad][:5].tolist()}")
    n_energy = -np.log((1.0 - gt_prob) / (n_labels - 1))
    p_energy = -np.log(gt_prob)
    u = np.full((n_labels, len(labels)), n_energy, dtype="float32")
    idx = np.arange(u.shape[1])
    if zero_unsure:
        sure = labels > 0
        u[labels[sure] - 1, idx[sure]] = p_energy
        u[:, ~sure] = -np.log(1.0 / n_labels)
    else:
        u[labels, idx] = p_energy
    return u


def compute_unary(labels, M, GT_PROB=0.5):
    """Deprecated (as in pydensecrf): ``unary_from_labels(labels, M, GT_PROB)``."""
    warnings.warn("compute_unary is deprecated, use unary_from_labels instead", DeprecationWarning,
                  stacklevel=2)
    return unary_from_labels(labels, M, GT_PROB)


def unary_from_softmax(sm, scale=None, clip=1e-5):
    """Unary energies -log(p), (n_classes, n_pixels) float32, from class probabilities (n_classes, ...).

    As pydensecrf: ``scale`` mixes the probabilities with the uniform distribution, then ``clip``
    clips them to [clip, 1] (so values a hair outside [0, 1] are fine). With ``clip=None`` a zero
    probability gives a +inf energy (the label is impossible; DenseCRF accepts it). NaN
    probabilities, and negative or infinite ones with ``clip=None``, raise ValueError (pydensecrf
    returns NaN / -inf energies).
    """
    sm = np.asarray(sm)
    if sm.ndim < 1 or sm.dtype.kind not in "fiu" or sm.dtype == np.bool_:
        raise ValueError(f"sm must be a real array with classes on axis 0, got shape {sm.shape}, "
                         f"dtype {sm.dtype}")
    if np.isnan(sm).any():
        raise ValueError(f"sm contains NaN (shape {sm.shape})")
    if clip is None and ((sm < 0).any() or np.isinf(sm).any()):
        raise ValueError("with clip=None, sm must hold finite probabilities >= 0 (-log of a negative or "
                         "infinite probability is NaN / -inf)")
    num_cls = sm.shape[0]
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, Number) or not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {scale!r}")
        sm = scale * sm + (1 - scale) * (np.ones(sm.shape) / num_cls)
    if clip is not None:
        sm = np.clip(sm, clip, 1.0)
    with np.errstate(divide="ignore"):
        return -np.log(sm).reshape([num_cls, -1]).astype(np.float32)


def softmax_to_unary(sm, GT_PROB=1):
    """Deprecated (as in pydensecrf): ``unary_from_softmax(sm, scale, clip=None)``.

    ``scale`` is None for ``GT_PROB == 1``, else GT_PROB."""
    warnings.warn("softmax_to_unary is deprecated, use unary_from_softmax instead", DeprecationWarning,
                  stacklevel=2)
    return unary_from_softmax(sm, None if GT_PROB == 1 else GT_PROB, clip=None)


def create_pairwise_gaussian(sdims, shape):
    """Position features (len(sdims), prod(shape)), float32: the grid (C order) divided by ``sdims``."""
    shape = tuple(shape)
    sdims = _scales("sdims", sdims)
    if len(sdims) != len(shape):
        raise ValueError(f"sdims has {len(sdims)} entries but shape {shape} has {len(shape)} dims")
    mesh = np.array(np.meshgrid(*[range(s) for s in shape], indexing="ij"), dtype=np.float32)
    for i, s in enumerate(sdims):
        mesh[i] /= s
    return mesh.reshape([len(sdims), -1])


def create_pairwise_bilateral(sdims, schan, img, chdim=-1):
    """Position and channel features (len(sdims) + channels, n_pixels), float32.

    Args:
        sdims: per-spatial-dimension scales.
        schan: per-channel scales (or one number for all channels).
        img: the image; ``chdim`` is its channel axis (-1: no channel axis, single channel).
    """
    img = np.asarray(img)
    if chdim == -1:
        im_feat = img[np.newaxis].astype(np.float32)
    else:
        if not -img.ndim <= chdim < img.ndim:
            raise ValueError(f"chdim {chdim} is out of range for an image of shape {img.shape}")
        im_feat = np.rollaxis(img, chdim).astype(np.float32)
    sdims = _scales("sdims", sdims)
    if len(sdims) != im_feat.ndim - 1:
        raise ValueError(f"sdims has {len(sdims)} entries but the image has {im_feat.ndim - 1} spatial dims "
                         f"(shape {img.shape}, chdim={chdim})")
    if isinstance(schan, Number):
        (schan,) = _scales("schan", (schan,))
        im_feat /= schan
    else:
        schan = _scales("schan", schan)
        if len(schan) != im_feat.shape[0]:
            raise ValueError(f"schan has {len(schan)} entries but the image has {im_feat.shape[0]} channels")
        for i, s in enumerate(schan):
            im_feat[i] /= s
    mesh = np.array(np.meshgrid(*[range(s) for s in im_feat.shape[1:]], indexing="ij"), dtype=np.float32)
    for i, s in enumerate(sdims):
        mesh[i] /= s
    feats = np.concatenate([mesh, im_feat])
    return feats.reshape([feats.shape[0], -1])
