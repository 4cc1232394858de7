"""The compiled (numba) lattice builder against the tensor path it replaces on the CPU.

Both number vertices in order of first touch, so every matrix must be the same matrix: the point-major ones
(slice, splat_t) and the blurs entry for entry, the vertex-major ones (splat, slice_t; the tensor
path orders their columns by simplex, the compiled one by point) as the same dense matrix after that
column permutation, and the corners / residual orders the feature gradient uses identically. The same
arithmetic runs in both, so nothing here has a tolerance.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nlgraph.backends.permutohedral import lattice as L

pytest.importorskip("numba")


def _build(q, k, same, jit, **kw):
    old = L.USE_JIT
    L.USE_JIT = jit
    try:
        return L.build_lattice(q, k, same, **kw)
    finally:
        L.USE_JIT = old


def _same_csr(a, b):
    assert a.shape == b.shape
    assert torch.equal(a.crow_indices().long(), b.crow_indices().long())
    assert torch.equal(a.col_indices().long(), b.col_indices().long())
    assert torch.equal(a.values(), b.values())


def _entries(m, order):
    """A vertex-major matrix's entries (row, point, value), its columns put back in point order,
    sorted by (row, point)."""
    rows = torch.repeat_interleave(torch.arange(m.shape[0]), m.crow_indices().long().diff())
    cols = m.col_indices().long()
    if order is not None:
        cols = order[cols]
    key = rows * m.shape[1] + cols
    key, perm = torch.sort(key)
    return key, m.values()[perm]


def _assert_same_lattice(q, k, same, **kw):
    a = _build(q, k, same, True, **kw)
    t = _build(q, k, same, False, **kw)
    assert a.num_vertices == t.num_vertices and a.alpha == t.alpha
    _same_csr(a.slice, t.slice)
    _same_csr(a.splat_t, t.splat_t)
    for x, y in zip(a.blurs, t.blurs, strict=True):
        _same_csr(x, y)
    for x, y in ((_entries(a.splat, a.splat_order), _entries(t.splat, t.splat_order)),
                 (_entries(a.slice_t, a.slice_t_order), _entries(t.slice_t, t.slice_t_order))):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    if kw.get("corners"):
        assert torch.equal(a.corners, t.corners) and torch.equal(a.positions, t.positions)
    return a, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("same,b", [(True, 1), (True, 3), (False, 1), (False, 2)])
def test_compiled_builder_builds_the_tensor_paths_lattice(same, b, dtype):
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(b, 700, 4, generator=gen, dtype=dtype) * 3
    k = q if same else torch.randn(b, 500, 4, generator=gen, dtype=dtype) * 3 + 1
    a, _ = _assert_same_lattice(q, k, same, corners=True)
    v = torch.randn(b * k.shape[1], 2, generator=gen, dtype=dtype)
    assert a.filter(v).shape == (b * q.shape[1], 2)


def test_grid_features_with_rank_ties():
    """Positions on a pixel grid (exact ties between coordinates), the dense CRF's smoothness
    features, and a volume's (z, y, x) grid: the tie rules must agree."""
    yy, xx = torch.meshgrid(torch.arange(60.0), torch.arange(70.0), indexing="ij")
    _assert_same_lattice(*(2 * [torch.stack([xx / 3, yy / 3], -1).reshape(1, -1, 2)]), True)
    z, y, x = torch.meshgrid(torch.arange(8.0), torch.arange(20.0), torch.arange(20.0), indexing="ij")
    grid = torch.stack([z / 2, y / 2, x / 2], -1).reshape(1, -1, 3)
    _assert_same_lattice(grid, grid, True)


def test_far_points_are_elevated_in_float64_by_both():
    q = torch.rand(1, 300, 3) * 10 + 5000.0  # lattice coordinates beyond 2^12: float64 elevation
    _assert_same_lattice(q, q, True)


