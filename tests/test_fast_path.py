"""The dispatch's shortcut for plain softmax attention (``dispatch.fast_softmax`` -> ``sdpa.fast_run``)
and the one-pass value scan it shares with the general path (``_values.norm_bounds``, ``known_norms``).

The shortcut may only answer where the general path would make exactly the same SDPA call: its results
are compared bit for bit with ``aggregate(..., backend="sdpa")`` (forward and every gradient), with the
materialised float64 formula (tests/formulas.py tolerances), and every input it must not take (bad
values, other graphs, dropout, traced code, a disabled fused kernel, ...) is shown to reach the general
path, whose errors are the only ones users see.
"""

from __future__ import annotations

import contextvars
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import nlgraph
from nlgraph import _values, dispatch
from nlgraph import affinity as A
from nlgraph import graph as G

from .formulas import TOLERANCES, aggregate_formula

F64 = torch.float64


@pytest.fixture
def taken(monkeypatch):
    """A list that records each call's outcome of the shortcut: True (it answered) or False."""
    seen: list[bool] = []
    real = dispatch.fast_softmax

    def spy(*args, **kw):
        y = real(*args, **kw)
        seen.append(y is not None)
        return y

    monkeypatch.setattr(nlgraph.core, "fast_softmax", spy)
    return seen


def _qkv(shape_q, m, e=None, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    *lead, n, d = shape_q
    e = d if e is None else e
    mk = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(dtype).requires_grad_(grad)  # noqa: E731
    return mk(*lead, n, d), mk(*lead, m, d), mk(*lead, m, e)


def _grads(y, inputs, seed=5):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=F64).to(y.dtype)
    return torch.autograd.grad(y, inputs, dy)


CASES = [
    dict(shape=(2, 3, 17, 8), m=13),
    dict(shape=(3, 17, 8), m=13),  # 3-D (B, N, d), as the non-local blocks pass
    dict(shape=(1, 2, 16, 8), m=16, causal=True),
    dict(shape=(1, 2, 9, 8), m=20, causal=True),  # N < M, top-left aligned
    dict(shape=(2, 2, 11, 4), m=7, scale=0.7),
    dict(shape=(2, 2, 11, 4), m=7, affinity_scale=1.0),  # Softmax(scale=1): the original non-local block
    dict(shape=(2, 2, 11, 4), m=7, affinity_scale=2.0, scale=-0.3),  # aggregate's scale wins, as SDPA's
]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c))
def test_shortcut_is_the_general_sdpa_call(case, dtype, taken):
    """Bit for bit the result (and gradients) of the general path forced onto sdpa, and the formula."""
    q, k, v = _qkv(case["shape"], case["m"], dtype=dtype, grad=True)
    causal = case.get("causal", False)
    aff = A.Softmax(scale=case["affinity_scale"]) if "affinity_scale" in case else None
    kw = dict(is_causal=causal, scale=case.get("scale"))
    y = nlgraph.aggregate(q, k, v, aff, **kw)
    assert taken == [True]
    ref = nlgraph.aggregate(q, k, v, aff, backend="sdpa", **kw)  # forced: the registry's path
    assert taken == [True]  # a forced backend never takes the shortcut (no second entry recorded)
    assert torch.equal(y, ref)
    for a, b in zip(_grads(y, (q, k, v)), _grads(ref, (q, k, v)), strict=True):
        assert torch.equal(a, b)
    # and the op itself, materialised in float64
    s = case.get("scale", case.get("affinity_scale"))
    s = 1.0 / math.sqrt(q.shape[-1]) if s is None else s
    n, m = q.shape[-2], k.shape[-2]
    adj = torch.ones(n, m, dtype=F64).tril() if causal else None
    want = aggregate_formula("softmax", q.double(), k.double(), v.double(), {"scale": s}, adj=adj)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), want, rtol=rtol, atol=atol)


