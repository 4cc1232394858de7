"""The numba kernels of :mod:`._exp_jit` (imported by it on first use, where numba imports).

Module-level functions, so numba's on-disk cache (``cache=True``) finds them again in the next
process; defined inside a function, every process compiled them anew (0.5-2 s at its first call)
and added another entry to the cache directory.
"""

import numpy as np
from numba import njit

from ._exp_jit import SOFTMAX_BLOCK

# no reassoc: it would let LLVM fold the two-part ln 2 back into one (4 ulp measured)
flags = {"nsz", "arcp", "contract", "nnan"}

@njit(nogil=True, inline="always", fastmath=flags)
def exp_block(t, c, bits, scale, count):  # pragma: no cover - compiled
    """t[:count] <- exp(t[:count] - c) in place (``bits``/``scale``: an int32 scratch and its
    float32 view, at least ``count`` long)."""
    for j in range(count):
        x = min(max(t[j] - c, np.float32(-88.0)), np.float32(88.0))
        n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
        u = x - n * np.float32(0.693359375)
        u = u - n * np.float32(-2.12194440e-4)
        p = np.float32(1.9875691500e-4)
        p = p * u + np.float32(1.3981999507e-3)
        p = p * u + np.float32(8.3334519073e-3)
        p = p * u + np.float32(4.1665795894e-2)
        p = p * u + np.float32(1.6666665459e-1)
        p = p * u + np.float32(5.0000001201e-1)
        t[j] = p * u * u + u + np.float32(1.0)
        bits[j] = (np.int32(n) + np.int32(127)) << 23  # 2^n; n = -127 gives 0 (flush)
    for j in range(count):
        t[j] = t[j] * scale[j]

# reductions may reassociate (a tree of vector partial sums/maxima instead of one serial chain)
@njit(nogil=True, inline="always", fastmath=flags | {"reassoc"})
def row_max(row, count):  # pragma: no cover - compiled
    top = row[0]
    for j in range(1, count):
        top = max(top, row[j])
    return top

@njit(nogil=True, inline="always", fastmath=flags | {"reassoc"})
def row_sum(row, count):  # pragma: no cover - compiled
    total = np.float32(0.0)
    for j in range(count):
        total += row[j]
    return total

@njit(cache=True, nogil=True, fastmath=flags)
def exp_rows(s, shift, start, end):  # pragma: no cover - compiled
    m = s.shape[1]
    bits = np.empty(m, np.int32)
    scale = bits.view(np.float32)
    for r in range(start, end):
        exp_block(s[r], shift[r], bits, scale, m)

@njit(cache=True, nogil=True, fastmath=flags)
def softmax_rows(x, out, start, end):  # pragma: no cover - compiled
    """out[r] = softmax(x[r]) for rows [start, end), SOFTMAX_BLOCK rows at a time: each block's
    shifted scores are exponentiated in one flat pass (whole vectors for short rows, instead of
    a scalar tail per row)."""
    m = x.shape[1]
    block = SOFTMAX_BLOCK
    bits = np.empty(block * m, np.int32)
    scale = bits.view(np.float32)
    dead = np.zeros(block, np.bool_)
    flat = out.reshape(-1)
    if m == 2:  # two labels: the same operations written per row without the loops (vectorised;
        # ``python -m crf._layout``, (262144, 2), two threads: 2.00 -> 0.96 ms; bits: test_exp_jit.py)
        for r0 in range(start, end, block):
            r1 = min(end, r0 + block)
            for r in range(r0, r1):
                a, b = x[r, 0], x[r, 1]
                top = max(a, b)
                dead[r - r0] = top == -np.inf
                top = np.float32(0.0) if top == -np.inf else top
                out[r, 0] = a - top
                out[r, 1] = b - top
            exp_block(flat[r0 * 2:r1 * 2], np.float32(0.0), bits, scale, (r1 - r0) * 2)
            for r in range(r0, r1):
                a, b = out[r, 0], out[r, 1]
                inv = np.float32(np.nan) if dead[r - r0] else np.float32(1.0) / (np.float32(0.0) + a + b)
                out[r, 0] = a * inv
                out[r, 1] = b * inv
        return
    for r0 in range(start, end, block):
        r1 = min(end, r0 + block)
        for r in range(r0, r1):
            row = x[r]
            o = out[r]
            top = row_max(row, m)
            dead[r - r0] = top == -np.inf  # no finite entry: NaN, as torch's softmax gives
            if dead[r - r0]:
                top = np.float32(0.0)
            for j in range(m):
                o[j] = row[j] - top
        exp_block(flat[r0 * m:r1 * m], np.float32(0.0), bits, scale, (r1 - r0) * m)
        for r in range(r0, r1):
            o = out[r]
            # the sum is >= 1 (the maximum gives exp(0)), 0 for a dead row
            inv = np.float32(np.nan) if dead[r - r0] else np.float32(1.0) / row_sum(o, m)
            for j in range(m):
                o[j] = o[j] * inv