def test_large_input_grows_the_hash_table_and_splits_into_parts():
    """Enough points for several parts (two threads) and for the tables to grow many times."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(12)
        q = torch.rand(1, 70_000, 3, generator=gen) * 40
        _assert_same_lattice(q, q, True)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("jit", [True, False], ids=["compiled", "tensor"])
@pytest.mark.parametrize("same", [True, False])
def test_vertices_are_numbered_in_order_of_first_touch(same, jit):
    """Scanning the points in build order (queries, then keys), each point's corners 0..d, the vertex
    ids first seen are 1, 2, ..., V (matrix indices): no vertex is numbered before one touched earlier."""
    gen = torch.Generator().manual_seed(14)
    q = torch.rand(2, 900, 3, generator=gen) * 9
    k = q if same else torch.rand(2, 600, 3, generator=gen) * 9
    lat = _build(q, k, same, jit, corners=True)
    seen = lat.corners.reshape(-1)
    uniq, inverse = torch.unique(seen, return_inverse=True)
    at = torch.arange(seen.shape[0])
    first = torch.full((uniq.shape[0],), seen.shape[0]).scatter_reduce_(0, inverse, at, "amin")
    assert torch.equal(seen[first.sort().values], torch.arange(1, lat.num_vertices + 1))


def test_vertex_numbering_does_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(13)
    q = torch.rand(1, 40_000, 3, generator=gen) * 25
    old = torch.get_num_threads()
    lattices = []
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            lattices.append(_build(q, q, True, True))
    finally:
        torch.set_num_threads(old)
    a, b = lattices
    for x, y in zip([a.splat, a.slice, *a.blurs], [b.splat, b.slice, *b.blurs], strict=True):
        _same_csr(x, y)


def test_code_space_errors_match():
    q = torch.zeros(1, 20, 5, dtype=torch.float64)
    q[0, 10:] = 1e10
    msgs = []
    for jit in (True, False):
        with pytest.raises(ValueError, match="too wide a range") as e:
            _build(q, q, True, jit)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1]


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 7), n=st.integers(1, 60), m=st.integers(1, 60), b=st.integers(1, 3),
       same=st.booleans(), spread=st.sampled_from([0.3, 2.0, 9.0]), seed=st.integers(0, 2**16),
       double=st.booleans())
def test_property_compiled_equals_tensor_path(d, n, m, b, same, spread, seed, double):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    q = torch.randn(b, n, d, generator=gen, dtype=dtype) * spread
    k = q if same else torch.randn(b, m, d, generator=gen, dtype=dtype) * spread
    _assert_same_lattice(q, k, same, corners=True)


def test_unrolled_kernels_file_is_the_generators_output():
    from nlgraph.backends.permutohedral import _jit_gen

    assert _jit_gen.TARGET.read_text() == _jit_gen.source(), \
        "run python -m nlgraph.backends.permutohedral._jit_gen"


def _elevated(d, dtype, count, seed, spread=4.0, far=1e4):
    """Points (random with standard deviation ``spread``, on a grid: rank ties everywhere, far from
    the origin) and the elevation's constants (scales, whole numbers, 1 / (d + 1))."""
    import numpy as np


    rng = np.random.default_rng(seed)
    k = count // 9
    pts = np.concatenate([rng.normal(size=(count - 2 * k, d)) * spread, np.round(rng.normal(size=(k, d)) * 3),
                          rng.normal(size=(k, d)) + far]).astype(dtype)
    d1 = d + 1
    ints = np.arange(d1 + 1, dtype=dtype)
    inv = pts.dtype.type(1.0 / d1)
    sc = np.asarray(L._scales(d), dtype=dtype)
    return pts, (sc, ints, inv)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("d", range(1, 9))
