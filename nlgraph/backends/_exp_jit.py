"""The score tiles' shifted exponential on the CPU, compiled by numba: ``s <- exp(s - c)`` per row.

The exp kernels' tiles (``chunked``'s forward and the shared tile backward) spend most of their
non-GEMM time there: torch's ``sub_`` then ``exp_`` are two passes over the tile, and its exp is a
1-ulp SLEEF routine. This kernel fuses the two in one pass with a vectorisable exponential: the
classic Cody-Waite reduction ``t = n ln 2 + u`` (n = round(t / ln 2), ln 2 split in two parts so
``u`` is exact), a degree-7 polynomial for ``exp(u)`` on ``|u| <= ln(2) / 2`` (Cephes' expf
coefficients) and ``2^n`` built from its exponent bits. Measured against float64: within 1 ulp
of the exact value (0.99 at most; torch's own exp: 0.56; ``tests/test_exp_jit.py``). Results below
2^-126 (t < -87.3, subnormal in float32) are flushed to 0: the callers' rows hold a weight of 1
(their maximum, or a sum of 1 after the log-sum-exp), so each flushed weight is below 2^-126 of the
row's total.
-inf (a masked score) gives 0. Differences above 88 are taken as 88 (exp(88) = 1.65e38; the callers'
differences are <= 0: scores minus their row's running maximum or log-sum-exp).

float32 only (float64 tiles keep torch's exp), tiles of at least :data:`MIN_NUMEL` elements,
contiguous rows, not under torch.compile or torch.func transforms (numba sees plain arrays), and only
where numba imports; everywhere else
:func:`exp_shifted_` answers False and the caller runs torch's ops. A ``nogil`` kernel: concurrent
calls from several Python threads are safe. It runs on the calling thread only: split over a
thread pool beside torch's OpenMP workers (which spin after each GEMM) it measured slower at two
threads than torch's two-thread ``sub_`` + ``exp_``. On one part, a 512 x 512 tile takes 0.11 ms
against torch's 0.29 ms on one thread and 0.15 ms on two.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from .._optional import optional
from .._values import untransformed

__all__ = ["USE_JIT", "MIN_NUMEL", "exp_shifted_"]

#: Run the compiled kernel where it applies (False: torch's sub_ + exp_ everywhere, e.g. to compare).
USE_JIT = True
#: Tiles of fewer elements keep torch's ops: the kernel's fixed cost (array views, the call) is ~7 us;
#: measured on one thread (in turns, minimum of 5 x 3000 calls): 16 x 16 7.5 vs torch's 3.5 us,
#: 64 x 64 8.7 vs 7.0, 96 x 96 10.4 vs 11.4, 128 x 128 12.6 vs 18.1, 256 x 256 28 vs 61.
MIN_NUMEL = 1 << 13

_KERNEL: Optional[Any] = None


def _compile() -> Any:
    """The numba kernel, compiled (or loaded from numba's cache) on first use."""
    from numba import njit

    # no reassoc: it would let LLVM fold the two-part ln 2 back into one (4 ulp measured)
    @njit(cache=True, nogil=True, fastmath={"nsz", "arcp", "contract", "nnan"})
    def exp_rows(s, shift, start, end):  # pragma: no cover - compiled
        m = s.shape[1]
        bits = np.empty(m, np.int32)
        scale = bits.view(np.float32)
        for r in range(start, end):
            row = s[r]
            c = shift[r]
            for j in range(m):
                t = min(max(row[j] - c, np.float32(-88.0)), np.float32(88.0))
                n = np.floor(t * np.float32(1.4426950408889634) + np.float32(0.5))
                u = t - n * np.float32(0.693359375)
                u = u - n * np.float32(-2.12194440e-4)
                p = np.float32(1.9875691500e-4)
                p = p * u + np.float32(1.3981999507e-3)
                p = p * u + np.float32(8.3334519073e-3)
                p = p * u + np.float32(4.1665795894e-2)
                p = p * u + np.float32(1.6666665459e-1)
                p = p * u + np.float32(5.0000001201e-1)
                row[j] = p * u * u + u + np.float32(1.0)
                bits[j] = (np.int32(n) + np.int32(127)) << 23  # 2^n; n = -127 gives 0 (flush)
            for j in range(m):
                row[j] = row[j] * scale[j]

    return exp_rows


def _kernel() -> Optional[Any]:
    global _KERNEL
    if _KERNEL is None:
        if optional("numba") is None:
            return None
        _KERNEL = _compile()
    return _KERNEL


def applies(s: Tensor, shift: Tensor) -> bool:
    """Whether :func:`exp_shifted_` runs the compiled kernel on these tensors."""
    return (USE_JIT and s.device.type == "cpu" and s.dtype == torch.float32 and shift.dtype == torch.float32
            and s.dim() >= 1 and s.numel() >= max(1, MIN_NUMEL)
            and tuple(shift.shape) == tuple(s.shape[:-1])
            and s.is_contiguous() and not s.requires_grad
            and untransformed()
            and _kernel() is not None)


def exp_shifted_(s: Tensor, shift: Tensor) -> bool:
    """``s <- exp(s - shift[..., None])`` in place by the compiled kernel and True, or False (nothing
    done) where it does not apply (see the module docstring); the caller then runs torch's ops."""
    if not applies(s, shift):
        return False
    kernel = _kernel()
    assert kernel is not None  # applies() compiled it
    m = s.shape[-1]
    rows = s.numel() // m
    a = s.detach().view(rows, m).numpy()
    c = shift.detach().contiguous().reshape(rows).numpy()
    kernel(a, c, 0, rows)
    return True