def test_shortcut_handles_self_attention_views_and_parameters(taken):
    x = torch.nn.Parameter(torch.randn(2, 4, 12, 8, dtype=F64))
    y = nlgraph.aggregate(x, x, x)  # q is k is v: one tensor scanned once
    t = torch.randn(2, 8, 12, dtype=F64).transpose(1, 2)  # (B, N, d) with stride(-1) != 1: copied for SDPA
    y2 = nlgraph.aggregate(t, t, t, A.Softmax(scale=1.0))
    assert taken == [True, True]
    torch.testing.assert_close(y, F.scaled_dot_product_attention(x, x, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y2, F.scaled_dot_product_attention(t, t, t, scale=1.0), rtol=1e-12, atol=1e-12)
    (gx,) = torch.autograd.grad(y.sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(F.scaled_dot_product_attention(x2, x2, x2).sum(), x2)
    torch.testing.assert_close(gx, gr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("what", ["graph", "dropout", "lse", "gqa", "tensor_scale", "backend", "options",
                                  "broadcast", "widths", "dtypes", "dims", "gaussian", "empty", "flash_off"])
def test_shortcut_declines_and_the_general_path_answers(what, taken):
    q, k, v = _qkv((2, 2, 9, 4), 6, dtype=F64)
    call = dict(query=q, key=k, value=v)
    ctx = None
    if what == "graph":
        call["graph"] = G.Mask(torch.rand(9, 6) > 0.3)
    elif what == "dropout":
        call["dropout_p"] = 0.2
    elif what == "lse":
        call["return_lse"] = True
    elif what == "gqa":
        call.update(query=torch.randn(2, 4, 9, 4, dtype=F64), enable_gqa=True)
    elif what == "tensor_scale":
        call["affinity"] = A.Softmax(scale=torch.tensor(0.5, dtype=F64))
    elif what == "backend":
        call["backend"] = "chunked"
    elif what == "options":
        call.update(backend="chunked", options={"block_n": 4})
    elif what == "broadcast":
        call["key"], call["value"] = k[:1], v[:1]
    elif what == "widths":
        call["value"] = torch.randn(2, 2, 6, 3, dtype=F64)
    elif what == "dtypes":
        call.update(query=q.float(), key=k.float(), value=v.float())
        call["value"] = call["value"].double()
    elif what == "dims":
        call.update(query=q[0, 0], key=k[0, 0], value=v[0, 0])
    elif what == "gaussian":
        call["affinity"] = A.Gaussian(1.5)
    elif what == "empty":
        call.update(key=k[..., :0, :], value=v[..., :0, :])
    elif what == "flash_off":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel([SDPBackend.MATH])
    if what == "dtypes":
        with pytest.raises(TypeError, match="share a dtype"):
            nlgraph.aggregate(**call)
        assert taken in ([], [False])
        return
    if ctx is not None:
        with ctx:
            y = nlgraph.aggregate(**call)
    else:
        y = nlgraph.aggregate(**call)
    assert not any(taken)
    if what in ("dropout", "lse", "options"):
        return  # nothing further to compare here: these paths have their own tests
    qq, kk, vv = call["query"], call["key"], call["value"]
    if what == "gqa":
        kk, vv = kk.repeat_interleave(2, -3), vv.repeat_interleave(2, -3)
    mask = call.get("graph")
    if what == "gaussian":
        want = aggregate_formula("gaussian", qq, kk, vv, {"bandwidth": 1.5})
    elif what == "tensor_scale":
        want = aggregate_formula("softmax", qq, kk, vv, {"scale": 0.5})
    else:
        adj = None if mask is None else mask.mask.to(F64)
        want = aggregate_formula("softmax", qq, kk, vv, {"scale": 0.5}, adj=adj)
    torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("where", ["query", "key", "value"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_bad_values_get_the_general_paths_error(where, bad, taken):
    q, k, v = _qkv((1, 2, 8, 4), 8)
    t = {"query": q, "key": k, "value": v}[where]
    t[0, 1, 3, 2] = bad
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        nlgraph.aggregate(q, k, v)
    assert taken == [False]


def test_overflowing_scores_get_the_general_paths_error(taken):
    q, k, v = _qkv((1, 1, 8, 4), 8)
    q = q * 1e19  # |q . k| / sqrt(d) reaches ~1e38: the scores would overflow float32
    k = k * 1e19
    with pytest.raises(ValueError, match="scores of these query/key values"):
        nlgraph.aggregate(q, k, v)
    assert taken == [False]
    # large but safe values take the shortcut
    y = nlgraph.aggregate(q * 1e-10, k * 1e-10, v)
    assert taken[-1] is True
    assert torch.isfinite(y).all()


def test_shortcut_steps_aside_when_traced_and_vmapped(taken):
    q, k, v = _qkv((2, 1, 8, 4), 8)
    compiled = torch.compile(lambda a, b, c: nlgraph.aggregate(a, b, c), fullgraph=True, backend="eager")
    want = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(compiled(q, k, v), want, rtol=2e-6, atol=2e-6)
    assert taken == [False]
    y = torch.func.vmap(lambda a, b, c: nlgraph.aggregate(a, b, c))(q, k, v)
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v), rtol=2e-6, atol=2e-6)
    assert taken == [False, False]


def test_shortcut_off_when_a_backend_is_registered_ahead(taken, monkeypatch):
    order = dict(dispatch._REGISTRY)
    monkeypatch.setattr(dispatch, "_REGISTRY", {"chunked": order["chunked"], **order})
    q, k, v = _qkv((1, 1, 8, 4), 8)
    nlgraph.aggregate(q, k, v)
    assert taken == [False]


@settings(max_examples=60, deadline=None)
@given(nd=st.sampled_from([3, 4]), b=st.integers(1, 3), h=st.integers(1, 3), n=st.integers(1, 20),
       m=st.integers(1, 20), d=st.integers(1, 12), causal=st.booleans(),
       scale=st.one_of(st.none(), st.floats(-2.0, 2.0, allow_nan=False)), self_attn=st.booleans(),
       dtype=st.sampled_from([torch.float32, F64]), seed=st.integers(0, 2**16))
def test_property_shortcut_matches_general_path_and_formula(nd, b, h, n, m, d, causal, scale, self_attn,
                                                            dtype, seed):
    shape = (b, h, n, d) if nd == 4 else (b, n, d)
    q, k, v = _qkv(shape, m, dtype=dtype, seed=seed)
    if self_attn:
        k = v = q
        m = n
    y = nlgraph.aggregate(q, k, v, is_causal=causal, scale=scale)
    ref = nlgraph.aggregate(q, k, v, is_causal=causal, scale=scale, backend="sdpa")
    assert torch.equal(y, ref)
    s = 1.0 / math.sqrt(d) if scale is None else scale
    adj = torch.ones(n, m, dtype=F64).tril() if causal else None
    want = aggregate_formula("softmax", q.double(), k.double(), v.double(), {"scale": s}, adj=adj)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), want, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------
# the value scan


@settings(max_examples=80, deadline=None)
@given(shape=st.lists(st.integers(0, 9), min_size=1, max_size=4), log_mag=st.floats(-30, 30),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, F64]), transpose=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_norm_bounds_bound_the_norm(shape, log_mag, dtype, transpose, seed):
    """Each bound >= the exact Frobenius norm (computed in float64 from the same entries), and finite."""
    g = torch.Generator().manual_seed(seed)
    if dtype in (torch.float16, torch.bfloat16):
        log_mag = max(min(log_mag, 3.0), -3.0)  # keep the half types' values finite
    elif dtype == torch.float32:
        # keep the sum of squares (<= 6561 entries of |x| <= ~6e15) inside float32; beyond it the bound is
        # inf by design (tested below)
        log_mag = min(log_mag, 15.0)
    t = (torch.randn(*shape, generator=g, dtype=F64) * 10.0**log_mag).to(dtype)
    if transpose and t.dim() >= 2:
        t = t.transpose(0, -1)  # strided: the vector_norm branch
    (bound,) = _values.norm_bounds([t])
    exact = math.sqrt(float((t.double() ** 2).sum())) if t.numel() else 0.0
    assert math.isfinite(bound)
    assert bound >= exact
    eta = 2.0**-1075 if dtype == F64 else 2.0**-150
    assert bound <= exact * (1 + 1e-3) + 2 * math.sqrt(t.numel() * eta)  # and not loose


def test_norm_bounds_flag_non_finite_and_huge():
    x = torch.randn(50)
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone()
        y[7] = bad
        assert not any(math.isfinite(b) for b in _values.norm_bounds([y, y[1::2], y.half()]))
    assert not math.isfinite(_values.norm_bounds([torch.full((4,), 3e20)])[0])  # squares overflow float32
    assert _values.norm_bounds([]) == []


def test_known_norms_are_scoped_to_one_call_and_one_context():
    x = torch.randn(3, 4)
    assert _values.known_norm(x) is None
    with _values.known_norms([x], [5.0]):
        assert _values.known_norm(x) == 5.0
        assert _values.known_norm(x.clone()) is None  # keyed on the tensor object, not its values
        seen = []
        th = threading.Thread(target=lambda: seen.append(_values.known_norm(x)))
        th.start()
        th.join()
        assert seen == [None]  # another thread does not see this call's scan
        assert contextvars.copy_context().run(_values.known_norm, x) == 5.0
    assert _values.known_norm(x) is None
    with _values.known_norms([x], [math.inf]):
        assert _values.known_norm(x) is None  # a non-finite bound is no bound


def test_general_path_overflow_screen_reads_the_scan(monkeypatch):
    """sdpa forced (the general path): its overflow check is answered by the call's scan of q and k."""
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv((1, 2, 8, 4), 8)
    nlgraph.aggregate(q, k, v, A.Softmax(scale=1.0), backend="sdpa")
    assert calls == []  # sdpa's check_scores: the scan's norms suffice


@pytest.mark.parametrize("aff", [A.Softmax(), A.Softmax(scale=-3.0), A.DotProduct(scale=0.5)], ids=repr)
def test_lowered_form_overflow_screen_reads_the_scan(monkeypatch, aff):
    """chunked forced (the lowering to a form): the scaled queries' check is answered by the scan's
    |Q|_F |K|_F too (no min/max pass over the form); large values still reach the full check."""
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv((1, 2, 8, 4), 8)
    nlgraph.aggregate(q, k, v, aff, backend="chunked")
    assert calls == []
    with pytest.raises(ValueError, match="float32 holds at most"):
        nlgraph.aggregate(q * 1e19, k * 1e19, v, aff, backend="chunked")
    assert calls  # the bound could not prove the scores finite: the form was scanned


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 9), m=st.integers(1, 9), d=st.integers(1, 6), scale=st.floats(-50.0, 50.0),
       log_mag=st.floats(-3, 3), self_attn=st.booleans(), dtype=st.sampled_from([torch.float32, F64]),
       seed=st.integers(0, 2**16))
