"""``chunked``'s fixed-shift softmax (``chunked.fixed_shift_bound`` / ``keeps_shift``): a query tile keeps
its first key tile's row maxima as the shift for all its key tiles when no later score can exceed them by
more than the allowed gap, instead of rescaling its accumulators tile by tile.

Proved against the materialised float64 formula (tests/formulas.py) and the online softmax (a negative
``FIXED_SHIFT_GAP`` turns the fixed shift off): forward, log-sum-exp and every gradient. The bound is
checked against every materialised score of the lowered form (hypothesis, with row and column terms and
a flat top). Inputs whose later key tiles score far above the first (beyond the gap), or whose values are
so large that the weights' headroom would overflow the message, are shown to take the online path and
to stay exact.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nlgraph
from nlgraph import affinity as A
from nlgraph.backends import chunked
from nlgraph.backends.common import lower

from .formulas import TOLERANCES, aggregate_formula

F64 = torch.float64
BLOCKS = {"block_n": 32, "block_m": 48}  # several query and key tiles, ragged last ones


@pytest.fixture
def kept(monkeypatch):
    """Each query tile's decision, in order: True where it kept the fixed shift."""
    seen: list[bool] = []
    real = chunked.keeps_shift

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(chunked, "keeps_shift", spy)
    return seen


