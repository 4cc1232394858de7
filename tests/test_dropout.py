"""Message dropout in the core op: deterministic per seed, exact structure, unbiased, gradchecked."""

from __future__ import annotations

import pytest
import torch

import nlgraph
from nlgraph import affinity as A
from nlgraph import graph as G

OPTS = {"chunked": {"block_n": 5, "block_m": 4}, "reference": None}


def _qkv(seed=0, n=11, m=13, d=4, e=3):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return r(2, n, d), r(2, m, d), r(2, m, e)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
@pytest.mark.parametrize("aff", [A.Softmax(), A.DotProduct(), A.Gaussian(1.5, normalize=False)])
def test_dropout_structure(backend, aff):
    """With one-hot values the op returns the dropped weights W = (f / C) * m / (1 - p) themselves:
    every entry is either 0 or the undropped weight / (1 - p), and y == W @ v with the same seed."""
    q, k, v = _qkv()
    p = 0.3
    mask = G.Mask(torch.rand(11, 13, generator=_gen(5)) > 0.2)
    eye = torch.eye(13, dtype=torch.float64).expand(2, 13, 13)
    w_full = nlgraph.aggregate(q, k, eye, aff, mask, backend=backend, options=OPTS[backend])
    w_drop = nlgraph.aggregate(q, k, eye, aff, mask, backend=backend, options=OPTS[backend], dropout_p=p,
                               generator=_gen(1))
    kept = w_drop != 0
    assert 0 < kept.sum() < (w_full != 0).sum()
    # float64 weights <= 1 computed twice, the dropout path scaling and normalising in another order
    # (a few u each), after the same tile-wise online softmax (<= ~(tiles + 4) u (1 + max|logit|) ~ 1e-14)
    torch.testing.assert_close(w_drop[kept], w_full[kept] / (1 - p), rtol=1e-12, atol=1e-14)
    y = nlgraph.aggregate(q, k, v, aff, mask, backend=backend, options=OPTS[backend], dropout_p=p,
                          generator=_gen(1))
    # sums of M = 13 terms |w v| <= 4 on either side: <= 2 x 13 u x 4 ~ 1e-14
    torch.testing.assert_close(y, w_drop @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_dropout_gradcheck(backend):
    q, k, v = (t.requires_grad_(True) for t in _qkv(n=6, m=7))

    def fn(q, k, v):
        return nlgraph.aggregate(q, k, v, backend=backend, options=OPTS[backend], dropout_p=0.4,
                                 generator=_gen(3))

    # central differences at eps = 1e-6: truncation eps^2 |f^(3)| / 6 ~ 1e-12 x O(10), rounding
    # ~100 u |f| / eps ~ 1e-8; both far below atol 1e-6
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)


def test_dropout_is_unbiased():
    q, k, v = _qkv()
    exact = nlgraph.aggregate(q, k, v)
    gen = _gen(0)
    mean = sum(nlgraph.aggregate(q, k, v, dropout_p=0.5, generator=gen) for _ in range(400)) / 400
    # one sample is sum_j w_j (m_j / (1 - p)) v_j with independent m_j ~ Bernoulli(1 - p): variance
    # sum_j w_j^2 v_j^2 p / (1 - p) (= 1 at p = 0.5); the mean of 400 lies within 5 standard errors
    # (a 6e-7 chance per entry to fall outside, for a normal mean)
    w = nlgraph.aggregate(q, k, torch.eye(k.shape[-2], dtype=k.dtype).expand(k.shape[0], -1, -1))
    sigma = ((w * w) @ (v * v)).sqrt()
    assert ((mean - exact).abs() <= 5 * sigma / 400 ** 0.5).all()


def test_dropout_extremes_and_errors():
    q, k, v = _qkv()
    assert torch.equal(nlgraph.aggregate(q, k, v, dropout_p=1.0), torch.zeros(2, 11, 3, dtype=torch.float64))
    # the same float64 call twice (formulas.TOLERANCES)
    torch.testing.assert_close(nlgraph.aggregate(q, k, v, dropout_p=0.0), nlgraph.aggregate(q, k, v),
                               rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\], got 1.5"):
        nlgraph.aggregate(q, k, v, dropout_p=1.5)
    # algebra has no dropout: auto dispatch moves to chunked, forcing it says why
    assert nlgraph.select_backend(q, k, v, A.DotProduct(), None, dropout_p=0.2)[0] == "chunked"
    with pytest.raises(nlgraph.BackendError, match="no dropout"):
        nlgraph.aggregate(q, k, v, A.DotProduct(), backend="algebra", dropout_p=0.2)
