"""The score tiles' compiled shifted exponential (``nlgraph.backends._exp_jit``) against float64.

Its contract: exp(s - c) per row, in place, within 1 ulp of the correctly rounded float32 result
for differences in [-87.3, 88] (torch's own exp is within 0.56 ulp; the kernel adds at most half an
ulp from one more rounding in its polynomial), 0 below 2^-126 and for -inf; and False (nothing
done) wherever it does not apply, so callers fall back to torch's ops.
"""

from __future__ import annotations

import threading

import pytest
import torch

import nlgraph
from nlgraph import graph as G
from nlgraph.backends import _exp_jit

pytest.importorskip("numba")


@pytest.fixture(autouse=True)
def _any_size(monkeypatch):
    """The kernel on every tile size here (its accuracy does not depend on the size threshold)."""
    monkeypatch.setattr(_exp_jit, "MIN_NUMEL", 0)


def test_small_tiles_keep_torchs_ops(monkeypatch):
    """Below MIN_NUMEL elements the kernel declines (torch's ops are faster there) and leaves the tile
    untouched; at the threshold it runs."""
    monkeypatch.setattr(_exp_jit, "MIN_NUMEL", 1 << 13)
    small, c = torch.randn(4, 2047), torch.zeros(4)
    before = small.clone()
    assert not _exp_jit.exp_shifted_(small, c) and torch.equal(small, before)
    at = torch.randn(4, 2048)
    want = torch.exp(at.double())
    assert _exp_jit.exp_shifted_(at, c)
    assert _ulps(at, want).max() <= 1.0


