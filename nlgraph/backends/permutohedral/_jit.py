"""The lattice construction's CPU kernels, compiled by numba (LLVM from a wheel: no compiler on the
user's machine): elevation, hash tables of vertex codes, blur neighbours and the CSR matrices.

The same lattice as :func:`.lattice.build_lattice`'s tensor path, matrix for matrix: the same
arithmetic step for step, and vertices numbered in order of first touch as there (so the same simplices,
weights, blur rows and border conventions). What differs is how vertices are found: the tensor path
sorts the P (d+1) corner codes; here each part of the points fills its own hash table (consecutive
points in one simplex, most neighbouring pixels, reuse its vertices), and only the parts' distinct
codes (V << P (d+1)) are sorted and merged.

Every kernel is ``nogil``: :func:`build` runs the per-point and per-vertex passes in parts over
torch's thread count with a thread pool (no numba threading layer, so concurrent builds from several
Python threads are safe). Compiled once per machine (``cache=True`` keeps the machine code next to
this file, or under ``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional

import numpy as np
from numba import njit

_EMPTY = -1  # hash slot sentinel (codes are >= 0)
_M1 = np.uint64(0xFF51AFD7ED558CCD)  # MurmurHash3's 64-bit finaliser
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


@njit(cache=True, nogil=True, inline="always")
def _hash(code, shift):
    """The table slot of a code: MurmurHash3's finaliser, its top bits (``shift`` = 64 - log2 of the
    table size). A full mix, not Fibonacci hashing alone: codes of grid points (a volume's positions)
    are arithmetic progressions that a single multiply clusters (probes 40x longer measured)."""
    h = np.uint64(code)
    h ^= h >> _S33
    h *= _M1
    h ^= h >> _S33
    h *= _M2
    h ^= h >> _S33
    return np.int64(h >> np.uint64(shift))


@njit(cache=True, nogil=True)
def _elevate(f, scale, ints, inv, start, end, rem0, rank, bary, lo, hi):
    """Points f[start:end] (P, d) -> remainder-0 points rem0 (P, d) int64 (first d coordinates),
    ranks (P, d+1) uint8 and barycentric weights bary (P, d+1), in f's dtype step for step as the
    reference code (and the tensor path's ``_elevate_block``): ``scale`` the d scale factors, ``ints``
    the whole numbers 0..d+1 and ``inv`` 1/(d+1), all in f's dtype, so no operation widens. lo/hi (d,)
    get the range of rem0 over these points."""
    d = f.shape[1]
    d1 = d + 1
    fd1 = ints[d1]
    one = ints[1]
    el = np.empty(d1, f.dtype)
    r0 = np.empty(d1, f.dtype)
    rk = np.empty(d1, np.int64)
    v = np.empty(d1, f.dtype)
    tmp = np.empty(1, f.dtype)
    for p in range(start, end):
        acc = f[p, d - 1] * scale[d - 1]
        el[d] = acc * (-ints[d])
        for c in range(d - 1, 0, -1):
            cf = f[p, c - 1] * scale[c - 1]
            el[c] = acc - cf * ints[c]
            acc = acc + cf
        el[0] = acc
        total = ints[0]
        for i in range(d1):
            down = np.floor(el[i] * inv) * fd1
            up = down + fd1
            if up - el[i] < el[i] - down:
                down = up
            r0[i] = down
            total = total + down
        tot = int(np.round(total * inv))
        for i in range(d1):
            el[i] = el[i] - r0[i]  # the residual
        for i in range(d1):
            k = tot
            di = el[i]
            for j in range(i):
                k += el[j] >= di  # (branch-free: the comparisons are data dependent)
            for j in range(i + 1, d1):
                k += el[j] > di
            rk[i] = k
        for i in range(d1):
            # floor(k / (d+1)) (d+1) by comparisons: k lies in [-(d+1)/2, d + (d+1)/2] (|tot| <= (d+1)/2)
            # and an int64 division per rank cost more than the rest of a d = 2 point (15.7 -> 9.2 ms
            # on 512x512 positions, one thread); the division stays for any k outside [-(d+1), 2d+1]
            k = rk[i]
            if k < 0:
                shift = -d1 if k >= -d1 else (k // d1) * d1
            elif k <= d:
                shift = 0
            else:
                shift = d1 if k <= 2 * d + 1 else (k // d1) * d1
            ri = k - shift
            tmp[0] = shift  # (stored: converted to f's dtype)
            fs = tmp[0]
            if i < d:
                x = np.int64(r0[i] - fs)
                rem0[p, i] = x
                if p == start or x < lo[i]:
                    lo[i] = x
                if p == start or x > hi[i]:
                    hi[i] = x
            rank[p, i] = ri
            v[d - ri] = (el[i] + fs) * inv
        for k in range(1, d1):
            bary[p, k] = v[k] - v[k - 1]
        bary[p, 0] = (v[0] + one) - v[d]


@njit(cache=True, nogil=True)
def _log2(cap):
    k = 0
    while (np.int64(1) << k) < cap:
        k += 1
    return k


@njit(cache=True, nogil=True, inline="always")
def _slot(code, keys, mask, shift):
    """The slot of ``code`` in an open-addressing table (:func:`_hash`, linear probing): where it is,
    or the empty slot where it would go. Inlined where called (as fast as the loop written in place,
    measured on the 512x512 photo's insertion pass)."""
    h = _hash(code, shift)
    while keys[h] != _EMPTY and keys[h] != code:
        h = (h + 1) & mask
    return h


@njit(cache=True, nogil=True, inline="always")
def _batch_span(p, nq, n, m, same):
    """(batch of point p, the first point after that batch's run): the query points' batch is p // n
    (all points when ``same``), the key points' (p - nq) // m. The insertion passes track it from one
    run to the next instead of dividing at every point (the integer division per point measured
    0.3-0.5 ms of the 512x512 lattices' 7-14 ms insertion passes, one thread)."""
    if same or p < nq:
        b = p // n
        stop = (b + 1) * n
        return b, stop if same or stop < nq else nq
    b = (p - nq) // m
    return b, nq + (b + 1) * m


@njit(cache=True, nogil=True)
def _insert(rem0, rank, strides, offset, nq, n, m, same, corner_vid, p0, end, keys, vals, codes, nv):
    """:func:`_vertices`' pass over the points [p0, end) into a table (keys, vals; codes holds the
    vertices in id order, nv of them so far) until it is half full: returns (the point to resume at,
    or ``end`` when done; the vertex count). Tables never change size here (growing them inside the
    loop makes every probe reload them: 5x slower)."""
    d = rem0.shape[1]
    d1 = d + 1
    cap = keys.shape[0]
    mask = cap - 1
    shift = 64 - _log2(cap)
    limit = cap // 2
    ssum = np.int64(0)
    for i in range(d):
        ssum += strides[i]
    who = np.empty(d1, np.int64)
    prev_code = np.int64(-1)
    b, stop = _batch_span(p0, nq, n, m, same)
    for p in range(p0, end):
        if p >= stop:
            b, stop = _batch_span(p, nq, n, m, same)
        pc = b * strides[d] - offset
        for i in range(d):
            pc += rem0[p, i] * strides[i]
        if pc == prev_code:  # consecutive points in one simplex (neighbouring pixels) share its vertices
            reuse = True
            for i in range(d):
                if rank[p, i] != rank[p - 1, i]:
                    reuse = False
                    break
            if reuse:
                for r in range(d1):
                    corner_vid[p, r] = corner_vid[p - 1, r]
                continue
        # corner r's code: pc + r ssum - d1 * (sum of strides of coordinates with rank > d - r); from
        # corner r - 1 to r exactly the coordinate of rank d + 1 - r joins the sum
        for i in range(d1):
            who[rank[p, i]] = i
        c = pc
        for r in range(d1):
            if r:
                i = who[d1 - r]
                c += ssum - (d1 * strides[i] if i < d else 0)
            h = _slot(c, keys, mask, shift)
            if keys[h] == _EMPTY:
                if nv == limit:
                    return p, nv
                keys[h] = c
                vals[h] = nv
                codes[nv] = c
                nv += 1
            corner_vid[p, r] = vals[h]
        prev_code = pc
    return end, nv


@njit(cache=True, nogil=True)
def _table(codes, nv, cap):
    """An open-addressing table (keys, values = ids) of codes[:nv], ``cap`` slots (a power of two)."""
    keys = np.full(cap, _EMPTY, np.int64)
    vals = np.empty(cap, np.int32)
    shift = 64 - _log2(cap)
    for u in range(nv):
        g = _slot(codes[u], keys, cap - 1, shift)
        keys[g] = codes[u]
        vals[g] = u
    return keys, vals


@njit(cache=True, nogil=True)
def _vertices(rem0, rank, strides, offset, nq, n, m, same, start, end, corner_vid):
    """The distinct corner codes of points [start, end), in order of first appearance; corner_vid
    (P, d+1) int32 gets each corner's index among them. A point's code is sum_i rem0_i stride_i -
    offset + batch stride_d; corner r adds r sum_i stride_i - (d+1) sum_{i: rank_i > d - r} stride_i
    (the canonical simplex). The table starts small and doubles when half full: one sized to the
    vertices stays cache-resident (one sized to the points, mostly empty, costs a cache miss per
    lookup: 3x the time on a 512x512 photo)."""
    cap = np.int64(1) << 12
    keys = np.full(cap, _EMPTY, np.int64)
    vals = np.empty(cap, np.int32)
    codes = np.empty(cap // 2, np.int64)
    p, nv = _insert(rem0, rank, strides, offset, nq, n, m, same, corner_vid, start, end, keys, vals, codes,
                    0)
    while p < end:
        cap *= 2
        grown = np.empty(cap // 2, np.int64)
        grown[:nv] = codes[:nv]
        codes = grown
        keys, vals = _table(codes, nv, cap)
        p, nv = _insert(rem0, rank, strides, offset, nq, n, m, same, corner_vid, p, end, keys, vals, codes,
                        nv)
    return codes[:nv].copy()


@njit(cache=True, nogil=True)
def _merge(listed, cap):
    """The parts' vertex codes, listed part after part (each in order of first appearance), numbered in
    order of first appearance over the whole list: (keys, vals) a table of ``cap`` slots (a power of two,
    at least twice the distinct codes) of code -> vertex id, ``codes`` the distinct codes by id, and
    ``where`` each listed code's id. One pass of table lookups: no sort."""
    keys = np.full(cap, _EMPTY, np.int64)
    vals = np.empty(cap, np.int32)
    codes = np.empty(listed.shape[0], np.int64)
    where = np.empty(listed.shape[0], np.int32)
    mask = cap - 1
    shift = 64 - _log2(cap)
    nv = 0
    for i in range(listed.shape[0]):
        c = listed[i]
        g = _slot(c, keys, mask, shift)
        if keys[g] == _EMPTY:
            keys[g] = c
            vals[g] = nv
            codes[nv] = c
            nv += 1
        where[i] = vals[g]
    return keys, vals, codes[:nv].copy(), where


@njit(cache=True, nogil=True)
def _remap(corner_vid, start, end, mapping):
    """corner_vid[p, r] = mapping[corner_vid[p, r]] for points [start, end) (part ids -> global ids)."""
    d1 = corner_vid.shape[1]
    for p in range(start, end):
        for r in range(d1):
            corner_vid[p, r] = mapping[corner_vid[p, r]]


@njit(cache=True, nogil=True)
def _neighbours(codes, keys, vals, deltas, start, end, plus):
    """plus[u, j] = id of the vertex at code(u) + deltas[j] (-1 where absent), u in [start, end)."""
    mask = keys.shape[0] - 1
    shift = 64 - _log2(keys.shape[0])
    d1 = deltas.shape[0]
    for u in range(start, end):
        for j in range(d1):
            c = codes[u] + deltas[j]
            h = _slot(c, keys, mask, shift)
            plus[u, j] = vals[h] if keys[h] == c else -1


@njit(cache=True, nogil=True)
def _invert(plus, minus):
    """minus[w, j] = u where plus[u, j] = w (the - neighbours: the + map's inverse), else -1."""
    nv, d1 = plus.shape
    minus[:] = -1
    for u in range(nv):
        for j in range(d1):
            w = plus[u, j]
            if w >= 0:
                minus[w, j] = u


@njit(cache=True, nogil=True)
def _blur_cols(plus, minus, start, end, cols, vals):
    """Rows u in [start, end) of the d+1 blurs: cols / vals (d+1, 3V), the matrix indices (vertex id +
    1) of u and its two neighbours along direction j in increasing order, weights 1 at u and 1/2 at
    the neighbours. An absent neighbour is an empty border vertex: 0 (below every vertex) for the
    first absent one, V + 1 (above every vertex) for a second (:func:`.lattice._blur_rows`' rule)."""
    nv, d1 = plus.shape
    for u in range(start, end):
        for j in range(d1):
            a, c = minus[u, j] + 1, plus[u, j] + 1  # matrix indices; 0: absent
            if c == 0:
                a, c = 0, (a if a else nv + 1)
            x, y, z = a, u + 1, c  # sorted by three compare-exchanges, weights alongside
            wx, wy, wz = 0.5, 1.0, 0.5
            if y < x:
                x, y, wx, wy = y, x, wy, wx
            if z < y:
                y, z, wy, wz = z, y, wz, wy
            if y < x:
                x, y, wx, wy = y, x, wy, wx
            o = 3 * u
            cols[j, o], cols[j, o + 1], cols[j, o + 2] = x, y, z
            vals[j, o], vals[j, o + 1], vals[j, o + 2] = wx, wy, wz


@njit(cache=True, nogil=True)
def _point_rows(corner_vid, bary, start, end, cols, vals):
    """Point-major CSR rows for points [start, end): row p of cols / vals (P, d+1) gets its d+1 corners
    (matrix index = vertex id + 1) in increasing order with their weights. cols / vals may be
    corner_vid / bary themselves (each row is read before it is written): the rows then take no memory
    of their own."""
    d1 = corner_vid.shape[1]
    ids = np.empty(d1, corner_vid.dtype)
    w = np.empty(d1, bary.dtype)
    for p in range(start, end):
        for r in range(d1):
            ids[r] = corner_vid[p, r]
            w[r] = bary[p, r]
        for r in range(d1):
            c = ids[r]
            k = 0
            for s in range(d1):  # the corners' ids are distinct: r's place is how many are smaller
                k += ids[s] < c  # (branch-free: an insertion sort mispredicts ~d times a point)
            cols[p, k] = c + 1
            vals[p, k] = w[r]


@njit(cache=True, nogil=True)
def _count(cols, start, end, count):
    """count[c] += the entries points [start, end) put in row c of the vertex-major matrix (cols: the
    point-major rows' matrix indices)."""
    d1 = cols.shape[1]
    for p in range(start, end):
        for r in range(d1):
            count[cols[p, r]] += 1


@njit(cache=True, nogil=True)
def _offsets(counts):
    """(crow, nxt) of the vertex-major CSR from each part's entries per row (counts (parts, V + 3):
    row c's at column c + 1, columns 0 and 1 zero): crow[c + 1] = the entries of rows <= c, and
    nxt[t, c] = part t's first entry in row c (crow[c] + the entries of parts before t). One pass
    (numpy's sum, two cumsums and a difference over the (parts, V) counts took 2-3 ms per lattice)."""
    parts, width = counts.shape
    crow = np.empty(width, np.int64)
    nxt = np.empty((parts, width - 1), np.int64)
    acc = np.int64(0)
    crow[0] = 0
    for u in range(1, width):
        for t in range(parts):
            nxt[t, u - 1] = acc
            acc += counts[t, u]
        crow[u] = acc
    return crow, nxt


@njit(cache=True, nogil=True)
def _fill(cols, pvals, start, end, first, nxt, vcols, vals):
    """The entries of points [start, end) in the vertex-major rows, from the point-major rows (cols,
    pvals): column p - first, each row's next free entry in ``nxt`` (this part's own; points in
    increasing order, so columns increase)."""
    d1 = cols.shape[1]
    for p in range(start, end):
        for r in range(d1):
            u = cols[p, r]
            k = nxt[u]
            vcols[k] = p - first
            vals[k] = pvals[p, r]
            nxt[u] = k + 1


@njit(cache=True, nogil=True)
def _column_scaled(vals, cols, scale, start, end, out):
    """out[k] = vals[k] * scale[cols[k]] for entries [start, end) of a CSR matrix (a diag(scale) on the
    right: one pass, where a gather and a product are two and a temporary)."""
    for k in range(start, end):
        out[k] = vals[k] * scale[cols[k]]


def column_scaled(vals: np.ndarray, cols: np.ndarray, scale: np.ndarray, threads: int,
                  out: Optional[np.ndarray] = None) -> np.ndarray:
    """:func:`_column_scaled` over all entries, in parts over ``threads`` on the pool, into ``out``
    (may be ``vals``: each entry is read before it is written) or a new array."""
    out = np.empty_like(vals) if out is None else out
    _run(lambda t, s, e: _column_scaled(vals, cols, scale, s, e, out), _bounds(0, vals.shape[0], threads),
         threads)
    return out


_POOL: Optional[ThreadPoolExecutor] = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A shared thread pool with at least ``workers`` threads (replaced by a larger one on demand)."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < workers:
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nlgraph-lattice")
            _POOL_SIZE = workers
        return _POOL


#: Points per part at least: smaller inputs run in fewer parts (a part costs ~0.1 ms).
_MIN_PART = 1 << 14
#: Vertices per part at least (a vertex's pass does d + 1 hash look-ups or writes 3 (d + 1) blur
#: entries: ~4x a point's work; the 512x512 photo's bilateral lattice has ~2^15 vertices).
_MIN_VERTEX_PART = 1 << 12
#: Parts per thread: the threads take parts as they come free (dynamic scheduling), so a thread that
#: starts late or runs slow (the 2-core VM: torch's OpenMP workers spin on the other core for a few ms
#: after each parallel op, and a woken thread waited up to ~5 ms) leaves its share to the others.
_PARTS_PER_THREAD = 4


def _bounds(start: int, end: int, threads: int, minimum: int = _MIN_PART) -> list[int]:
    """Part boundaries splitting [start, end) into up to ``threads`` * :data:`_PARTS_PER_THREAD` parts
    of >= ``minimum`` items (one part on one thread)."""
    most = 1 if threads <= 1 else threads * _PARTS_PER_THREAD
    parts = max(1, min(most, (end - start) // minimum))
    return [start + (end - start) * i // parts for i in range(parts + 1)]


def _run(fn: Callable[[int, int, int], Any], bounds: list[int], threads: int) -> list[Any]:
    """[fn(t, bounds[t], bounds[t + 1]) for each part t] (nogil kernels) on up to ``threads`` threads:
    the calling thread and pool threads take the parts in turn as each comes free (the caller works
    instead of waiting: one thread fewer to wake). The call returns once every part has finished: it
    waits for the parts that are running, not for a pool thread that has not woken yet (one that wakes
    after the last part was taken finds nothing to do; on the 2-core VM a woken thread started up to
    ~5 ms late, longer than some of the build's passes). An error stops the parts not yet started and
    is raised once every running part has finished (they write the caller's arrays)."""
    count = len(bounds) - 1
    if count == 1 or threads <= 1:
        return [fn(t, bounds[t], bounds[t + 1]) for t in range(count)]
    out: list[Any] = [None] * count
    errors: list[BaseException] = []
    state = threading.Condition()
    taken = [0, 0]  # parts taken, parts running (under ``state``)

    def work() -> None:
        while True:
            with state:
                t = taken[0]
                if t >= count or errors:
                    return
                taken[0], taken[1] = t + 1, taken[1] + 1
            try:
                out[t] = fn(t, bounds[t], bounds[t + 1])
            except BaseException as e:  # (raised by the caller)
                with state:
                    errors.append(e)
            finally:
                with state:
                    taken[1] -= 1
                    if not taken[1]:
                        state.notify_all()

    helpers = min(threads, count) - 1
    pool = _pool(helpers)
    for _ in range(helpers):
        pool.submit(work)
    work()
    with state:
        while taken[1]:  # (every part is taken, or an error stopped the rest)
            state.wait()
    if errors:
        raise errors[0]
    return out


def _vertex_major(cols: np.ndarray, pvals: np.ndarray, start: int, end: int, num_v: int, threads: int,
                  index_dtype: Callable[..., Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(crow, cols, vals) of the (V + 2, end - start) CSR splatting points [start, end) onto their
    corners, from the point-major rows (cols, pvals): a counting sort by vertex in parts (each part
    counts its points, then fills its share of every row after the earlier parts': columns increase
    within each row, as in one pass)."""
    d1 = cols.shape[1]
    nnz = (end - start) * d1
    bounds = _bounds(start, end, threads)
    counts = BUFFERS.empty((len(bounds) - 1, num_v + 3), np.int32, zero=True)
    _run(lambda t, s, e: _count(cols, s, e, counts[t, 1:]), bounds, threads)
    crow, nxt = _offsets(counts)
    vcols = BUFFERS.empty(nnz, index_dtype(nnz, num_v + 2, end - start))
    vals = BUFFERS.empty(nnz, pvals.dtype)
    _run(lambda t, s, e: _fill(cols, pvals, s, e, start, nxt[t], vcols, vals), bounds, threads)
    return crow, vcols, vals


#: Bytes of idle recycled buffers kept for later builds (:class:`_Buffers`; 0: none kept).
POOL_BYTES = 128 << 20
#: Whether reference counts tell an idle buffer (not on a free-threaded CPython, whose counts are
#: split between threads: there every array gets fresh memory).
_EXACT_REFCOUNTS = bool(getattr(sys, "_is_gil_enabled", lambda: True)())


class _Buffers:
    """The memory of the builds' numpy arrays, recycled: each array is a view of an owner buffer kept
    here, and a buffer nothing else refers to any more (every view of it, and every tensor made from
    one, holds a reference to it: numpy collapses a view's base to the owner) is idle and serves a
    later array of about its size. Fresh memory is dear: each first touch of a page faults (~0.6 ms
    per MB on the 2-core VM, and faults do not run in parallel); a 512x512 photo's bilateral build
    faulted ~7.7k pages (~30 MB) per build, and in a loop of builds (the lattices dropped between them)
    it took 39.7 ms with fresh memory and 25.9-33.1 ms with none (median of 15). Idle buffers beyond
    :data:`POOL_BYTES` are freed (oldest first); :func:`release` frees them all."""

    _IDLE_REFS = 3  # the list's reference, the loop variable's and getrefcount's argument

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owned: list[np.ndarray] = []  # owner buffers (uint8), oldest first

    def empty(self, shape: Any, dtype: Any, zero: bool = False) -> np.ndarray:
        """A C-contiguous array of ``shape`` and ``dtype`` (zero-filled with ``zero``) on recycled
        memory where an idle buffer of 1 to 1.25 times its size is kept, else on a new buffer."""
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(n) for n in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes == 0 or not _EXACT_REFCOUNTS:
            return np.empty(shape, dtype)
        with self._lock:
            found = self._idle_fit(nbytes)
            if found is None:
                found = np.empty(nbytes, np.uint8)
                self._owned.append(found)
                self._trim()
            out = found[:nbytes].view(dtype).reshape(shape)
        if zero:
            out.fill(0)
        return out

    def _idle_fit(self, nbytes: int) -> Optional[np.ndarray]:
        """The oldest idle buffer of ``nbytes`` to 1.25 ``nbytes`` bytes, or None (under the lock; in
        a function of its own so that no loop variable outlives the search and holds a buffer)."""
        for b in self._owned:
            if nbytes <= b.nbytes <= nbytes + nbytes // 4 and sys.getrefcount(b) == self._IDLE_REFS:
                return b
        return None

    def _trim(self) -> None:
        """Free the oldest idle buffers while the idle ones exceed :data:`POOL_BYTES` (under the lock)."""
        idle = [b for b in self._owned if sys.getrefcount(b) == self._IDLE_REFS]
        excess = sum(b.nbytes for b in idle) - POOL_BYTES
        for b in idle:
            if excess <= 0:
                break
            excess -= b.nbytes
            self._owned = [o for o in self._owned if o is not b]
        del idle

    def release(self) -> None:
        """Free every idle buffer (those still in use stay until they are idle and trimmed)."""
        with self._lock:
            self._owned = [b for b in self._owned if sys.getrefcount(b) > self._IDLE_REFS]

    def idle_bytes(self) -> int:
        """The bytes of the idle buffers kept."""
        with self._lock:
            return sum(b.nbytes for b in self._owned if sys.getrefcount(b) == self._IDLE_REFS)


BUFFERS = _Buffers()


def _madvise_switch() -> Optional[Callable[[bool], bool]]:
    """numpy's switch for ``madvise(MADV_HUGEPAGE)`` on its large allocations (returns the previous
    setting), or None where this numpy has none."""
    for home in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(home, fromlist=["_set_madvise_hugepage"])
        except ImportError:
            continue
        switch = getattr(module, "_set_madvise_hugepage", None)
        if switch is not None:
            return switch
    return None


_SMALL_PAGES_LOCK = threading.Lock()
_SMALL_PAGES_USERS = 0
_SMALL_PAGES_SAVED = True


@contextlib.contextmanager
def _small_pages() -> Iterator[None]:
    """numpy's large arrays on ordinary pages while any build runs (the caller's setting restored when
    the last concurrent build ends).

    numpy asks for transparent huge pages on arrays of 4 MB and more; where the kernel's THP defrag
    policy is ``madvise`` (a common default), each first touch of such an array may compact memory
    synchronously: on the 2-core VM the 64x128x128 volume's two ``addPairwiseEnergy`` calls (build and
    normalisation, cold, alternating with pydensecrf: ``python benchmarks/turns.py volume``, minima of
    three rounds, two runs each) took 0.24-0.29 s and 0.26-0.33 s at 98d48e1 (with huge pages) and
    0.15-0.18 s and 0.15-0.17 s with this (pydensecrf's 0.19-0.31 s and 0.20-0.27 s, whose arrays never
    ask for huge pages); the builder's temporaries are touched once. (Repeated builds alone, as in
    ``stages volume``, reuse freed huge pages and show no difference.)
    """
    global _SMALL_PAGES_USERS, _SMALL_PAGES_SAVED
    switch = _madvise_switch()
    if switch is None:
        yield
        return
    with _SMALL_PAGES_LOCK:
        if _SMALL_PAGES_USERS == 0:
            _SMALL_PAGES_SAVED = switch(False)
        _SMALL_PAGES_USERS += 1
    try:
        yield
    finally:
        with _SMALL_PAGES_LOCK:
            _SMALL_PAGES_USERS -= 1
            if _SMALL_PAGES_USERS == 0:
                switch(_SMALL_PAGES_SAVED)


def build(*args: Any) -> dict[str, Any]:
    """:func:`_build` on numpy arrays allocated without huge pages (:func:`_small_pages`)."""
    with _small_pages():
        return _build(*args)


def _build(pts: np.ndarray, scale: list[float], nq: int, n: int, m: int, same: bool, threads: int,
          strides_for: Callable[[list[int], list[int]], tuple[list[int], int]],
          index_dtype: Callable[..., Any], bound: float = float("inf"),
          corners: bool = False) -> dict[str, Any]:
    """The lattice of points ``pts`` (P, d) (float32 or float64, any strides): the B*N query points
    first (batch p // n), then unless ``same`` the B*M key points (batch (p - nq) // m).

    ``strides_for(lo, hi)``: the code strides (d coordinates and the batch) and offset for remainder-0
    coordinates in [lo, hi] (it raises where they do not fit int64); ``index_dtype(*sizes)``: the CSR
    index dtype; ``bound``: a bound on the magnitude of the points' lattice coordinates (remainder-0
    points are kept in int32 below 2^31: half the memory of int64). Returns numpy arrays: with
    ``corners``, ``rank`` (P, d+1) uint8 and ``corner_vid`` (P, d+1) int32 (vertex ids, in order of
    first touch; else None for both: corner_vid's memory becomes ``point_cols``), ``num_v``, the
    blur ``cols`` and ``blur_vals`` (d+1, 3V), the point-major rows (``point_cols``, ``point_vals``,
    (P, d+1) each) and the vertex-major matrices (``vertex``: one (crow, cols, vals) for all points
    when ``same``, else for the query points and the key points).
    """
    p_total, d = pts.shape
    d1 = d + 1
    dt = pts.dtype
    ints = np.arange(d1 + 1, dtype=dt)
    inv = dt.type(1.0 / d1)
    sc = np.asarray(scale, dtype=dt)
    # |rem0| <= |elevated coordinate| + the rounding and the rank shift (< 2 (d + 1))
    rem0 = BUFFERS.empty((p_total, d), np.int32 if bound + 4 * d1 < 2.0 ** 31 else np.int64)
    rank = BUFFERS.empty((p_total, d1), np.uint8)
    bary = BUFFERS.empty((p_total, d1), dt)
    parts = _bounds(0, p_total, threads)
    lo = np.empty((len(parts) - 1, d), np.int64)
    hi = np.empty_like(lo)
    elevate = ELEVATE.get(d, _elevate)  # unrolled for this d where generated (the same results)
    _run(lambda t, s, e: elevate(pts, sc, ints, inv, s, e, rem0, rank, bary, lo[t], hi[t]), parts, threads)
    strides, offset = strides_for(lo.min(0).tolist(), hi.max(0).tolist())
    st = np.asarray(strides, dtype=np.int64)
    corner_vid = BUFFERS.empty((p_total, d1), np.int32)
    vertices = VERTICES.get(d, _vertices)
    found = _run(lambda t, s, e: vertices(rem0, rank, st, np.int64(offset), nq, n, max(m, 1), same, s, e,
                                          corner_vid), parts, threads)
    # number the vertices in order of first touch (the first point's corners first; each part lists its
    # codes in order of first appearance, the parts in point order) and map each part's ids to it
    listed = np.concatenate(found) if len(found) > 1 else found[0]
    keys, vals, codes, where = _merge(listed, np.int64(1) << _log2(max(2 * listed.shape[0], 16)))
    starts = np.cumsum([0] + [f.shape[0] for f in found])
    if len(found) > 1:  # (part 0's ids are already the global ones)
        _run(lambda t, s, e: _remap(corner_vid, s, e, where[starts[t]:starts[t + 1]]) if t else None, parts,
             threads)
    num_v = codes.shape[0]
    ssum = int(st[:d].sum())
    deltas = np.asarray([ssum - d1 * strides[j] for j in range(d)] + [ssum], dtype=np.int64)
    plus = BUFFERS.empty((num_v, d1), np.int32)
    vparts = _bounds(0, num_v, threads, _MIN_VERTEX_PART)
    _run(lambda t, s, e: _neighbours(codes, keys, vals, deltas, s, e, plus), vparts, threads)
    minus = BUFFERS.empty((num_v, d1), np.int32)
    _invert(plus, minus)
    cols = BUFFERS.empty((d1, 3 * num_v), index_dtype(3 * num_v + 1, num_v + 2))
    blur_vals = BUFFERS.empty((d1, 3 * num_v), dt)
    _run(lambda t, s, e: _blur_cols(plus, minus, s, e, cols, blur_vals), vparts, threads)
    point_index = index_dtype(num_v + 2, p_total * d1)
    if corners or point_index != corner_vid.dtype:
        point_cols = BUFFERS.empty((p_total, d1), point_index)
        point_vals = BUFFERS.empty((p_total, d1), dt)
    else:  # the rows sorted in place: corner_vid and bary are not needed after (fresh memory is dear:
        # ~0.6 ms per MB on the 2-core VM, 6 MB each on the 512x512 photo's bilateral lattice)
        point_cols, point_vals = corner_vid, bary
    _run(lambda t, s, e: _point_rows(corner_vid, bary, s, e, point_cols, point_vals), parts, threads)
    ranges = [(0, p_total)] if same else [(0, nq), (nq, p_total)]
    vertex = [_vertex_major(point_cols, point_vals, s, e, num_v, threads, index_dtype) for s, e in ranges]
    return dict(rank=rank if corners else None, corner_vid=corner_vid if corners else None, num_v=num_v,
                cols=cols, blur_vals=blur_vals, point_cols=point_cols, point_vals=point_vals, vertex=vertex)


# the kernels unrolled for each d up to _jit_gen.MAX_D (generated from the ones above: they import
# _EMPTY, _batch_span, _log2, _slot and _table from here, so they load after them)
from ._jit_unrolled import ELEVATE, VERTICES  # noqa: E402