@example(n=1, m=1, d=1, scale=2.0**-149, log_mag=0.0, self_attn=False, dtype=torch.float32, seed=0)
def test_property_scaled_bound_bounds_the_scores(n, m, d, scale, log_mag, self_attn, dtype, seed):
    """The scaled product's bound from the scan >= every |partial sum of (s q_i) . k_j| of the form."""
    g = torch.Generator().manual_seed(seed)
    q = (10.0**log_mag * torch.randn(2, n, d, generator=g, dtype=F64)).to(dtype)
    k = q if self_attn else (10.0**log_mag * torch.randn(2, m, d, generator=g, dtype=F64)).to(dtype)
    distinct = [q] if k is q else [q, k]
    with _values.known_norms(distinct, _values.norm_bounds(distinct)):
        bound = A._scaled_bound(q, k, scale)
        form = A.Softmax(scale=scale).form(q, k)
    assert bound is not None and math.isfinite(bound)
    terms = form.query.double()[..., :, None, :] * form.key.double()[..., None, :, :]  # (2, n, m, d)
    worst = terms.cumsum(-1).abs().amax()  # every partial sum, in float64
    assert worst <= bound


@settings(max_examples=60, deadline=None)
@given(lead_q=st.sampled_from([(), (1,), (2,), (2, 3), (1, 3)]),
       lead_k=st.sampled_from([(), (2,), (2, 3), (2, 1)]),
       n=st.integers(1, 9), m=st.integers(1, 9), d=st.integers(1, 6), b=st.floats(0.05, 20.0),
       offset=st.floats(-1e3, 1e3), log_mag=st.floats(-3, 3), self_attn=st.booleans(),
       dtype=st.sampled_from([torch.float32, F64]), seed=st.integers(0, 2**16))