def test_unrolled_elevation_equals_the_generic_kernel(d, dtype):
    """Each d's unrolled elevation gives the generic kernel's remainder-0 points, ranks, weights and
    range bit for bit, on a part that starts inside the array."""
    import numpy as np

    from nlgraph.backends.permutohedral import _jit
    from nlgraph.backends.permutohedral._jit_unrolled import ELEVATE

    pts, consts = _elevated(d, dtype, 450, d)
    d1 = d + 1
    results = []
    for kernel in (_jit._elevate, ELEVATE[d]):
        out = (np.zeros((450, d), np.int64), np.zeros((450, d1), np.uint8), np.zeros((450, d1), pts.dtype),
               np.full(d, 7, np.int64), np.full(d, 7, np.int64))
        kernel(pts, *consts, 20, 450, *out)
        results.append(out)
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("same", [True, False])
@pytest.mark.parametrize("d", range(1, 9))
def test_unrolled_vertex_pass_equals_the_generic_kernel(d, same):
    """Each d's unrolled vertex pass (the hash-table insertion) gives the generic one's distinct codes
    in the same order and the same corner ids: over two batches of queries and (unless ``same``) keys,
    with enough vertices that the table grows (restarting the pass mid-point) and runs of points in
    one simplex (the grid rows)."""
    import numpy as np

    from nlgraph.backends.permutohedral import _jit
    from nlgraph.backends.permutohedral._jit_unrolled import VERTICES

    count = 5400
    pts, consts = _elevated(d, "float32", count, 10 + d, spread=3000.0 / d ** 3 if d <= 5 else 1.0, far=5.0)
    pts[count // 2: count // 2 + 200] = pts[count // 2]  # a run of points in one simplex
    d1 = d + 1
    rem0, rank = np.empty((count, d), np.int64), np.empty((count, d1), np.uint8)
    bary, lo, hi = np.empty((count, d1), np.float32), np.empty(d, np.int64), np.empty(d, np.int64)
    _jit._elevate(pts, *consts, 0, count, rem0, rank, bary, lo, hi)
    n, m = (count // 2, count // 2) if same else (count // 4, count // 4)
    nq = count if same else count // 2
    strides, offset = L._code_layout(lo.tolist(), hi.tolist(), 2)
    st = np.asarray(strides, dtype=np.int64)
    got = []
    for kernel in (_jit._vertices, VERTICES[d]):
        cv = np.full((count, d1), -5, np.int32)
        codes = kernel(rem0, rank, st, np.int64(offset), nq, n, m, same, 30, count, cv)
        got.append((codes, cv))
    assert got[0][0].shape[0] > 2048  # the table doubled at least once
    assert np.array_equal(got[0][0], got[1][0]) and np.array_equal(got[0][1], got[1][1])


def test_builds_leave_numpys_huge_page_setting_as_they_found_it():
    """Builds allocate on ordinary pages (numpy's madvise switch off while any build runs); the
    caller's setting comes back when the last of several concurrent builds ends, whichever it was."""
    import threading

    from nlgraph.backends.permutohedral import _jit

    switch = _jit._madvise_switch()
    if switch is None:
        pytest.skip("this numpy has no huge-page switch")
    gen = torch.Generator().manual_seed(15)
    q = torch.rand(1, 20_000, 3, generator=gen) * 20
    original = switch(True)
    try:
        for setting in (True, False):
            switch(setting)
            seen = []
            real = _jit._build

            def spy(*args):
                seen.append(switch(False))  # (reads the setting; leaves it off, as it was)
                return real(*args)

            _jit._build = spy
            try:
                threads = [threading.Thread(target=_build, args=(q, q, True, True)) for _ in range(3)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            finally:
                _jit._build = real
            assert seen == [False] * 3  # off inside every build
            assert switch(setting) == setting  # restored after the last one
    finally:
        switch(original)


def test_points_beyond_int32_lattice_coordinates_build_the_same_lattice():
    """Remainder-0 points are kept in int32 only while the coordinates' bound fits: these (lattice
    coordinates ~1e9, resolved in float64) take the int64 arrays, and both builders still agree."""
    gen = torch.Generator().manual_seed(15)
    q = (torch.rand(1, 400, 2, generator=gen, dtype=torch.float64) * 6 + 4e8)
    assert L._elevation_bound(q) > 2.0 ** 31
    _assert_same_lattice(q, q, True)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("count", [1, 2, 7, 9])
def test_parts_run_once_each_in_order_of_their_index(threads, count):
    import threading

    from nlgraph.backends.permutohedral import _jit

    bounds = [10 * i for i in range(count + 1)]
    seen, lock = [], threading.Lock()

    def part(t, s, e):
        with lock:
            seen.append((t, s, e))
        return -t

    assert _jit._run(part, bounds, threads) == [-t for t in range(count)]
    assert sorted(seen) == [(t, 10 * t, 10 * t + 10) for t in range(count)]


def test_the_call_does_not_wait_for_a_pool_thread_that_has_not_started():
    """With every pool thread busy elsewhere, the caller runs all the parts itself and returns (the
    helper it asked for finds nothing left when it comes, and takes no part)."""
    import threading

    from nlgraph.backends.permutohedral import _jit

    pool = _jit._pool(1)
    release = threading.Event()
    busy = [pool.submit(release.wait, 30) for _ in range(pool._max_workers)]
    seen, result = [], []
    try:
        def call():
            result.append(_jit._run(lambda t, s, e: seen.append(threading.get_ident()) or t,
                                    list(range(0, 80, 10)), 2))

        caller = threading.Thread(target=call)
        caller.start()
        caller.join(20)
        assert not caller.is_alive(), "_run waited for a pool thread that had not started"
        assert result == [list(range(7))]
        assert set(seen) == {caller.ident}
    finally:
        release.set()
        for f in busy:
            f.result()


def test_a_failing_part_stops_the_rest_and_raises_after_the_running_ones():
    import threading
    import time

    from nlgraph.backends.permutohedral import _jit

    done, lock = [], threading.Lock()

    def part(t, s, e):
        if t == 1:
            raise RuntimeError("part 1 failed")
        time.sleep(0.01)
        with lock:
            done.append(t)

    for threads in (1, 2, 4):
        done.clear()
        with pytest.raises(RuntimeError, match="part 1 failed"):
            _jit._run(part, list(range(0, 2001, 100)), threads)
        finished = list(done)
        time.sleep(0.05)
        assert done == finished  # nothing still running once the error is raised
        assert len(done) < 19  # the parts not yet started when it failed never ran


def test_vertex_major_offsets_are_the_running_sums():
    """crow / nxt of the parts' counting sort against the cumulative sums written out in numpy."""
    import numpy as np

    from nlgraph.backends.permutohedral import _jit

    rng = np.random.default_rng(3)
    for parts, v in ((1, 1), (3, 50), (8, 333)):
        counts = rng.integers(0, 5, (parts, v + 3)).astype(np.int32)
        counts[:, :2] = 0
        crow, nxt = _jit._offsets(counts)
        want = np.cumsum(counts.sum(0, dtype=np.int64))
        np.testing.assert_array_equal(crow, want)
        np.testing.assert_array_equal(nxt, want[None, :-1] + np.cumsum(counts[:, 1:], 0) - counts[:, 1:])


def _lattice_tensors(lat):
    """Every tensor of a lattice's matrices (values and indices), for memory and value checks."""
    out = []
    for m in [lat.splat, lat.splat_t, lat.slice, lat.slice_t, *lat.blurs]:
        if m is not None:
            out += [m.crow_indices(), m.col_indices(), m.values()]
    return out


def _storages(tensors):
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def test_recycled_buffers_serve_the_next_build_and_never_a_live_lattice():
    """A dropped lattice's memory serves the next build (no fresh buffer where an idle one fits), a
    live lattice's never: building again while one is held leaves its every entry unchanged and
    shares no memory with it; both builds equal a build on fresh memory."""
    import gc

    from nlgraph.backends.permutohedral import _jit, release_buffers

    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 3000, 3, generator=g) * 2
    release_buffers()
    fresh = _build(q, q, True, jit=True)
    want = [t.clone() for t in _lattice_tensors(fresh)]
    held = _storages(_lattice_tensors(fresh))
    again = _build(q, q, True, jit=True)  # `fresh` is alive: no buffer of it may be reused
    assert not held & _storages(_lattice_tensors(again))
    assert all(torch.equal(a, b) for a, b in zip(_lattice_tensors(fresh), want, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(_lattice_tensors(again), want, strict=True))
    del fresh
    gc.collect()
    owned = len(_jit.BUFFERS._owned)
    assert _jit.BUFFERS.idle_bytes() > 0
    third = _build(q, q, True, jit=True)  # on the dropped lattice's buffers
    assert len(_jit.BUFFERS._owned) == owned  # nothing new allocated
    assert held & _storages(_lattice_tensors(third))
    assert all(torch.equal(a, b) for a, b in zip(_lattice_tensors(third), want, strict=True))
    del again, third
    release_buffers()
    assert _jit.BUFFERS.idle_bytes() == 0


def test_recycled_buffers_are_zeroed_on_request_and_trimmed_to_the_limit(monkeypatch):
    from nlgraph.backends.permutohedral import _jit

    pool = _jit._Buffers()
    a = pool.empty((100, 7), "int32")
    a.fill(9)
    ptr = a.ctypes.data
    del a
    b = pool.empty((100, 7), "int32", zero=True)  # the same buffer, zeroed
    assert b.ctypes.data == ptr and not b.any() and b.shape == (100, 7) and b.dtype == "int32"
    v = b[3:]  # a view keeps the buffer in use after b goes
    del b
    c = pool.empty(700, "int32")
    assert c.ctypes.data != ptr
    del v, c
    assert pool.idle_bytes() == 2 * 2800
    assert pool.empty(0, "float32").shape == (0,)
    monkeypatch.setattr(_jit, "POOL_BYTES", 0)
    d = pool.empty(10_000, "uint8")  # a new buffer: the idle ones beyond the limit (0) are freed
    assert pool.idle_bytes() == 0 and len(pool._owned) == 1
    del d
    pool.release()
    assert pool._owned == []


def test_recycled_buffers_under_concurrent_builds_and_drops():
    """Four threads build lattices of three sizes at once, keep some and drop others: every lattice
    equals its reference (built before, cloned) entry for entry when it is made and again at the end,
    and no two lattices alive at the end share memory."""
    import random
    import threading

    from nlgraph.backends.permutohedral import release_buffers

    g = torch.Generator().manual_seed(11)
    points = [torch.randn(1, n, 3, generator=g) * 2 for n in (20_000, 40_000, 33_000)]
    want = [[t.clone() for t in _lattice_tensors(_build(p, p, True, jit=True))] for p in points]
    kept, errors, lock = [], [], threading.Lock()

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(6):
                i = rng.randrange(len(points))
                lat = _build(points[i], points[i], True, jit=True)
                if not all(torch.equal(a, b) for a, b in zip(_lattice_tensors(lat), want[i], strict=True)):
                    errors.append(f"lattice {i} differs when built")
                if rng.random() < 0.5:
                    with lock:
                        kept.append((i, lat))
                del lat
        except Exception as e:  # (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    seen = set()
    for i, lat in kept:
        assert all(torch.equal(a, b) for a, b in zip(_lattice_tensors(lat), want[i], strict=True))
        mine = _storages(_lattice_tensors(lat))
        assert not mine & seen
        seen |= mine
    kept.clear()
    release_buffers()
