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
where numba imports; everywhere else :func:`exp_shifted_` answers False and the caller runs torch's
ops. A ``nogil`` kernel: concurrent calls from several Python threads are safe. It runs on the
calling thread only: split over a thread pool beside torch's OpenMP workers (which spin after each
GEMM) it measured slower at two threads than torch's two-thread ``sub_`` + ``exp_``. On one part, a
512 x 512 tile takes 0.11 ms against torch's 0.29 ms on one thread and 0.15 ms on two.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .._optional import optional
from .._values import untransformed

__all__ = ["USE_JIT", "MIN_NUMEL", "SOFTMAX_MAX_ROW", "SOFTMAX_MAX_ROW_THREADED", "exp_shifted_",
           "softmax_rows"]

#: Run the compiled kernel where it applies (False: torch's sub_ + exp_ everywhere, e.g. to compare).
USE_JIT = True
#: Tiles of fewer elements keep torch's ops: the kernel's fixed cost (array views, the call) is ~7 us;
#: ``OMP_NUM_THREADS=1 python benchmarks/turns.py exp`` (minimum of 5 x 3000 calls): 16 x 16 7.5 vs
#: torch's 3.5 us, 64 x 64 8.7 vs 7.0, 96 x 96 10.4 vs 11.4, 128 x 128 12.6 vs 18.1, 256 x 256 28 vs
#: 61. With two threads torch's exp splits larger tiles: 96 x 96 16.7 vs 16.4 us, 128 x 128 19.8 vs
#: 18.6, 256 x 256 44 vs 60 (one noisy run): tiles of 8192 to ~32768 elements are then a tie.
MIN_NUMEL = 1 << 13

_KERNELS: Optional[dict[str, Any]] = None


#: Rows per block of the compiled softmax (64 rows of 21 labels: 5 KiB, in L1 with its scratch).
SOFTMAX_BLOCK = 64


def _kernels() -> Optional[dict[str, Any]]:
    global _KERNELS
    if _KERNELS is None:
        if optional("numba") is None:
            return None
        from . import _exp_kernels

        _KERNELS = {"exp_rows": _exp_kernels.exp_rows, "softmax_rows": _exp_kernels.softmax_rows}
    return _KERNELS


def _takes(s: Tensor) -> bool:
    """Whether the compiled kernels take ``s``: float32 on the CPU, at least :data:`MIN_NUMEL`
    elements, contiguous, needing no gradient, not traced or transformed, numba importable."""
    return (USE_JIT and s.device.type == "cpu" and s.dtype == torch.float32 and s.dim() >= 1
            and s.numel() >= max(1, MIN_NUMEL) and s.is_contiguous() and not s.requires_grad
            and untransformed() and _kernels() is not None)


def applies(s: Tensor, shift: Tensor) -> bool:
    """Whether :func:`exp_shifted_` runs the compiled kernel on these tensors."""
    return (shift.dtype == torch.float32 and tuple(shift.shape) == tuple(s.shape[:-1]) and _takes(s))


def exp_shifted_(s: Tensor, shift: Tensor) -> bool:
    """``s <- exp(s - shift[..., None])`` in place by the compiled kernel and True, or False (nothing
    done) where it does not apply (see the module docstring); the caller then runs torch's ops."""
    if not applies(s, shift):
        return False
    kernels = _kernels()
    assert kernels is not None  # applies() compiled them
    kernel = kernels["exp_rows"]
    m = s.shape[-1]
    rows = s.numel() // m
    a = s.detach().view(rows, m).numpy()
    c = shift.detach().contiguous().reshape(rows).numpy()
    kernel(a, c, 0, rows)
    return True


#: Rows of at most this many entries take the compiled softmax when torch runs one thread, and of at
#: most SOFTMAX_MAX_ROW_THREADED with more threads (longer ones: torch's, which is faster there).
SOFTMAX_MAX_ROW = 32
SOFTMAX_MAX_ROW_THREADED = 15


def softmax_rows(x: Tensor, out: Optional[Tensor] = None) -> Optional[Tensor]:
    """``torch.softmax(x, dim=1)`` of a 2-D float32 CPU tensor with short rows (2 to
    :data:`SOFTMAX_MAX_ROW` entries on one thread, :data:`SOFTMAX_MAX_ROW_THREADED` on more: a dense
    CRF's labels) by the compiled kernel, into ``out`` if given (contiguous, x's shape, not x's
    memory) else a new tensor; None (nothing done) where the kernel does not apply (the conditions
    of :func:`applies` on x).

    Each block of :data:`SOFTMAX_BLOCK` rows is exponentiated in one flat pass (whole vectors,
    where torch's per-row vector loop ends in a scalar tail unless the row is a multiple of 16).
    ``python -m crf._layout`` ((262144, L), median of 9, each call right after a torch op on the same
    tensor, the 2-core AMD EPYC VM; one part on the calling thread), L = 2 / 5 / 8 / 12 / 16 / 21 / 64:
    one thread 3.4 / 5.5 / 4.9 / 6.1 / 4.5 / 9.1 / 28 ms against torch's row softmax 13.7 / 27.8 /
    42.1 / 58.4 / 8.2 / 12.9 / 18.1 ms (and the (L, N) view's 3.7 / 7.5 / 12.1 / 13.9 / 16.3 / 45.7 /
    197 ms); two threads 3.3 / 5.2 / 4.2 / 7.0 / 7.2 / 6.7 / 23 against 7.0 / 13.6 / 20.2 / 29.1 / 4.2 /
    6.9 / 9.3 ms. Hence up to :data:`SOFTMAX_MAX_ROW` entries on one thread, and up to
    :data:`SOFTMAX_MAX_ROW_THREADED` on more (at 16 labels torch's loop covers whole rows on both
    cores; at 21 the two tie here, and in the README's cold 21-label mean field, the module with and
    without this kernel timed in turns in one process, it made inference slower: 262 against 244
    ms). One part only: split over a thread pool right after torch's two-thread ops, the parts ran
    no faster (torch's OpenMP workers spin on the second core for a while after each parallel op).
    The exp is :func:`exp_shifted_`'s (within 1 ulp; results below 2^-126 flush to 0; the row's
    maximum gives exp(0) = 1, so each row's sum is >= 1). A row without a finite entry (all -inf)
    gives NaN, as torch's softmax does; rows must hold no NaN or +inf (callers: a CRF's finite
    scores, -inf for an impossible label)."""
    longest = SOFTMAX_MAX_ROW if torch.get_num_threads() == 1 else SOFTMAX_MAX_ROW_THREADED
    if x.dim() != 2 or not 2 <= x.shape[1] <= longest or not _takes(x):
        return None
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous()
          or out.requires_grad or out.data_ptr() == x.data_ptr()):
        return None
    kernels = _kernels()
    assert kernels is not None  # _takes() compiled them
    kernels["softmax_rows"](x.detach().numpy(), out.detach().numpy(), 0, x.shape[0])
    return out
