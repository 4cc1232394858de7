"""The tile loops' per-thread scratch buffers (``_tiles.score_buffer`` / ``scratch``): reused between
calls, never shared by two users at once, kept apart for inference mode, and never visible in a result."""

from __future__ import annotations

import threading

import torch

import nlgraph
from nlgraph.backends import _tiles


def _inputs(seed, requires_grad=False, shape=(2, 2, 200, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, requires_grad=requires_grad) for _ in range(3)]


BLOCKS = {"block_n": 64, "block_m": 64}


def _chunked(q, k, v):
    # the score tiles are kept in the scratch (not too small for it), so these tests exercise the reuse
    assert q.shape[:-2].numel() * BLOCKS["block_n"] * BLOCKS["block_m"] >= _tiles.SCRATCH_MIN
    return nlgraph.aggregate(q, k, v, backend="chunked", options=BLOCKS)


def _exact(q, k, v):
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # Softmax's default scale, as SDPA's
    return torch.softmax(s.double(), -1).float() @ v


def test_results_do_not_alias_the_reused_buffers():
    a, b = _inputs(0), _inputs(1)
    ya = _chunked(*a)
    kept = ya.clone()
    yb = _chunked(*b)  # reuses the same scratch: must not write into ya
    assert torch.equal(ya, kept)
    torch.testing.assert_close(ya, _exact(*a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yb, _exact(*b), rtol=1e-5, atol=1e-5)


def test_gradients_across_calls_sharing_the_scratch():
    a, b = _inputs(2, True), _inputs(3, True)
    ya, yb = _chunked(*a), _chunked(*b)  # both graphs alive: their backwards run one after the other
    ga = torch.autograd.grad(ya.square().sum(), a)
    gb = torch.autograd.grad(yb.square().sum(), b)
    for inp, got in ((a, ga), (b, gb)):
        want = torch.autograd.grad(_exact(*inp).square().sum(), inp)
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_inference_mode_and_normal_mode_alternate():
    a = _inputs(4)
    with torch.inference_mode():
        y1 = _chunked(*a)
    y2 = _chunked(*a)  # a buffer made under inference mode must not be written here
    with torch.inference_mode():
        y3 = _chunked(*a)
    assert torch.equal(y1, y2) and torch.equal(y2, y3)


def test_a_buffer_is_never_handed_out_twice():
    p_shape = (1, 128, _tiles.SCRATCH_MIN // 128)
    first = _tiles.scratch(p_shape, torch.float32, torch.device("cpu"), "t")
    second = _tiles.scratch(p_shape, torch.float32, torch.device("cpu"), "t")  # first still in use
    assert first.data_ptr() != second.data_ptr()
    _tiles.release_buffer(first, "t")
    again = _tiles.scratch(p_shape, torch.float32, torch.device("cpu"), "t")
    assert again.data_ptr() == first.data_ptr()
    big = _tiles.scratch((_tiles.SCRATCH_MAX + 1,), torch.float32, torch.device("cpu"), "t")
    _tiles.release_buffer(big, "t")  # too large to keep
    assert _tiles.scratch(p_shape, torch.float32, torch.device("cpu"), "t").data_ptr() != big.data_ptr()


def test_small_buffers_are_fresh_and_not_kept():
    small = (_tiles.SCRATCH_MIN - 1,)
    kept = _tiles.scratch((_tiles.SCRATCH_MIN,), torch.float32, torch.device("cpu"), "s")
    _tiles.release_buffer(kept, "s")
    a = _tiles.scratch(small, torch.float32, torch.device("cpu"), "s")  # fresh: the kept one stays
    assert a.shape == small and a.data_ptr() != kept.data_ptr()
    _tiles.release_buffer(a, "s")  # not kept: the slot still holds the large one
    assert _tiles.scratch((_tiles.SCRATCH_MIN,), torch.float32, torch.device("cpu"), "s").data_ptr() \
        == kept.data_ptr()


def test_threads_get_their_own_buffers():
    inputs = [_inputs(10 + i, shape=(2, 2, 300, 8)) for i in range(6)]
    want = [_chunked(*x) for x in inputs]
    got: list = [None] * len(inputs)

    def work(i):
        for _ in range(3):
            got[i] = _chunked(*inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
