"""Bad input gets a ValueError/TypeError that names the argument and the shapes seen."""

from __future__ import annotations

import math

import pytest
import torch

import nlgraph
from nlgraph import affinity as A
from nlgraph import graph as G
from nlgraph.dispatch import BackendError


def qkv(n=6, m=7, d=4, e=3, dtype=torch.float32):
    return (torch.randn(2, n, d, dtype=dtype), torch.randn(2, m, d, dtype=dtype),
            torch.randn(2, m, e, dtype=dtype))


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"query must have shape \(\.\.\., N, d\), got \(4,\)"):
        nlgraph.aggregate(torch.randn(4), k, v)


def test_mismatched_feature_width():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"query .*\(2, 6, 5\).*key .*\(2, 7, 4\)"):
        nlgraph.aggregate(torch.randn(2, 6, 5), k, v)


def test_mismatched_key_count():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"key \(2, 7, 4\) and value \(2, 8, 3\)"):
        nlgraph.aggregate(q, k, torch.randn(2, 8, 3))


def test_leading_dims_do_not_broadcast():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"do not broadcast"):
        nlgraph.aggregate(torch.randn(3, 6, 4), k, v)


def test_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"share a dtype, got torch.float32, torch.float64, torch.float32"):
        nlgraph.aggregate(q, k.double(), v)


def test_integer_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError,
                       match=r"value must be float16, bfloat16, float32 or float64, got torch.int64"):
        nlgraph.aggregate(q, k, torch.ones(2, 7, 3, dtype=torch.long))


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"key must be a torch.Tensor, got list"):
        nlgraph.aggregate(q, [[1.0]], v)


def test_mixed_devices():
    q, k, v = qkv()
    meta = torch.empty(2, 7, 3, device="meta")
    with pytest.raises(ValueError, match=r"one device, got cpu, cpu, meta"):
        nlgraph.aggregate(q, k, meta)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("which", ["query", "key", "value"])
def test_non_finite(bad, which):
    t = dict(zip(("query", "key", "value"), qkv(), strict=True))
    t[which][0, 1, 1] = bad
    with pytest.raises(ValueError, match=rf"{which} contains NaN or Inf"):
        nlgraph.aggregate(t["query"], t["key"], t["value"])


EMPTY_SHAPES = {  # (query, key, value) shapes with a zero somewhere: torch's SDPA answers each
    "batch": ((0, 6, 4), (0, 7, 4), (0, 7, 3)),
    "broadcast batch": ((2, 0, 6, 4), (1, 7, 4), (1, 1, 7, 3)),
    "no queries": ((2, 0, 4), (2, 7, 4), (2, 7, 3)),
    "no keys": ((2, 6, 4), (2, 0, 4), (2, 0, 3)),
    "no features": ((2, 6, 0), (2, 7, 0), (2, 7, 3)),
    "no value channels": ((2, 6, 4), (2, 7, 4), (2, 7, 0)),
    "nothing": ((0, 0, 0), (0, 0, 0), (0, 0, 0)),
}