def test_property_gaussian_score_bound_bounds_the_scores(lead_q, lead_k, n, m, d, b, offset, log_mag,
                                                          self_attn, dtype, seed):
    """The normalised Gaussian's bound from the scan >= every |q'_i . k'_j| + |col_j| of its form."""
    g = torch.Generator().manual_seed(seed)
    try:
        torch.broadcast_shapes(lead_q, lead_k)
    except RuntimeError:
        return
    q = (offset + 10.0**log_mag * torch.randn(*lead_q, n, d, generator=g, dtype=F64)).to(dtype)
    k = (offset + 10.0**log_mag * torch.randn(*lead_k, m, d, generator=g, dtype=F64)).to(dtype)
    k = q if self_attn else k
    aff = A.Gaussian(b)
    distinct = [q] if k is q else [q, k]
    with _values.known_norms(distinct, _values.norm_bounds(distinct)):
        bound = aff._score_bound(q, k)
        form = aff.form(q, k)
    assert bound is not None and math.isfinite(bound)
    qf, kf, col = form.query.double(), form.key.double(), form.col.double()
    worst = (qf @ kf.transpose(-1, -2)).abs().amax() + col.abs().amax()
    assert bound >= float(worst)


def test_shortcut_and_scan_under_inference_mode_and_threads(taken):
    """inference_mode tensors (no version counter) and concurrent calls from several threads: each call
    reads its own scan (the bounds are per call and per thread) and gets its own correct answer."""
    q, k, v = _qkv((2, 2, 12, 8), 10, dtype=F64)
    with torch.inference_mode():
        y = nlgraph.aggregate(q, k, v)
        yg = nlgraph.aggregate(q, k, v, A.Gaussian(2.0))  # the general path, its screen from the scan
    assert taken == [True]  # the Gaussian never asks the shortcut
    torch.testing.assert_close(y, aggregate_formula("softmax", q, k, v, {}), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(yg, aggregate_formula("gaussian", q, k, v, {"bandwidth": 2.0}),
                               rtol=1e-9, atol=1e-10)
    errors: list[BaseException] = []

    def work(seed):
        try:
            for i in range(20):
                a, b, c = _qkv((1, 2, 9, 4), 7, dtype=F64, seed=seed * 100 + i)
                scale = 10.0**seed  # seed 3: huge scores, which must raise in this thread only
                if seed == 3:
                    with pytest.raises(ValueError, match="scores of these query/key values"):
                        nlgraph.aggregate(a * 1e153, b * 1e153, c, A.Gaussian(1e-3))
                    continue
                got = nlgraph.aggregate(a, b, c, A.Gaussian(scale))
                want = aggregate_formula("gaussian", a, b, c, {"bandwidth": scale})
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
