"""NonLocal2d (embedded gaussian) == our attention == torch.nn.MultiheadAttention; state_dict import.

The two public layouts are rebuilt here as plain modules with their own forward passes, written
from their published code's structure: "non_local_pytorch" (g, theta, phi, W = conv + BN; pooling
nested as g.0 / phi.0; concat_project.0 = 1x1 conv + ReLU) and "mmcv" (ConvModules: *.conv.weight,
norm "bn" after a bias-free conv_out.conv, concat_project.conv; use_scale on embedded gaussian).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nlgraph import NonLocal2d, NonLocal3d
from nlgraph.adapters import (mha_from_torch, mha_to_nonlocal, mha_to_torch, nonlocal_from_state_dict,
                              nonlocal_state_dict, nonlocal_to_mha)
from nlgraph.nonlocal_blocks import MODES

# float64 rounding bound, derived in tests/formulas.py (TOLERANCES)
TOL = dict(rtol=1e-9, atol=1e-10)


def _randomise(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.4)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=m.running_mean.dtype))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=m.running_var.dtype) + 0.5)
    return module


def _tokens(x):
    return x.flatten(2).transpose(1, 2)


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("use_scale", [False, True])
def test_nonlocal_equals_our_attention_equals_torch_mha(use_scale):
    block = _randomise(NonLocal2d(8, inter_channels=4, sub_sample=False, bn_layer=False, use_scale=use_scale)).double()
    ours = nonlocal_to_mha(block)
    theirs = mha_to_torch(ours)
    x = _x(2, 8, 5, 6)
    xs = [x.clone().requires_grad_(True) for _ in range(3)]
    z = _tokens(block(xs[0]))
    t1, t2 = _tokens(xs[1]), _tokens(xs[2])
    z1 = t1 + ours(t1)[0]
    z2 = t2 + theirs(t2, t2, t2, need_weights=False)[0]
    torch.testing.assert_close(z1, z, **TOL, msg=lambda m: f"ours vs block: {m}")
    torch.testing.assert_close(z2, z, **TOL, msg=lambda m: f"torch vs block: {m}")
    dz = torch.randn_like(z)
    for out in (z, z1, z2):
        out.backward(dz)
    for i in (1, 2):
        torch.testing.assert_close(xs[i].grad, xs[0].grad, **TOL, msg=lambda m: f"d/dx ({i}): {m}")
    # weight gradients, mapped through the conversion (q carries the folded logit scale alpha)
    d, c = 4, 8
    alpha = block.affinity().scale * math.sqrt(c)
    conv_grad = lambda conv: conv.weight.grad.reshape(conv.weight.shape[0], -1)  # noqa: E731
    ein, eout = theirs.in_proj_weight.grad.split(c), theirs.out_proj.weight.grad
    bin_ = theirs.in_proj_bias.grad.split(c)
    pairs = {
        "theta.weight": (conv_grad(block.theta), alpha * ours.q_proj.weight.grad[:d], alpha * ein[0][:d]),
        "theta.bias": (block.theta.bias.grad, alpha * ours.q_proj.bias.grad[:d], alpha * bin_[0][:d]),
        "phi.weight": (conv_grad(block.phi), ours.k_proj.weight.grad[:d], ein[1][:d]),
        "phi.bias": (block.phi.bias.grad, ours.k_proj.bias.grad[:d], bin_[1][:d]),
        "g.weight": (conv_grad(block.g), ours.v_proj.weight.grad[:d], ein[2][:d]),
        "g.bias": (block.g.bias.grad, ours.v_proj.bias.grad[:d], bin_[2][:d]),
        "W.weight": (conv_grad(block.W), ours.out_proj.weight.grad[:, :d], eout[:, :d]),
        "W.bias": (block.W.bias.grad, ours.out_proj.bias.grad, theirs.out_proj.bias.grad),
    }
    for name, (g_block, g_ours, g_torch) in pairs.items():
        torch.testing.assert_close(g_ours, g_block, **TOL, msg=lambda m: f"d/d{name} ours: {m}")
        torch.testing.assert_close(g_torch, g_block, **TOL, msg=lambda m: f"d/d{name} torch: {m}")


def test_sub_sampled_block_with_eval_bn_is_attention_over_pooled_keys():
    block = _randomise(NonLocal2d(6, sub_sample=True, bn_layer=True)).double().eval()
    mha = nonlocal_to_mha(block)
    theirs = mha_to_torch(mha)
    x = _x(2, 6, 6, 4).requires_grad_(True)
    _, k, v = block.embed(x)
    t = _tokens(x)
    z = _tokens(block(x))
    torch.testing.assert_close(t + mha(t, k, v)[0], z, **TOL)
    torch.testing.assert_close(t + theirs(t, k, v, need_weights=False)[0], z, **TOL)


def test_nonlocal3d_on_a_clip_is_attention_over_space_time_tokens():
    block = _randomise(NonLocal3d(6, inter_channels=3, sub_sample=False, bn_layer=False)).double()
    mha = nonlocal_to_mha(block)
    x = _x(2, 6, 3, 4, 4)
    t = _tokens(x)  # (B, T*H*W, C)
    torch.testing.assert_close(t + mha(t)[0], _tokens(block(x)), **TOL)


def test_mha_to_nonlocal_round_trip():
    from attention import MultiheadAttention

    mha = _randomise(MultiheadAttention(6, 1)).double()
    block = mha_to_nonlocal(mha)
    x = _x(2, 6, 3, 5)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    t = _tokens(x2)
    z_block, z_mha = _tokens(block(x1)), t + mha(t)[0]
    torch.testing.assert_close(z_block, z_mha, **TOL)
    dz = torch.randn_like(z_mha)
    z_block.backward(dz)
    z_mha.backward(dz)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    for conv, lin in ((block.theta, mha.q_proj), (block.phi, mha.k_proj), (block.g, mha.v_proj), (block.W, mha.out_proj)):
        torch.testing.assert_close(conv.weight.grad.reshape(lin.weight.shape), lin.weight.grad, **TOL)
        torch.testing.assert_close(conv.bias.grad, lin.bias.grad, **TOL)
    back = nonlocal_to_mha(block)
    torch.testing.assert_close(back(t)[0], mha(t)[0], **TOL)
    assert isinstance(mha_from_torch(mha_to_torch(mha)), MultiheadAttention)


# ---------------------------------------------------------------- the two public layouts, rebuilt


class _Pairwise:
    """The published pairwise functions (materialised N x M), shared by both rebuilt layouts."""

    @staticmethod
    def weights(mode, theta_x, phi_x, concat=None, scale=None):
        if mode in ("gaussian", "embedded_gaussian"):
            f = theta_x @ phi_x.transpose(1, 2)
            if scale is not None:
                f = f / scale
            return f.softmax(-1)
        if mode == "dot_product":
            f = theta_x @ phi_x.transpose(1, 2)
            return f / f.shape[-1]
        n, m = theta_x.shape[1], phi_x.shape[1]
        pair = torch.cat([theta_x[:, :, None, :].expand(-1, -1, m, -1), phi_x[:, None, :, :].expand(-1, n, -1, -1)], -1)
        f = concat(pair.permute(0, 3, 1, 2)).squeeze(1)
        return f / f.shape[-1]


class PortNonLocal2d(nn.Module):
    """The 'non_local_pytorch' layout: g, theta, phi, W (= conv + BN); pooling nested as .0."""

    def __init__(self, c, d, mode, sub_sample, bn_layer):
        super().__init__()
        self.mode, self.d = mode, d
        pool = nn.MaxPool2d((2, 2))
        self.g = nn.Conv2d(c, d, 1)
        if mode != "gaussian":
            self.theta = nn.Conv2d(c, d, 1)
            self.phi = nn.Conv2d(c, d, 1)
        if sub_sample:
            self.g = nn.Sequential(self.g, pool)
            self.phi = nn.Sequential(self.phi, pool) if mode != "gaussian" else pool
        elif mode == "gaussian":
            self.phi = nn.Identity()
        self.W = nn.Sequential(nn.Conv2d(d, c, 1), nn.BatchNorm2d(c)) if bn_layer else nn.Conv2d(d, c, 1)
        if mode == "concatenation":
            self.concat_project = nn.Sequential(nn.Conv2d(2 * d, 1, 1, bias=False), nn.ReLU())

    def forward(self, x):
        b = x.shape[0]
        g_x = _tokens(self.g(x))
        theta_x = _tokens(x) if self.mode == "gaussian" else _tokens(self.theta(x))
        phi_x = _tokens(self.phi(x))
        f = _Pairwise.weights(self.mode, theta_x, phi_x, getattr(self, "concat_project", None))
        y = (f @ g_x).transpose(1, 2).reshape(b, self.d, *x.shape[2:])
        return self.W(y) + x


class ConvModule(nn.Module):
    """mmcv's ConvModule as far as its state_dict goes: .conv (bias dropped before a norm), .bn, act."""

    def __init__(self, cin, cout, norm=False, bias=True, relu=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=bias and not norm)
        if norm:
            self.bn = nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x):
        x = self.conv(x)
        if hasattr(self, "bn"):
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MmcvNonLocal2d(nn.Module):
    """The 'mmcv' layout: ConvModules g/theta/phi/conv_out(/concat_project); use_scale on embedded gaussian."""

    def __init__(self, c, d, mode, sub_sample, bn_layer, use_scale):
        super().__init__()
        self.mode, self.d, self.use_scale = mode, d, use_scale
        pool = nn.MaxPool2d((2, 2))
        self.g = ConvModule(c, d)
        self.conv_out = ConvModule(d, c, norm=bn_layer)
        if mode != "gaussian":
            self.theta = ConvModule(c, d)
            self.phi = ConvModule(c, d)
        if mode == "concatenation":
            self.concat_project = ConvModule(2 * d, 1, bias=False, relu=True)
        if sub_sample:
            self.g = nn.Sequential(self.g, pool)
            self.phi = nn.Sequential(self.phi, pool) if mode != "gaussian" else pool
        elif mode == "gaussian":
            self.phi = nn.Identity()

    def forward(self, x):
        b = x.shape[0]
        g_x = _tokens(self.g(x))
        theta_x = _tokens(x) if self.mode == "gaussian" else _tokens(self.theta(x))
        phi_x = _tokens(self.phi(x))
        scale = math.sqrt(theta_x.shape[-1]) if (self.use_scale and self.mode == "embedded_gaussian") else None
        f = _Pairwise.weights(self.mode, theta_x, phi_x, getattr(self, "concat_project", None), scale)
        y = (f @ g_x).transpose(1, 2).reshape(b, self.d, *x.shape[2:])
        return x + self.conv_out(y)


