"""Exact combination of partial results over disjoint key sets.

Split the keys of every query into disjoint sets K_1..K_S (tiles of keys, the shards of a
distributed run, the row and the column of criss-cross attention) and aggregate over each:
``(y_s, lse_s) = aggregate(q, k[K_s], v[K_s], affinity, return_lse=True)`` with lse_s = log C_i over
K_s. The whole result follows exactly:

* C = sum f (``Softmax``, ``Gaussian(normalize=True)``) and the count normalisation
  (``DotProduct``, ``Concatenation``: C = sum of edge weights) both add their normalisers over the
  parts, C = sum_s C_s, and y is the C_s-weighted mean of the parts:
  ``lse = logsumexp_s lse_s`` and ``y = sum_s exp(lse_s - lse) y_s``, computed from the largest lse_s
  so nothing overflows (FlashAttention's rescaling, across parts);
* C = 1 (``Gaussian(normalize=False)``): the parts add, ``y = sum_s y_s``; lse = 0 where any part
  has a neighbour.

A part whose query has no neighbour (lse_s = -inf, y_s = 0 as :func:`nlgraph.aggregate` returns
it) contributes nothing; a query without neighbours in every part gets y = 0 and lse = -inf, as
from one call over all keys. Differentiable (plain autograd, no NaN at -inf rows), and traceable
(torch.compile, export, vmap: no data-dependent branch).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .affinity import NORMS, Affinity, Softmax
from .graph import safe_log

__all__ = ["merge"]


def _check_parts(parts) -> list[tuple[Tensor, Tensor]]:
    if isinstance(parts, Tensor) or not isinstance(parts, Sequence):
        raise TypeError(f"parts must be a list of (y, lse) pairs, got {type(parts).__name__}")
    if len(parts) == 0:
        raise ValueError("parts must hold at least one (y, lse) pair, got an empty list")
    out = []
    for i, part in enumerate(parts):
        if (isinstance(part, Tensor) or not isinstance(part, Sequence) or len(part) != 2
                or not all(isinstance(t, Tensor) for t in part)):
            raise TypeError(f"parts[{i}] must be a (y, lse) pair of tensors, as aggregate(..., "
                            f"return_lse=True) returns, got {type(part).__name__}")
        y, lse = part
        if not (y.is_floating_point() and lse.is_floating_point()):
            raise TypeError(f"parts[{i}] must hold floating-point tensors, got y {y.dtype} and lse "
                            f"{lse.dtype}")
        if y.dim() < 2 or tuple(lse.shape) != tuple(y.shape[:-1]):
            raise ValueError(f"parts[{i}] must be y of shape (..., N, e) and lse of shape (..., N), got y "
                             f"{tuple(y.shape)} and lse {tuple(lse.shape)}")
        out.append((y, lse))
    y0, l0 = out[0]
    for i, (y, lse) in enumerate(out[1:], 1):
        if y.shape != y0.shape:
            raise ValueError(f"every part must have the same shape: parts[0] has y {tuple(y0.shape)}, "
                             f"parts[{i}] has y {tuple(y.shape)}")
        if y.dtype != y0.dtype:
            raise TypeError(f"every part's y must share a dtype: parts[0] has {y0.dtype}, parts[{i}] has "
                            f"{y.dtype}")
        if y.device != y0.device or lse.device != l0.device or lse.device != y0.device:
            raise ValueError(f"every part must be on one device: parts[0] on {y0.device}, parts[{i}] on "
                             f"{y.device} / {lse.device}")
    return out


def merge(parts: Sequence[tuple[Tensor, Tensor]],
          affinity: Optional[Affinity] = None) -> tuple[Tensor, Tensor]:
    """Combine results over disjoint key sets exactly: ``[(y_s, lse_s)] -> (y, lse)``.

    Args:
        parts: one ``(y_s, lse_s)`` pair per key set, as ``nlgraph.aggregate(..., return_lse=True)``
            returns them: y_s of shape (..., N, e), lse_s = log C_i over that set, shape (..., N), the
            same shapes for every part. The key sets must be disjoint (a key in two parts counts twice).
        affinity: the affinity the parts were computed with (its normalisation decides the rule);
            default ``Softmax()``, as in :func:`nlgraph.aggregate`.

    Returns:
        ``(y, lse)``: y (..., N, e) in the parts' dtype and lse (..., N) in the promoted dtype of the
        parts' lse; equal (up to rounding) to one ``aggregate(..., return_lse=True)`` over all keys.

    Raises:
        TypeError: parts not a list of tensor pairs, mixed dtypes, or affinity not an Affinity.
        ValueError: an empty list, shapes that differ or do not match (..., N, e) / (..., N), devices
            that differ, or an affinity whose normalisation has no merge rule.
    """
    affinity = Softmax() if affinity is None else affinity
    if not isinstance(affinity, Affinity):
        raise TypeError(f"affinity must be an nlgraph.affinity.Affinity, got {type(affinity).__name__}")
    if affinity.norm not in NORMS:
        raise ValueError(f"merge has rules for the normalisations {NORMS}; {affinity!r} has norm "
                         f"{affinity.norm!r}")
    pairs = _check_parts(parts)
    lse_dtype = pairs[0][1].dtype
    for _, lse in pairs[1:]:
        lse_dtype = torch.promote_types(lse_dtype, lse.dtype)
    y_dtype = pairs[0][0].dtype
    # accumulate in at least float32 (fp16/bf16 parts) and at least the lse's precision
    acc = torch.promote_types(torch.promote_types(y_dtype, lse_dtype), torch.float32)
    lses = torch.stack([lse.to(acc) for _, lse in pairs])  # (S, ..., N)
    if affinity.norm == "none":  # C = 1: sums add; log C = 0 wherever some part has a neighbour
        y = pairs[0][0].to(acc, copy=True)
        for part, _ in pairs[1:]:
            y = y + part.to(acc)
        lse = torch.where(torch.isfinite(lses).any(0), 0.0, -math.inf).to(lse_dtype)
        return y.to(y_dtype), lse
    # C = sum_s C_s (softmax denominators or edge counts alike): weights C_s / C from the log-normalisers,
    # shifted by the largest (detached: the shift cancels in value and gradient) so nothing overflows
    top = lses.detach().amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lses - top)  # exp(-inf) = 0: a part without neighbours has weight 0
    total = w.sum(0)
    lse = top + safe_log(total)
    w = w / torch.where(total > 0, total, torch.ones_like(total))
    y = sum(w_s[..., None] * y.to(acc) for w_s, (y, _) in zip(w, pairs, strict=True))
    return y.to(y_dtype), lse.to(lse_dtype)
