"""Low precision and degenerate inputs: fp16/bf16 accuracy, huge logits, constant inputs.

fp16/bf16 rule (as flash-attention's tests): compare against the float64 result and allow at most
twice the error that plain PyTorch makes in the same precision on the same inputs (plus a small
absolute floor for errors at the level of the output's own rounding).
"""

from __future__ import annotations

import pytest
import torch

import nlgraph
from nlgraph import affinity as A
from nlgraph import graph as G

from .formulas import aggregate_formula

LOW = [torch.float16, torch.bfloat16]


def _rounding_floor(dtype):
    return 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kind", ["softmax", "gaussian", "gaussian_unnorm", "dot"])
def test_low_precision_error_within_twice_plain_torch(dtype, kind):
    gen = torch.Generator().manual_seed(0)
    q64 = torch.randn(2, 64, 16, generator=gen, dtype=torch.float64)
    k64 = torch.randn(2, 80, 16, generator=gen, dtype=torch.float64)
    v64 = torch.randn(2, 80, 8, generator=gen, dtype=torch.float64)
    params = {"bandwidth": 2.0} if kind.startswith("gaussian") else {}
    aff = {"softmax": A.Softmax(), "gaussian": A.Gaussian(2.0), "gaussian_unnorm": A.Gaussian(2.0, normalize=False),
           "dot": A.DotProduct()}[kind]
    exact = aggregate_formula(kind, q64, k64, v64, params)
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    plain = aggregate_formula(kind, q, k, v, params)  # plain PyTorch, materialised in low precision
    err_plain = (plain.double() - exact).abs().max().item()
    for backend in nlgraph.dispatch.exact_backends(q, k, v, aff, None):
        y = nlgraph.aggregate(q, k, v, aff, backend=backend)
        assert y.dtype == dtype
        err = (y.double() - exact).abs().max().item()
        scale = exact.abs().max().item()
        assert err <= 2 * err_plain + _rounding_floor(dtype) * scale, (backend, err, err_plain)


@pytest.mark.parametrize("dtype", LOW + [torch.float32])
@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_logits_of_magnitude_1e4_stay_finite(dtype, backend):
    gen = torch.Generator().manual_seed(1)
    q = (torch.randn(1, 40, 4, generator=gen) * 50).to(dtype)  # |q.k| up to ~1e4 with scale 1
    k = (torch.randn(1, 40, 4, generator=gen) * 50).to(dtype)
    v = torch.randn(1, 40, 3, generator=gen).to(dtype)
    logits = q.double() @ k.double().transpose(-1, -2)
    assert logits.abs().max() > 5e3
    y = nlgraph.aggregate(q, k, v, A.Softmax(scale=1.0), backend=backend)
    assert torch.isfinite(y).all()
    exact = torch.softmax(logits, -1) @ v.double()
    # the exact softmax of these logits (gaps between a row's largest two >> the logits' rounding) is
    # one-hot to within exp(-gap): y is one value up to the weights' normalisation and the output's
    # rounding, a few eps of max |v|
    tol = 4 * torch.finfo(dtype).eps * v.double().abs().max().item()
    assert (y.double() - exact).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", LOW + [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["softmax", "gaussian", "gaussian_unnorm", "dot", "concat"])
def test_constant_inputs_give_no_nan_gradients(dtype, kind):
    q = torch.ones(2, 12, 4, dtype=dtype, requires_grad=True)
    k = torch.ones(2, 12, 4, dtype=dtype, requires_grad=True)
    v = torch.ones(2, 12, 3, dtype=dtype, requires_grad=True)
    bw = torch.ones(4, dtype=dtype, requires_grad=True)
    w = torch.ones(8, dtype=dtype, requires_grad=True)
    aff = {"softmax": A.Softmax(), "gaussian": A.Gaussian(bw), "gaussian_unnorm": A.Gaussian(bw, normalize=False),
           "dot": A.DotProduct(), "concat": A.Concatenation(w)}[kind]
    for backend in nlgraph.dispatch.exact_backends(q, k, v, aff, G.ExcludeSelf()):
        for graph in (None, G.ExcludeSelf()):
            y = nlgraph.aggregate(q, k, v, aff, graph, backend=backend)
            grads = torch.autograd.grad(y.float().sum(), [q, k, v] + list(aff.tensors()))
            assert torch.isfinite(y).all(), backend
            for g in grads:
                assert torch.isfinite(g).all(), (backend, graph)