def _inputs(lead, n, m, d, e, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(dtype)  # noqa: E731
    return mk(*lead, n, d) * scale, mk(*lead, m, d), mk(*lead, m, e)


CASES = [
    ("softmax", A.Softmax(), {}),
    ("softmax", A.Softmax(scale=0.7), {"scale": 0.7}),
    ("gaussian", A.Gaussian(1.5), {"bandwidth": 1.5}),
    ("gaussian", A.Gaussian(2.0, offset=0.5), {"bandwidth": 2.0, "offset": 0.5}),
]


@pytest.mark.parametrize("kind,aff,params", CASES)
def test_fixed_shift_matches_formula_and_gradients_float64(kind, aff, params, kept):
    q, k, v = (t.requires_grad_() for t in _inputs((2,), 70, 130, 5, 3, F64))
    y, lse = nlgraph.aggregate(q, k, v, aff, backend="chunked", options=BLOCKS, return_lse=True)
    ref = aggregate_formula(kind, q, k, v, params)
    rtol, atol = TOLERANCES[F64]
    torch.testing.assert_close(y, ref, rtol=rtol, atol=atol)
    # lse = log sum_j f_ij, from the materialised affinities
    from .formulas import affinity_matrix

    f, _ = affinity_matrix(kind, q, k, params)
    torch.testing.assert_close(lse, f.sum(-1).log(), rtol=rtol, atol=atol)
    assert kept and all(kept)  # every query tile kept its shift
    dy, dl = torch.randn_like(y), torch.randn_like(lse)
    got = torch.autograd.grad((y * dy).sum() + (lse * dl).sum(), (q, k, v))
    want = torch.autograd.grad((ref * dy).sum() + (f.sum(-1).log() * dl).sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("heads", [1, 3])
def test_fixed_shift_float32_within_its_rounding_bound(heads, kept):
    """float32 (the compiled exp kernel's dtype) against the float64 formula, within the arithmetic's
    bound: a logit errs by <= (d + 2) u S (S = max_ij sum_l |s q_il k_jl|: the product and the shift),
    the normalisation by <= (M + 2) u relative, so each output by <= 2 [(d + 2) S + M + 2] u max |v|."""
    n, m, d, e = 96, 200, 16, 8
    q, k, v = _inputs((heads,), n, m, d, e, torch.float32, seed=3)
    y = nlgraph.aggregate(q, k, v, backend="chunked", options=BLOCKS)
    qd, kd, vd = q.double(), k.double(), v.double()
    ref = aggregate_formula("softmax", qd, kd, vd, {})
    u = 2.0**-24
    s_abs = float((qd.abs() @ kd.abs().transpose(-1, -2)).max()) / math.sqrt(d)
    bound = 2 * ((d + 2) * s_abs + m + 2) * u * float(vd.abs().max())
    assert float((y.double() - ref).abs().max()) <= bound
    assert kept and all(kept)


def test_fixed_shift_equals_online_softmax(monkeypatch):
    """The same call with the fixed shift off (the online softmax) agrees to float64 rounding."""
    q, k, v = (t.requires_grad_() for t in _inputs((2, 2), 50, 170, 4, 6, F64, seed=1, scale=2.0))
    outs = []
    for gap in (chunked.FIXED_SHIFT_GAP, -1.0):
        monkeypatch.setattr(chunked, "FIXED_SHIFT_GAP", gap)
        y, lse = nlgraph.aggregate(q, k, v, backend="chunked", options=BLOCKS, return_lse=True)
        outs.append((y, lse, *torch.autograd.grad(y.sum() + lse.sum(), (q, k, v))))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def _far_keys(dtype, jump):
    """One query tile whose first key tile scores ~0 and a later key that scores ``jump`` above it."""
    n, m, d = 8, 120, 4
    q = torch.zeros(n, d, dtype=dtype)
    q[:, 0] = 1.0
    k = torch.zeros(m, d, dtype=dtype)
    k[:, 1] = torch.linspace(-1, 1, m, dtype=dtype)  # orthogonal to the queries: scores 0
    k[100, 0] = jump * math.sqrt(d)  # softmax's scale 1/sqrt(d): score = jump
    v = torch.randn(m, 3, generator=torch.Generator().manual_seed(0), dtype=F64).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_later_scores_beyond_the_gap_take_the_online_path(dtype, kept):
    q, k, v = _far_keys(dtype, 200.0)  # exp(200) overflows float32: a kept shift would be wrong
    y, lse = nlgraph.aggregate(q, k, v, backend="chunked", options=BLOCKS, return_lse=True)
    assert kept == [False]
    ref = aggregate_formula("softmax", q.double(), k.double(), v.double(), {})
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)
    assert torch.isfinite(lse).all() and float((lse - 200.0).abs().max()) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_later_scores_within_the_gap_keep_the_shift(dtype, kept):
    """Later scores 40 above the first tile's maxima: weights up to e^40, kept, still exact."""
    q, k, v = _far_keys(dtype, 40.0)
    y, lse = nlgraph.aggregate(q, k, v, backend="chunked", options=BLOCKS, return_lse=True)
    assert kept == [True]
    qd, kd, vd = q.double(), k.double(), v.double()
    ref = aggregate_formula("softmax", qd, kd, vd, {})
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)
    want = torch.logsumexp(qd @ kd.T / 2.0, -1)
    torch.testing.assert_close(lse.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("size,kept_any", [(1e33, True), (1e36, False)])
def test_huge_values_shrink_the_gap(size, kept_any, kept):
    """|v| ~ 1e33 in float32 leaves a gap of ln(3.4e38 / 4) - ln(M max|v|) ~ 6 (enough here); at ~1e36
    M e^T |v| would overflow for every T >= 0, so the online softmax runs. Exact either way."""
    q, k, v = _inputs((), 40, 100, 4, 2, torch.float32, seed=2)
    v = v * size
    y = nlgraph.aggregate(q, k, v, backend="chunked", options=BLOCKS)
    assert kept and any(kept) == kept_any and (all(kept) or not kept_any)
    ref = aggregate_formula("softmax", q.double(), k.double(), v.double(), {})
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double() / size, ref / size, rtol=2e-4, atol=2e-5)


