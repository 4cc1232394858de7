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
    for name, g, gr in zip(["x"] + [n for n, _ in m.named_parameters()], grads, grads_ref, strict=True):
        torch.testing.assert_close(g, gr, **TOL, msg=lambda msg: f"d/d{name}: {msg}")


def test_identity_at_init_and_bad_input():
    m = CrissCrossAttention(8)
    x = torch.randn(1, 8, 3, 3)
    assert torch.equal(m(x), x)
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\) with C = 8, got \(1, 4, 3, 3\)"):
        m(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"in_channels must be a positive int"):
        CrissCrossAttention(0)


# ---------------------------------------------------------------- the CCNet and mmcv modules, rebuilt


class Scale(torch.nn.Module):
    """mmcv.cnn.Scale: x * a learnable scalar (a Parameter of shape ())."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x):
        return x * self.scale


class MmcvCrissCrossAttention(torch.nn.Module):
    """mmcv/ops/cc_attention.py (pure PyTorch since mmcv 1.3.13): einsum energies, NEG_INF_DIAG, Scale."""

    def __init__(self, in_channels):
        super().__init__()
        self.query_conv = torch.nn.Conv2d(in_channels, in_channels // 8, 1)
        self.key_conv = torch.nn.Conv2d(in_channels, in_channels // 8, 1)
        self.value_conv = torch.nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = Scale(0.0)
        self.in_channels = in_channels

    def forward(self, x):
        B, C, H, W = x.size()
        query, key, value = self.query_conv(x), self.key_conv(x), self.value_conv(x)
        neg_inf_diag = torch.diag(torch.tensor(float("-inf"), dtype=x.dtype).repeat(H), 0)
        energy_H = torch.einsum("bchw,bciw->bwhi", query, key) + neg_inf_diag
        energy_H = energy_H.transpose(1, 2)
        energy_W = torch.einsum("bchw,bchj->bhwj", query, key)
        attn = F.softmax(torch.cat([energy_H, energy_W], dim=-1), dim=-1)
        out = torch.einsum("bciw,bhwi->bchw", value, attn[..., :H])
        out = out + torch.einsum("bchj,bhwj->bchw", value, attn[..., H:])
        return (self.gamma(out) + x).contiguous()


class CCNetCrissCrossAttention(torch.nn.Module):
    """speedinghzl/CCNet's pure-PyTorch CrissCrossAttention (cc.py): bmm energies, INF diagonal, gamma."""

    def __init__(self, in_dim):
        super().__init__()
        self.query_conv = torch.nn.Conv2d(in_dim, in_dim // 8, 1)
        self.key_conv = torch.nn.Conv2d(in_dim, in_dim // 8, 1)
        self.value_conv = torch.nn.Conv2d(in_dim, in_dim, 1)
        self.softmax = torch.nn.Softmax(dim=3)
        self.gamma = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, _, h, w = x.size()
        inf = -torch.diag(torch.tensor(float("inf"), dtype=x.dtype).repeat(h), 0)
        inf = inf.unsqueeze(0).repeat(b * w, 1, 1)
        q = self.query_conv(x)
        q_h = q.permute(0, 3, 1, 2).contiguous().view(b * w, -1, h).permute(0, 2, 1)
        q_w = q.permute(0, 2, 1, 3).contiguous().view(b * h, -1, w).permute(0, 2, 1)
        k = self.key_conv(x)
        k_h = k.permute(0, 3, 1, 2).contiguous().view(b * w, -1, h)
        k_w = k.permute(0, 2, 1, 3).contiguous().view(b * h, -1, w)
        v = self.value_conv(x)
        v_h = v.permute(0, 3, 1, 2).contiguous().view(b * w, -1, h)
        v_w = v.permute(0, 2, 1, 3).contiguous().view(b * h, -1, w)
        energy_h = (torch.bmm(q_h, k_h) + inf).view(b, w, h, h).permute(0, 2, 1, 3)
        energy_w = torch.bmm(q_w, k_w).view(b, h, w, w)
        concate = self.softmax(torch.cat([energy_h, energy_w], 3))
        att_h = concate[:, :, :, 0:h].permute(0, 2, 1, 3).contiguous().view(b * w, h, h)
        att_w = concate[:, :, :, h:h + w].contiguous().view(b * h, w, w)
        out_h = torch.bmm(v_h, att_h.permute(0, 2, 1)).view(b, w, -1, h).permute(0, 2, 3, 1)
        out_w = torch.bmm(v_w, att_w.permute(0, 2, 1)).view(b, h, -1, w).permute(0, 2, 1, 3)
        return self.gamma * (out_h + out_w) + x


@pytest.mark.parametrize("layout,cls", [("mmcv", MmcvCrissCrossAttention),
                                        ("ccnet", CCNetCrissCrossAttention)])
def test_peer_state_dicts_load_into_ours(layout, cls):
    from nlgraph.adapters import criss_cross_from_state_dict

    torch.manual_seed(0)
    src = cls(16).double()
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(0.3 * torch.randn_like(p))  # gamma no longer zero
    if layout == "mmcv":
        assert src.state_dict()["gamma.scale"].shape == ()
    ours = criss_cross_from_state_dict(src.state_dict(), layout)
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_src, y = src(x1), ours(x2)
    torch.testing.assert_close(y, y_src, **TOL)
    dy = torch.randn_like(y)
    y_src.backward(dy)
    y.backward(dy)
    torch.testing.assert_close(x2.grad, x1.grad, **TOL)
    for name, p in src.named_parameters():
        mine = dict(ours.named_parameters())[name.replace("gamma.scale", "gamma")].grad
        torch.testing.assert_close(mine.reshape(p.grad.shape), p.grad, **TOL, msg=lambda m: f"d/d{name}: {m}")
    # whole-model state_dicts: the prefix is found; copies, not views
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), torch.nn.Sequential(src)).double()
    again = criss_cross_from_state_dict(model.state_dict(), layout)
    assert again.query_conv.weight.data_ptr() != src.query_conv.weight.data_ptr()
    torch.testing.assert_close(again(x), src(x), **TOL)


def test_criss_cross_adapter_errors():
    from nlgraph.adapters import criss_cross_from_state_dict

    sd = MmcvCrissCrossAttention(16).state_dict()
    with pytest.raises(ValueError, match=r"layout must be one of \('ccnet', 'mmcv'\)"):
        criss_cross_from_state_dict(sd, "timm")
    with pytest.raises(ValueError, match=r"no ccnet CrissCrossAttention found"):
        criss_cross_from_state_dict(sd, "ccnet")  # mmcv's keys: gamma.scale, not gamma
    with pytest.raises(ValueError, match=r"lacks \['key_conv.bias'\]"):
        criss_cross_from_state_dict({k: v for k, v in sd.items() if k != "key_conv.bias"}, "mmcv")
    with pytest.raises(ValueError, match=r"keys not understood for layout 'mmcv': \['extra'\]"):
        criss_cross_from_state_dict({**sd, "extra": torch.zeros(1)}, "mmcv")
    with pytest.raises(ValueError, match=r"key_channels must be a positive int"):
        CrissCrossAttention(8, key_channels=0)