def _ulps(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|got - exact| in units of the float32 spacing at the exact value."""
    e32 = exact.float()
    spacing = (e32.nextafter(torch.tensor(float("inf"))) - e32).double()
    return (got.double() - exact).abs() / spacing


def test_within_one_ulp_of_float64_and_flushes_below_float32_normals():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(64, 1000, generator=g) * 120 - 100  # differences in [-100, 20]
    c = torch.rand(64, generator=g) * 4 - 2
    want = (s - c[:, None]).double()  # the float32 difference, then exp in float64
    got = s.clone()
    assert _exp_jit.exp_shifted_(got, c)
    exact = torch.exp(want)
    normal = exact >= 2.0 ** -126
    assert _ulps(got[normal], exact[normal]).max() <= 1.0
    # below the normals: flushed to 0 or the smallest normal's neighbourhood, never above 2^-126
    assert (got[~normal] <= 2.0 ** -126).all() and (got[~normal] >= 0).all()
    assert got[want < -88].eq(0).all()


def test_special_values():
    s = torch.tensor([[float("-inf"), 0.0, -1e30, 88.0, -87.0, 1.0]])
    got = s.clone()
    assert _exp_jit.exp_shifted_(got, torch.zeros(1))
    assert got[0, 0] == 0 and got[0, 1] == 1 and got[0, 2] == 0
    assert _ulps(got[0, 3:], torch.exp(s[0, 3:].double())).max() <= 1.0


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_rows_of_any_batch_shape_and_non_contiguous_shift(lead):
    s = torch.randn(*lead, 17, 33)
    shift = torch.randn(*lead, 34)[..., :17] if not lead else torch.randn(*lead, 17, 2)[..., 0]
    got = s.clone()
    assert _exp_jit.exp_shifted_(got, shift)
    torch.testing.assert_close(got, torch.exp(s - shift[..., None]), rtol=2.4e-7, atol=0)


def test_concurrent_calls_from_python_threads():
    s = torch.randn(8, 256, 256)
    c = s.amax(-1)
    want = s.clone()
    assert _exp_jit.exp_shifted_(want, c)
    outs = [s.clone() for _ in range(8)]
    threads = [threading.Thread(target=_exp_jit.exp_shifted_, args=(o, c)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(o, want) for o in outs)


def test_declines_what_it_does_not_cover(monkeypatch):
    s = torch.randn(4, 8)
    c = torch.zeros(4)
    cases = [
        (s.double(), c.double()),  # float64 keeps torch's exp
        (s.t().contiguous().t(), c),  # not row-contiguous
        (s.clone().requires_grad_(), c),  # autograd would not see the write
        (s, torch.zeros(4, 1)),  # shift not one per row
        (s.half(), c.half()),
    ]
    for a, b in cases:
        before = a.clone().detach()
        assert not _exp_jit.exp_shifted_(a, b)
        assert torch.equal(a.detach(), before)
    assert not torch.func.vmap(lambda x: torch.tensor(_exp_jit.applies(x, c)))(s[None].expand(2, 4, 8)).any()
    monkeypatch.setattr(_exp_jit, "USE_JIT", False)
    assert not _exp_jit.exp_shifted_(s.clone(), c)


@pytest.mark.parametrize("graph", [None, "mask"])
def test_chunked_with_and_without_the_kernel(monkeypatch, graph):
    """Forward and gradients of forced chunked agree with the kernel on and off to float32 rounding
    (the kernel's exp differs from torch's by <= 1.5 ulp per weight; sums of N weights then differ
    by <= 1.5 N ulp relative)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 300, 16, generator=g, requires_grad=True) for _ in range(3))
    mask = None if graph is None else G.Mask(torch.rand(300, 300, generator=g) > 0.3)

    def run():
        out = nlgraph.aggregate(q, k, v, nlgraph.Softmax(), mask, backend="chunked",
                                options={"block_n": 128, "block_m": 96})
        return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))

    with_kernel = run()
    monkeypatch.setattr(_exp_jit, "USE_JIT", False)
    without = run()
    for a, b in zip(with_kernel, without, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _softmax_bound(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|computed - exact| bound of a float32 softmax row by row: the shift x - max rounds once
    (relative error |x - max| u in the exp), the exp is within 1 ulp (2u), the row sum of m terms
    within (m - 1) u, the reciprocal and the product u each; doubled for second-order terms, plus
    2^-126 for weights flushed to 0 (each below 2^-126 of a sum >= 1)."""
    u = 2.0 ** -24
    m = x.shape[-1]
    gap = (x.double() - x.double().amax(-1, keepdim=True)).abs().nan_to_num(posinf=0.0)
    return 2 * u * (gap + m + 4) * ref + 2.0 ** -126


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("labels", [2, 3, 5, 8, 15, 16, 21, 32])
def test_softmax_rows_within_the_derived_bound(labels, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(labels)
        x = torch.randn(3001, labels, generator=g) * 30  # several blocks and a partial last one
        x[::5, 0] = -float("inf")  # impossible labels (a CRF's +inf energies)
        x[7] = 1e4  # a flat row far from 0
        want = torch.softmax(x.double(), -1)
        out = torch.full_like(x, float("nan"))
        got = _exp_jit.softmax_rows(x, out)
        longest = _exp_jit.SOFTMAX_MAX_ROW if threads == 1 else _exp_jit.SOFTMAX_MAX_ROW_THREADED
        if labels > longest:  # torch's softmax is faster there: declined, out untouched
            assert got is None and out.isnan().all()
            return
        assert got is out
        assert ((got.double() - want).abs() <= _softmax_bound(x, want)).all()
        assert got[::5, 0].eq(0).all()
        fresh = _exp_jit.softmax_rows(x)
        assert fresh is not None and torch.equal(fresh, got)
    finally:
        torch.set_num_threads(before)


def test_softmax_rows_declines_what_it_does_not_cover(monkeypatch):
    x = torch.randn(600, 5)
    for bad in (x.double(), x.T.contiguous().T, x.clone().requires_grad_(), x[:, :1].contiguous(),
                torch.randn(600, 33), torch.randn(600, 5, 2)):
        assert _exp_jit.softmax_rows(bad) is None
    for out in (torch.empty(600, 4), torch.empty(5, 600).T, x, torch.empty(600, 5, dtype=torch.float64)):
        assert _exp_jit.softmax_rows(x, out) is None
    monkeypatch.setattr(_exp_jit, "MIN_NUMEL", 1 << 13)
    assert _exp_jit.softmax_rows(torch.randn(100, 5)) is None  # small: torch's softmax
    monkeypatch.setattr(_exp_jit, "USE_JIT", False)
    assert _exp_jit.softmax_rows(torch.randn(3000, 5)) is None


def test_softmax_rows_of_all_minus_inf_are_nan_as_torchs():
    x = torch.randn(3000, 5)
    x[[3, 100, 2999]] = -float("inf")
    got = _exp_jit.softmax_rows(x)
    assert got is not None
    assert got[[3, 100, 2999]].isnan().all()
    keep = torch.ones(3000, dtype=torch.bool)
    keep[[3, 100, 2999]] = False
    want = torch.softmax(x[keep].double(), -1)
    assert ((got[keep].double() - want).abs() <= _softmax_bound(x[keep], want)).all()


def test_two_label_softmax_is_the_general_kernels_arithmetic():
    """The two-label rows' own loop does the general loop's operations: the same bits as the general
    kernel on the rows with a third, impossible (-inf) label (exp gives it 0; adding 0 is exact),
    dead rows (all -inf) NaN in both."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5000, 2, generator=g) * 20
    x[::7, 1] = -float("inf")
    x[[4, 4999]] = -float("inf")
    two = _exp_jit.softmax_rows(x)
    three = _exp_jit.softmax_rows(torch.cat([x, torch.full((5000, 1), -float("inf"))], 1))
    assert two is not None and three is not None
    assert torch.equal(two.isnan(), three[:, :2].isnan()) and two[[4, 4999]].isnan().all()
    keep = ~two.isnan().any(1)
    assert torch.equal(two[keep], three[keep, :2]) and (three[keep, 2] == 0).all()
