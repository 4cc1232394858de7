"""The numba kernels of :mod:`._layout` (imported by it on first use, where numba imports): module-level
functions, so numba's on-disk cache finds them again in the next process (defined inside a function,
every process compiled them anew, ~0.5 s at its first call, and added a cache entry)."""

from numba import njit


@njit(cache=True, nogil=True)
def wide(a, out, c0, c1, negate):  # pragma: no cover - compiled
    """out[j, i] = a[i, j] (-a[i, j] where ``negate``) for every row i and the columns j in [c0, c1)
    of a source with long rows: per block of 256 columns, each source row's segment read in order
    (the block's destination rows stay in cache)."""
    for s in range(c0, c1, 256):
        e = min(c1, s + 256)
        for i in range(a.shape[0]):
            row = a[i]
            if negate:
                for j in range(s, e):
                    out[j, i] = -row[j]
            else:
                for j in range(s, e):
                    out[j, i] = row[j]

@njit(cache=True, nogil=True)
def tall(a, out, r0, r1, negate):  # pragma: no cover - compiled
    """The same for the rows i in [r0, r1) of a source with short rows: per block of 256 rows, each
    destination row's segment written in order."""
    for s in range(r0, r1, 256):
        e = min(r1, s + 256)
        for j in range(a.shape[1]):
            o = out[j]
            if negate:
                for i in range(s, e):
                    o[i] = -a[i, j]
            else:
                for i in range(s, e):
                    o[i] = a[i, j]
