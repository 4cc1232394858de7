"""Data-dependent checks of tensor values, shared by the core op, the graphs and the affinities.

Each check reads the tensor's values, so it synchronises with the device and cannot be traced:
every caller runs them only where :func:`checking_values` says so (eager mode; under
``torch.compile`` / ``torch.export`` they step aside instead of breaking the graph).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch._C._functorch import TransformType, get_interpreter_stack

__all__ = ["checking_values", "all_finite", "finite_nonnegative", "no_nan_or_posinf", "positive",
           "finite_number"]


def checking_values() -> bool:
    """True when value checks may read tensor values on the host: in eager mode.

    False while ``torch.compile`` / ``torch.export`` trace the code (a data-dependent branch would
    break the graph: ``fullgraph=True`` and export refuse it) and inside ``torch.func.vmap`` (a
    batched tensor has no single value to branch on). There the checks step aside and the traced
    code computes the same result without them.
    """
    if torch.compiler.is_compiling():
        return False
    stack = get_interpreter_stack()
    return not stack or all(level.key() != TransformType.Vmap for level in stack)


def all_finite(t: Tensor) -> bool:
    """True when no entry is NaN or +-Inf.

    Fast path: a sum is finite whenever every entry is finite and the sum does not overflow; NaN
    and Inf always propagate to it. Only a non-finite sum (a bad entry, or finite entries
    overflowing the accumulator) pays for the elementwise check that decides. Measured 30x faster
    than ``isfinite(t).all()`` on a 262144 x 21 float32 tensor.
    """
    t = t.detach()
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def finite_nonnegative(t: Tensor) -> bool:
    """True when every entry is finite and >= 0 (edge weights)."""
    t = t.detach()
    if t.numel() == 0:
        return True
    return bool(t.amin() >= 0) and all_finite(t)


def positive(t: Tensor) -> bool:
    """True when every entry is finite and > 0 (bandwidths)."""
    t = t.detach()
    if t.numel() == 0:
        return True
    return bool(t.amin() > 0) and all_finite(t)


def no_nan_or_posinf(t: Tensor) -> bool:
    """True when no entry is NaN or +Inf; -Inf is allowed (additive log-weights: -inf = no edge).

    Fast path: the sum is < +inf exactly when no entry is NaN or +inf, unless finite entries
    overflow it; only then the elementwise test decides.
    """
    t = t.detach()
    if bool(t.sum() < math.inf):
        return True
    return not bool((torch.isnan(t) | (t == math.inf)).any())


def finite_number(value: object, *, positive: bool = False) -> bool:
    """True for a plain number (int or float, not a bool) that is finite and >= 0 (> 0 with ``positive``).

    The argument check of scalar options (offsets, cut-offs, weights, h, sigma); no tensor involved."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value > 0 if positive else value >= 0))
