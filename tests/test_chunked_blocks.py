"""``chunked``'s default tile shapes (``chunked.default_blocks``): tall tiles on the complete graph with few
batch entries, square ones otherwise, each within the tile budget; and a call whose default tall tiles
are ragged in both directions equals the materialised formula.
"""

from __future__ import annotations

import math

import pytest
import torch

import nlgraph
from nlgraph import graph as G
from nlgraph.backends import chunked

from .formulas import aggregate_formula


@pytest.mark.parametrize("batch,n,m", [(1, 4096, 4096), (1, 1024, 1024), (2, 2048, 2048), (4, 5000, 300),
                                       (1, 300, 5000), (1, 5000, 100), (7, 64, 64), (1, 16, 16)])
def test_tall_tiles_on_the_complete_graph(batch, n, m):
    bn, bm = chunked.default_blocks(batch, n, m, complete=True)
    assert 1 <= bn <= min(n, 2048) and 1 <= bm <= min(m, 1024)
    assert bm == m or bm >= chunked.TALL_KEYS  # keys are only ever widened
    assert batch * bn * bm <= chunked.TILE_ELEMENTS
    if n >= 2048 // batch and m >= chunked.TALL_KEYS:
        assert (bn, bm) == (chunked.TILE_ELEMENTS // (batch * chunked.TALL_KEYS), chunked.TALL_KEYS)


@pytest.mark.parametrize("batch,n,m", [(8, 1024, 1024), (16, 4096, 4096), (1, 4096, 4096), (3, 700, 900)])
def test_square_tiles_for_many_heads_or_a_graph(batch, n, m):
    side = max(64, min(1024, 2 ** int(math.log2(math.sqrt(chunked.TILE_ELEMENTS / batch)))))
    assert chunked.default_blocks(batch, n, m) == (min(n, side), min(m, side))  # a graph: square
    if batch >= 8:
        assert chunked.default_blocks(batch, n, m, complete=True) == (min(n, side), min(m, side))


def test_default_tall_tiles_match_the_formula():
    """N = 2100 queries (a 2048-row tile and a ragged one), M = 600 keys (256, 256, 88), float64."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, s, 8, generator=g, dtype=torch.float64).requires_grad_()
               for s in (2100, 600, 600))
    assert chunked.default_blocks(1, 2100, 600, complete=True) == (2048, 256)
    y = nlgraph.aggregate(q, k, v, backend="chunked")
    ref = aggregate_formula("softmax", q, k, v, {})
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-10)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, (q, k, v), dy)
    want = torch.autograd.grad(ref, (q, k, v), dy)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_a_windowed_graph_keeps_square_tiles(monkeypatch):
    seen = []
    real = chunked.default_blocks

    def spy(*args, **kw):
        seen.append(real(*args, **kw))
        return seen[-1]

    monkeypatch.setattr(chunked, "default_blocks", spy)
    x = torch.randn(1, 48 * 48, 4)
    nlgraph.aggregate(x, x, x, graph=G.LocalWindow((48, 48), radius=2), backend="chunked")
    assert seen == [real(1, 48 * 48, 48 * 48)]