@pytest.mark.parametrize("layout", ["non_local_pytorch", "mmcv"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("bn_layer", [False, True])
def test_state_dict_import(layout, mode, sub_sample, bn_layer):
    c, d = 6, 3
    use_scale = layout == "mmcv"
    if layout == "mmcv":
        src = MmcvNonLocal2d(c, d, mode, sub_sample, bn_layer, use_scale)
    else:
        src = PortNonLocal2d(c, d, mode, sub_sample, bn_layer)
    src = _randomise(src).double().eval()
    block = nonlocal_from_state_dict(src.state_dict(), layout, mode=mode, sub_sample=sub_sample,
                                     use_scale=use_scale).eval()
    assert block.bn_layer == bn_layer and (block.in_channels, block.inter_channels) == (c, d)
    x1 = _x(2, c, 6, 4).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    z_src, z = src(x1), block(x2)
    torch.testing.assert_close(z, z_src, **TOL, msg=lambda m: f"forward: {m}")
    dz = torch.randn_like(z)
    z_src.backward(dz)
    z.backward(dz)
    torch.testing.assert_close(x2.grad, x1.grad, **TOL, msg=lambda m: f"d/dx: {m}")


def test_adapter_errors():
    with pytest.raises(ValueError, match=r"layout must be one of"):
        nonlocal_state_dict({}, "timm")
    with pytest.raises(ValueError, match=r"keys not understood for layout 'mmcv': \['extra.weight'\]"):
        nonlocal_state_dict({"g.conv.weight": torch.zeros(3, 6, 1, 1), "conv_out.conv.weight": torch.zeros(6, 3, 1, 1),
                             "extra.weight": torch.zeros(1)}, "mmcv")
    with pytest.raises(ValueError, match=r"only the embedded_gaussian mode is attention"):
        nonlocal_to_mha(NonLocal2d(6, mode="dot_product"))
    with pytest.raises(ValueError, match=r"call block.eval\(\) first"):
        nonlocal_to_mha(NonLocal2d(6))
    from attention import MultiheadAttention

    with pytest.raises(ValueError, match=r"needs one head"):
        mha_to_nonlocal(MultiheadAttention(6, 2))