@pytest.mark.parametrize("case", list(EMPTY_SHAPES))
def test_empty_dims_follow_sdpa(case):
    """Empty batches, N = 0, M = 0, d = 0 and e = 0 give SDPA's result and gradients, not an error."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_(True)
              for s in EMPTY_SHAPES[case]]
    y = nlgraph.aggregate(*leaves)
    y_ref = F.scaled_dot_product_attention(*leaves)
    assert y.shape == y_ref.shape
    # 1e-12: sums of at most 7 terms of size < 10 in float64 round by < 7 * 10 * 2^-53 ~ 1e-14
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, dy)
    for name, g, g_ref in zip("qkv", grads, torch.autograd.grad(y_ref, leaves, dy), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12, msg=lambda m: f"d/d{name}: {m}")


@pytest.mark.parametrize("case", list(EMPTY_SHAPES))
def test_empty_dims_other_affinities_and_graphs(case):
    """The same shapes with count and C = 1 normalisations, a float mask and every backend that runs them."""
    from .formulas import aggregate_formula

    gen = torch.Generator().manual_seed(1)
    q, k, v = [torch.randn(s, generator=gen, dtype=torch.float64) for s in EMPTY_SHAPES[case]]
    n = q.shape[-2]
    bias = torch.randn(n, 1, generator=gen, dtype=torch.float64).requires_grad_(True)
    for aff, kind, params in ((A.DotProduct(), "dot", {}),
                              (A.Gaussian(1.3, normalize=False), "gaussian_unnorm", {"bandwidth": 1.3})):
        y_ref = aggregate_formula(kind, q, k, v, params, bias=bias)
        (g_ref,) = torch.autograd.grad(y_ref.sum(), bias)
        backends = nlgraph.dispatch.exact_backends(q, k, v, aff, G.Mask(bias))
        assert {"chunked", "reference"} <= set(backends)
        for b in backends:
            y = nlgraph.aggregate(q, k, v, aff, G.Mask(bias), backend=b)
            torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12, msg=lambda m: f"{aff!r} {b}: {m}")
            (g,) = torch.autograd.grad(y.sum(), bias)
            torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"d/dmask {aff!r} {b}: {m}")


def test_empty_still_needs_consistent_shapes():
    with pytest.raises(ValueError, match=r"same number of keys M, got key \(2, 0, 4\) and value \(2, 7, 3\)"):
        nlgraph.aggregate(torch.randn(2, 6, 4), torch.randn(2, 0, 4), torch.randn(2, 7, 3))
    with pytest.raises(ValueError, match=r"ExcludeSelf needs as many queries as keys, got N=6, M=0"):
        nlgraph.aggregate(torch.randn(6, 4), torch.randn(0, 4), torch.randn(0, 3), graph=G.ExcludeSelf())


def test_mask_wrong_shape():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"Mask\(mask\) has shape \(6, 6\).*\(N, M\) = \(6, 7\)"):
        nlgraph.aggregate(q, k, v, graph=G.Mask(torch.ones(6, 6, dtype=torch.bool)))


def test_mask_batch_dims_do_not_broadcast():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"leading dims \(3,\)"):
        nlgraph.aggregate(q, k, v, graph=G.Mask(torch.ones(3, 6, 7, dtype=torch.bool)))


def test_mask_wrong_dtype_and_nan():
    with pytest.raises(TypeError, match=r"Mask\(mask\) must be bool or floating point"):
        G.Mask(torch.ones(3, 3, dtype=torch.int32))
    bad = torch.zeros(3, 3)
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"no NaN"):
        G.Mask(bad)


def test_exclude_self_needs_square():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"ExcludeSelf needs as many queries as keys, got N=6, M=7"):
        nlgraph.aggregate(q, k, v, graph=G.ExcludeSelf())


def test_grid_graph_size_mismatch():
    q, k, v = qkv(n=6, m=6)
    with pytest.raises(ValueError, match=r"LocalWindow\(shape=\(2, 4\)\) has 8 nodes but got N=6"):
        nlgraph.aggregate(q, k, v, graph=G.LocalWindow((2, 4), 1))
    with pytest.raises(ValueError, match=r"radius"):
        G.LocalWindow((2, 3), -1)
    with pytest.raises(ValueError, match=r"CrissCross\(shape\) must be \(H, W\)"):
        G.CrissCross((2, 3, 4))


def test_edge_index_out_of_range():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"refers to source 9 .* M=7 keys and N=6 queries"):
        nlgraph.aggregate(q, k, v, graph=G.EdgeIndex(torch.tensor([[9], [0]])))
    with pytest.raises(ValueError, match=r"shape \(2, E\)"):
        G.EdgeIndex(torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match=r"edge_weight\) must have shape \(E,\) = \(2,\)"):
        G.EdgeIndex(torch.tensor([[0, 1], [1, 0]]), edge_weight=torch.ones(3))


def test_knn_index_out_of_range():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"KNN\(index\) refers to key 7 .* M=7 keys"):
        nlgraph.aggregate(q, k, v, graph=G.KNN(torch.full((6, 2), 7)))


def test_affinity_parameters():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"Gaussian\(bandwidth\) must be > 0"):
        A.Gaussian(0.0)
    for bad in (-1.0, math.inf, math.nan, True, "5"):
        with pytest.raises(ValueError, match=r"Gaussian\(cutoff\) must be None or a finite number >= 0"):
            A.Gaussian(1.0, cutoff=bad)
    # backends without a cut-off say so (permutohedral, sdpa)
    with pytest.raises(BackendError, match=r"Gaussian\(cutoff=\.\.\.\) needs an exact backend"):
        nlgraph.aggregate(q, k, v, A.Gaussian(1.0, cutoff=2.0), backend="permutohedral")
    with pytest.raises(BackendError, match=r"cut-off drops pairs by their distance"):
        nlgraph.aggregate(q, k, v, A.Gaussian(1.0, cutoff=2.0), backend="sdpa")
    with pytest.raises(ValueError, match=r"Gaussian\(bandwidth\) has 3 entries but the features have d=4"):
        nlgraph.aggregate(q, k, v, A.Gaussian(torch.ones(3)))
    with pytest.raises(ValueError,
                       match=r"Concatenation\(weight\) has shape \(6,\), expected \(2\*d,\) = \(8,\)"):
        nlgraph.aggregate(q, k, v, A.Concatenation(torch.ones(6)))
    with pytest.raises(TypeError, match=r"affinity must be an nlgraph.affinity.Affinity"):
        nlgraph.aggregate(q, k, v, "softmax")
    with pytest.raises(ValueError, match=r"EdgeWeighted\(weight\) must be finite and >= 0"):
        A.EdgeWeighted(A.Softmax(), -torch.ones(6, 7))
    with pytest.raises(ValueError, match=r"per edge and needs an EdgeIndex graph"):
        nlgraph.aggregate(q, k, v, A.EdgeWeighted(A.Softmax(), torch.ones(5)))
    with pytest.raises(ValueError, match=r"dense weights must be \(\.\.\., N, M\) = \(\.\.\., 6, 7\)"):
        nlgraph.aggregate(q, k, v, A.EdgeWeighted(A.Softmax(), torch.ones(6, 6)))


def test_graph_type():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"graph must be None or an nlgraph.graph.Graph, got Tensor"):
        nlgraph.aggregate(q, k, v, graph=torch.ones(6, 7, dtype=torch.bool))


def test_backend_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \['algebra', 'sdpa', 'triton', "
                                         r"'permutohedral', 'grid', 'pyg', 'chunked', 'reference'"):
        nlgraph.aggregate(q, k, v, backend="cuda-magic")
    with pytest.raises(BackendError,
                       match=r"backend='algebra' cannot run affinity=Softmax.*closed forms for DotProduct"):
        nlgraph.aggregate(q, k, v, backend="algebra")
    with pytest.raises(TypeError, match=r"backend 'chunked' does not take option\(s\) \['tile'\]"):
        nlgraph.aggregate(q, k, v, backend="chunked", options={"tile": 3})
    with pytest.raises(ValueError, match=r"chunked option block_n must be a positive int"):
        nlgraph.aggregate(q, k, v, backend="chunked", options={"block_n": 0})


@pytest.mark.parametrize("backend", ["chunked", "reference", "algebra"])
def test_non_contiguous_inputs_work(backend):
    """Transposed / strided views are valid input and give the same result as contiguous copies."""
    base_q = torch.randn(2, 4, 9, dtype=torch.float64)  # (B, d, N) -> transpose to (B, N, d)
    base_k = torch.randn(2, 4, 11, dtype=torch.float64)
    base_v = torch.randn(2, 11, 6, dtype=torch.float64)[..., ::2]  # strided last dim
    q, k, v = base_q.transpose(1, 2), base_k.transpose(1, 2), base_v
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    aff = A.DotProduct() if backend == "algebra" else A.Softmax()
    y = nlgraph.aggregate(q, k, v, aff, backend=backend)
    y_ref = nlgraph.aggregate(q.contiguous(), k.contiguous(), v.contiguous(), aff, backend="reference")
    # float64, N = 9, M = 11, d = 4 (chains ~30, sums ~4, logits ~5): ~30 u 4 6 ~ 1e-13
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
