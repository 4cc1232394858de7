"""``crf._layout.transposed``: the transposing copy between pydensecrf's (L, N) arrays and (N, L) rows.

Exact (a copy moves bits): compared with ``x.T`` element for element on both shapes of problem (long
source rows, short source rows), both float dtypes, the compiled kernel and torch's fallback, in
parts over one and two threads and from several Python threads at once.
"""

from __future__ import annotations

import threading

import pytest
import torch

from crf import _layout
from nlgraph._optional import optional

needs_numba = pytest.mark.skipif(optional("numba") is None, reason="numba not installed")

SHAPES = [(21, 40_000), (40_000, 21), (2, 70_001), (70_001, 2), (300, 257), (1, 40_000), (40_000, 1)]


def _check(x: torch.Tensor) -> None:
    """transposed(x) == x.T and transposed(x, negate=True) == -x.T, bit for bit (signs of zeros and
    infinities included), as new contiguous tensors."""
    for negate in (False, True):
        y = _layout.transposed(x, negate=negate)
        assert y.shape == (x.shape[1], x.shape[0]) and y.dtype == x.dtype
        assert y.is_contiguous()
        assert y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()  # a copy, never a view
        want = -x.T if negate else x.T
        assert torch.equal(y, want)
        if y.is_floating_point():
            assert torch.equal(torch.signbit(y), torch.signbit(want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_transposed_equals_the_transpose(shape, dtype, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(*shape, dtype=torch.float64).to(dtype)
        x.view(-1)[:4] = torch.tensor([0.0, -0.0, float("inf"), -float("inf")], dtype=dtype)
        _check(x)
    finally:
        torch.set_num_threads(before)


@needs_numba
def test_the_compiled_kernel_runs_on_large_float_inputs(monkeypatch):
    """The compiled path (not torch's copy) is what answers above the size threshold: a spy on the
    kernels sees the call; below the threshold, and for other dtypes, torch's copy answers."""
    calls = []
    wide, tall = _layout._kernels()

    def spy(kernel):
        def run(*args):
            calls.append(kernel)
            return kernel(*args)
        return run

    monkeypatch.setattr(_layout, "_kernels", lambda: (spy(wide), spy(tall)))
    _check(torch.randn(21, 40_000))
    assert wide in calls and tall not in calls
    calls.clear()
    _check(torch.randn(40_000, 21))
    assert tall in calls and wide not in calls
    calls.clear()
    _check(torch.randn(8, 8))  # small: torch's copy
    _check(torch.randint(0, 9, (21, 40_000), dtype=torch.int32))  # int: torch's copy
    assert calls == []


@pytest.mark.parametrize("shape", [(21, 40_000), (40_000, 21)])
def test_the_fallback_gives_the_same_bits(monkeypatch, shape):
    x = torch.randn(*shape)
    fast = _layout.transposed(x)
    monkeypatch.setattr(_layout, "_kernels", lambda: None)
    assert torch.equal(_layout.transposed(x), fast)


def test_non_contiguous_grad_and_inference_mode_inputs():
    base = torch.randn(40_000, 42)
    _check(base[:, ::2])  # strided: torch's copy
    _check(torch.randn(21, 40_000).T)  # a transposed view
    w = torch.randn(21, 40_000, requires_grad=True)
    y = _layout.transposed(w)
    assert y.requires_grad and torch.equal(y, w.T)  # torch's copy keeps autograd
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    with torch.inference_mode():
        _check(torch.randn(21, 40_000))


def test_concurrent_calls_from_threads():
    xs = [torch.randn(21, 40_000) for _ in range(4)] + [torch.randn(40_000, 21) for _ in range(4)]
    out: list = [None] * len(xs)

    def work(i):
        out[i] = _layout.transposed(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, y in zip(xs, out, strict=True):
        assert torch.equal(y, x.T)


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"2-D tensor, got shape \(2, 3, 4\)"):
        _layout.transposed(torch.zeros(2, 3, 4))