def test_one_key_tile_and_restricted_graphs_have_no_fixed_shift():
    q, k, v = _inputs((), 20, 30, 4, 2, torch.float32)
    assert chunked.fixed_shift_bound(lower(q, k, v, A.Softmax(), None), 48) is None  # one key tile
    assert chunked.fixed_shift_bound(lower(q, k, v, A.DotProduct(), None), 8) is None  # linear kernel
    assert chunked.fixed_shift_bound(lower(q, k, v, A.Gaussian(1.0, normalize=False), None), 8) is None


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), m=st.integers(2, 20), d=st.integers(1, 6), kind=st.sampled_from(range(4)),
       qscale=st.floats(0.01, 30.0), seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, F64]))
def test_property_bound_bounds_every_score(n, m, d, kind, qscale, seed, dtype):
    """B_i >= max_j s_ij for the lowered form's materialised scores (bilinear, row and column terms,
    flat top), computed in float64 from the form's own tensors."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(2, n, d, generator=g, dtype=F64) * qscale).to(dtype)
    k = (torch.randn(2, m, d, generator=g, dtype=F64) + torch.rand(1, generator=g, dtype=F64) * 5).to(dtype)
    v = torch.randn(2, m, 2, generator=g, dtype=F64).to(dtype)
    aff = [A.Softmax(), A.Softmax(scale=3.0), A.Gaussian(0.8), A.Gaussian(1.3, offset=0.7)][kind]
    p = lower(q, k, v, aff, None)
    got = chunked.fixed_shift_bound(p, 1)
    assert got is not None
    bound, gap = got
    f = p.form
    s = f.query.double() @ f.key.double().transpose(-1, -2)
    if f.row is not None:
        s = s + f.row.double()[..., None]
    if f.col is not None:
        s = s + f.col.double()[..., None, :]
    if f.clamp is not None:
        s = (s + f.clamp).clamp_max(0.0)
    assert (s.amax(-1) <= bound).all()
    assert gap <= chunked.FIXED_SHIFT_GAP


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), m=st.integers(2, 60), d=st.integers(1, 6), e=st.integers(1, 4),
       bn=st.integers(1, 16), bm=st.integers(1, 16), kind=st.sampled_from(range(4)),
       qscale=st.floats(0.1, 8.0), bcast=st.booleans(), seed=st.integers(0, 2**16))
def test_property_fixed_shift_matches_formula(n, m, d, e, bn, bm, kind, qscale, bcast, seed):
    """Shapes, ragged tiles, broadcast batch dims (queries shared by three key/value heads) and the
    affinities with a fixed-shift form, float64, forward and log-sum-exp against the formula."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1 if bcast else 3, n, d, generator=g, dtype=F64) * qscale
    k = torch.randn(3, m, d, generator=g, dtype=F64)
    v = torch.randn(3, m, e, generator=g, dtype=F64)
    name, aff, params = CASES[kind]
    y, lse = nlgraph.aggregate(q, k, v, aff, backend="chunked", options={"block_n": bn, "block_m": bm},
                               return_lse=True)
    ref = aggregate_formula(name, q, k, v, params)
    from .formulas import affinity_matrix

    f, _ = affinity_matrix(name, q, k, params)
    rtol, atol = TOLERANCES[F64]
    torch.testing.assert_close(y, ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(lse, f.sum(-1).log(), rtol=rtol, atol=1e-9)


def test_fixed_shift_under_inference_mode_and_threads(kept):
    """Inference tensors (the tiles update in place) and four Python threads at once: each result equals
    the same call's on the main thread."""
    import threading

    q, k, v = _inputs((2,), 70, 130, 5, 3, torch.float32, seed=7)
    want = nlgraph.aggregate(q, k, v, backend="chunked", options=BLOCKS)
    with torch.inference_mode():
        got = nlgraph.aggregate(q, k, v, backend="chunked", options=BLOCKS)
    assert got.is_inference()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    results: list = [None] * 4

    def work(i):
        results[i] = nlgraph.aggregate(q, k, v, backend="chunked", options=BLOCKS)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        torch.testing.assert_close(r, want, rtol=0, atol=0)
    assert kept and all(kept)
