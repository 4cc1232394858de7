"""CrissCrossAttention == a straightforward CCNet-style implementation written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attention import CrissCrossAttention

# float64 rounding bound, derived in tests/formulas.py (TOLERANCES)
TOL = dict(rtol=1e-9, atol=1e-10)


def ccnet_reference(m: CrissCrossAttention, x):
    """As CCNet computes it: column energies with the self term masked, row energies, one joint softmax."""
    b, c, h, w = x.shape
    q = F.conv2d(x, m.query_conv.weight, m.query_conv.bias)
    k = F.conv2d(x, m.key_conv.weight, m.key_conv.bias)
    v = F.conv2d(x, m.value_conv.weight, m.value_conv.bias)
    # energy_H[b, i, j, h'] = q[b, :, i, j] . k[b, :, h', j]   (same column)
    energy_h = torch.einsum("bcij,bchj->bijh", q, k)
    energy_h = energy_h + torch.diag(torch.full((h,), float("-inf"), dtype=x.dtype))[None, :, None, :]
    # energy_W[b, i, j, w'] = q[b, :, i, j] . k[b, :, i, w']   (same row, self included)
    energy_w = torch.einsum("bcij,bciw->bijw", q, k)
    att = torch.softmax(torch.cat([energy_h, energy_w], dim=-1), dim=-1)
    att_h, att_w = att[..., :h], att[..., h:]
    out_h = torch.einsum("bijh,bchj->bcij", att_h, v)
    out_w = torch.einsum("bijw,bciw->bcij", att_w, v)
    return m.gamma * (out_h + out_w) + x


@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (1, 8, 4, 4), (1, 9, 1, 6)])
def test_matches_ccnet_reference(shape):
    m = CrissCrossAttention(shape[1]).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, y_ref = m(x1), ccnet_reference(m, x2)
    torch.testing.assert_close(y, y_ref, **TOL)
    dy = torch.randn_like(y)
    params = list(m.parameters())
    grads = torch.autograd.grad(y, [x1, *params], dy)
    grads_ref = torch.autograd.grad(y_ref, [x2, *params], dy)
    for name, g, gr in zip(["x"] + [n for n, _ in m.named_parameters()], grads, grads_ref):
        torch.testing.assert_close(g, gr, **TOL, msg=lambda msg: f"d/d{name}: {msg}")


def test_identity_at_init_and_bad_input():
    m = CrissCrossAttention(8)
    x = torch.randn(1, 8, 3, 3)
    assert torch.equal(m(x), x)
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\) with C = 8, got \(1, 4, 3, 3\)"):
        m(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"in_channels must be a positive int"):
        CrissCrossAttention(0)
