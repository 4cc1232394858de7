"""aggregate(..., Softmax()) == torch.nn.functional.scaled_dot_product_attention, forward and gradients.

Tolerances: float64 rtol 1e-9 / atol 1e-10; float32 rtol 2e-4 / atol 2e-5 (tests/formulas.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import nlgraph
from nlgraph import graph as G

from .formulas import TOLERANCES

B, H, N, M, D, E = 2, 3, 33, 29, 16, 8


def _qkv(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)  # noqa: E731
    return mk(B, H, N, D), mk(B, H, M, D), mk(B, H, M, E)


def _mask(kind, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(B, 1, N, M, generator=gen) > 0.3
        m[..., 0] = True  # SDPA returns NaN for fully masked rows; keep every row non-empty here
        return m
    if kind == "bool_causal":
        return torch.ones(N, M, dtype=torch.bool).tril(diagonal=M - N)
    m = torch.randn(1, H, N, M, generator=gen, dtype=torch.float64).to(dtype)
    return m.requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask_kind", [None, "bool", "bool_causal", "float"])
@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_matches_sdpa(dtype, mask_kind, backend):
    q, k, v = _qkv(dtype)
    mask = _mask(mask_kind, dtype)
    y_ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    graph = None if mask is None else G.Mask(mask)
    y = nlgraph.aggregate(q, k, v, nlgraph.Softmax(), graph, backend=backend,
                          options={"block_n": 8, "block_m": 7} if backend == "chunked" else None)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol, msg=lambda m: f"forward: {m}")
    gen = torch.Generator().manual_seed(2)
    dout = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    named = {"query": q, "key": k, "value": v}
    if mask is not None and mask.is_floating_point():
        named["attn_mask"] = mask
    grads = torch.autograd.grad(y, list(named.values()), dout)
    grads_ref = torch.autograd.grad(y_ref, list(named.values()), dout)
    for name, g, gr in zip(named, grads, grads_ref, strict=True):
        torch.testing.assert_close(g, gr, rtol=rtol, atol=atol, msg=lambda m: f"d/d{name}: {m}")


def test_scale_argument_matches_sdpa():
    q, k, v = _qkv(torch.float64)
    y_ref = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    y = nlgraph.aggregate(q, k, v, nlgraph.Softmax(scale=0.3))
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)  # float64 bound (formulas.TOLERANCES)


def test_fully_masked_row_gives_zeros_where_sdpa_gives_nan():
    q, k, v = _qkv(torch.float64)
    mask = torch.ones(N, M, dtype=torch.bool)
    mask[5] = False
    y = nlgraph.aggregate(q, k, v, graph=G.Mask(mask))
    assert torch.equal(y[..., 5, :], torch.zeros_like(y[..., 5, :]))
    y_ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    keep = torch.arange(N) != 5
    # float64 bound (formulas.TOLERANCES)
    torch.testing.assert_close(y[..., keep, :], y_ref[..., keep, :], rtol=1e-9, atol=1e-10)
    y.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert math.isfinite(float(y.detach().sum()))
