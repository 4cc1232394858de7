"""NonLocal2d (embedded gaussian) == our attention == torch.nn.MultiheadAttention; public layouts in and out.

The three public layouts are rebuilt here as plain modules with their own forward passes, written
from their published code (same module tree, hence the same state_dict keys, and the same forward
arithmetic):

* "non_local_pytorch" (AlexHex7/Non-local_pytorch, lib/non_local_*.py): g, theta, phi, W (= conv or
  conv + BN); sub-sampling wraps g and phi as Sequential(conv, maxpool) (gaussian: phi = maxpool);
  concat_project = Sequential(Conv2d(2d, 1, bias=False), ReLU).
* "mmcv" (mmcv/cnn/bricks/non_local.py): g/theta/phi/conv_out ConvModules (.conv, norm "bn" or "gn"
  with the conv's bias dropped), the same pooling nesting, concat_project a bias-free ConvModule
  with ReLU; use_scale (default True) divides embedded-gaussian logits by sqrt(inter_channels).
* "timm" (timm/layers/non_local_attn.py, NonLocalAttn): t/p/g/z convs + norm (BatchNorm2d), logits
  times in_channels ** -0.5 when use_scale (default True), rd_channels = make_divisible(C / 8, 8).

float64 throughout; every compared number is a short sum of O(1) terms (softmax over <= 48 keys,
1x1 convs over <= 8 channels), so rtol 1e-9 / atol 1e-10 is ~1e5 times float64 roundoff.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nlgraph import NonLocal1d, NonLocal2d, NonLocal3d
from nlgraph.adapters import (
    mha_from_torch,
    mha_to_nonlocal,
    mha_to_torch,
    nonlocal_from_state_dict,
    nonlocal_state_dict,
    nonlocal_to_mha,
    nonlocal_to_state_dict,
)
from nlgraph.nonlocal_blocks import MODES

# float64 rounding bound, derived in tests/formulas.py (TOLERANCES)
TOL = dict(rtol=1e-9, atol=1e-10)
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {1: lambda: nn.MaxPool1d(2), 2: lambda: nn.MaxPool2d((2, 2)), 3: lambda: nn.MaxPool3d((1, 2, 2))}
INPUT = {1: (2, 6, 8), 2: (2, 6, 6, 4), 3: (2, 6, 2, 4, 4)}


def _randomise(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.4)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                mean, var = m.running_mean, m.running_var
                mean.copy_(torch.randn(mean.shape, generator=gen, dtype=mean.dtype))
                var.copy_(torch.rand(var.shape, generator=gen, dtype=var.dtype) + 0.5)
    return module


def _tokens(x):
    return x.flatten(2).transpose(1, 2)


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _same_function(src, block, shape, train=False, seed=1):
    """src(x) == block(x) and d/dx equal, in eval (or train) mode."""
    src.train(train)
    block.train(train)
    x1 = _x(*shape, seed=seed).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    z_src, z = src(x1), block(x2)
    torch.testing.assert_close(z, z_src, **TOL, msg=lambda m: f"forward: {m}")
    dz = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=z.dtype)
    z_src.backward(dz)
    z.backward(dz)
    torch.testing.assert_close(x2.grad, x1.grad, **TOL, msg=lambda m: f"d/dx: {m}")


# ---------------------------------------------------------------- non-local block <-> attention


@pytest.mark.parametrize("use_scale", [False, True])
def test_nonlocal_equals_our_attention_equals_torch_mha(use_scale):
    block = _randomise(NonLocal2d(8, inter_channels=4, sub_sample=False, bn_layer=False,
                                  use_scale=use_scale)).double()
    ours = nonlocal_to_mha(block)
    theirs = mha_to_torch(ours)
    x = _x(2, 8, 5, 6)
    xs = [x.clone().requires_grad_(True) for _ in range(3)]
    z = _tokens(block(xs[0]))
    t1, t2 = _tokens(xs[1]), _tokens(xs[2])
    z1 = t1 + ours(t1, t1, t1, need_weights=False)[0]
    z2 = t2 + theirs(t2, t2, t2, need_weights=False)[0]
    torch.testing.assert_close(z1, z, **TOL, msg=lambda m: f"ours vs block: {m}")
    torch.testing.assert_close(z2, z, **TOL, msg=lambda m: f"torch vs block: {m}")
    dz = torch.randn_like(z)
    for out in (z, z1, z2):
        out.backward(dz)
    for i in (1, 2):
        torch.testing.assert_close(xs[i].grad, xs[0].grad, **TOL, msg=lambda m, i=i: f"d/dx ({i}): {m}")
    # weight gradients, mapped through the conversion (q carries the folded logit scale alpha)
    d, c = 4, 8
    alpha = block.affinity().scale * math.sqrt(c)
    conv_grad = lambda conv: conv.weight.grad.reshape(conv.weight.shape[0], -1)  # noqa: E731
    for mha, who in ((ours, "ours"), (theirs, "torch")):
        ein, bin_ = mha.in_proj_weight.grad.split(c), mha.in_proj_bias.grad.split(c)
        pairs = {
            "theta.weight": (conv_grad(block.theta), alpha * ein[0][:d]),
            "theta.bias": (block.theta.bias.grad, alpha * bin_[0][:d]),
            "phi.weight": (conv_grad(block.phi), ein[1][:d]),
            "phi.bias": (block.phi.bias.grad, bin_[1][:d]),
            "g.weight": (conv_grad(block.g), ein[2][:d]),
            "g.bias": (block.g.bias.grad, bin_[2][:d]),
            "W.weight": (conv_grad(block.W), mha.out_proj.weight.grad[:, :d]),
            "W.bias": (block.W.bias.grad, mha.out_proj.bias.grad),
        }
        for name, (g_block, g_mha) in pairs.items():
            torch.testing.assert_close(g_mha, g_block, **TOL,
                                       msg=lambda m, name=name, who=who: f"d/d{name} {who}: {m}")


def test_sub_sampled_block_with_eval_bn_is_attention_over_pooled_keys():
    block = _randomise(NonLocal2d(6, sub_sample=True, bn_layer=True)).double().eval()
    mha = nonlocal_to_mha(block)
    theirs = mha_to_torch(mha)
    x = _x(2, 6, 6, 4).requires_grad_(True)
    _, k, v = block.embed(x)
    t = _tokens(x)
    z = _tokens(block(x))
    torch.testing.assert_close(t + mha(t, k, v, need_weights=False)[0], z, **TOL)
    torch.testing.assert_close(t + theirs(t, k, v, need_weights=False)[0], z, **TOL)


def test_nonlocal3d_on_a_clip_is_attention_over_space_time_tokens():
    block = _randomise(NonLocal3d(6, inter_channels=3, sub_sample=False, bn_layer=False)).double()
    mha = nonlocal_to_mha(block)
    x = _x(2, 6, 3, 4, 4)
    t = _tokens(x)  # (B, T*H*W, C)
    torch.testing.assert_close(t + mha(t, t, t)[0], _tokens(block(x)), **TOL)


def test_mha_to_nonlocal_round_trip():
    from attention import MultiheadAttention

    mha = _randomise(MultiheadAttention(6, 1, batch_first=True)).double()
    block = mha_to_nonlocal(mha)
    x = _x(2, 6, 3, 5)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    t = _tokens(x2)
    z_block, z_mha = _tokens(block(x1)), t + mha(t, t, t, need_weights=False)[0]
    torch.testing.assert_close(z_block, z_mha, **TOL)
    dz = torch.randn_like(z_mha)
    z_block.backward(dz)
    z_mha.backward(dz)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    e = 6
    win, bin_ = mha.in_proj_weight.grad.split(e), mha.in_proj_bias.grad.split(e)
    out_grads = (mha.out_proj.weight.grad, mha.out_proj.bias.grad)
    for conv, w, b in ((block.theta, win[0], bin_[0]), (block.phi, win[1], bin_[1]),
                       (block.g, win[2], bin_[2]), (block.W, *out_grads)):
        torch.testing.assert_close(conv.weight.grad.reshape(w.shape), w, **TOL)
        torch.testing.assert_close(conv.bias.grad, b, **TOL)
    back = nonlocal_to_mha(block)
    torch.testing.assert_close(back(t, t, t)[0], mha(t, t, t)[0], **TOL)
    assert isinstance(mha_from_torch(mha_to_torch(mha)), MultiheadAttention)


# ---------------------------------------------------------------- the public layouts, rebuilt


def _pairwise(mode, theta_x, phi_x, concat=None, scale=None):
    """The published pairwise functions (materialised N x M), shared by the rebuilt layouts."""
    if mode in ("gaussian", "embedded_gaussian"):
        f = theta_x @ phi_x.transpose(1, 2)
        if scale is not None:
            f = f * scale
        return f.softmax(-1)
    if mode == "dot_product":
        f = theta_x @ phi_x.transpose(1, 2)
        return f / f.shape[-1]
    n, m = theta_x.shape[1], phi_x.shape[1]
    pair = torch.cat([theta_x[:, :, None, :].expand(-1, -1, m, -1),
                      phi_x[:, None, :, :].expand(-1, n, -1, -1)], -1)
    f = concat(pair.permute(0, 3, 1, 2)).squeeze(1)
    return f / f.shape[-1]


class PortNonLocal(nn.Module):
    """The 'non_local_pytorch' layout: g, theta, phi, W (= conv + BN); pooling nested as .0."""

    def __init__(self, dim, c, d, mode, sub_sample, bn_layer):
        super().__init__()
        self.mode, self.d = mode, d
        conv = CONV[dim]
        self.g = conv(c, d, 1)
        if mode != "gaussian":
            self.theta = conv(c, d, 1)
            self.phi = conv(c, d, 1)
        if sub_sample:
            self.g = nn.Sequential(self.g, POOL[dim]())
            self.phi = nn.Sequential(self.phi, POOL[dim]()) if mode != "gaussian" else POOL[dim]()
        elif mode == "gaussian":
            self.phi = nn.Identity()
        self.W = nn.Sequential(conv(d, c, 1), BN[dim](c)) if bn_layer else conv(d, c, 1)
        if mode == "concatenation":
            self.concat_project = nn.Sequential(nn.Conv2d(2 * d, 1, 1, bias=False), nn.ReLU())

    def forward(self, x):
        b = x.shape[0]
        g_x = _tokens(self.g(x))
        theta_x = _tokens(x) if self.mode == "gaussian" else _tokens(self.theta(x))
        phi_x = _tokens(self.phi(x))
        f = _pairwise(self.mode, theta_x, phi_x, getattr(self, "concat_project", None))
        y = (f @ g_x).transpose(1, 2).reshape(b, self.d, *x.shape[2:])
        return self.W(y) + x


class ConvModule(nn.Module):
    """mmcv's ConvModule as far as its state_dict and forward go: .conv (no bias before a norm), .bn/.gn."""

    def __init__(self, dim, cin, cout, norm=None, groups=None, bias=True, relu=False):
        super().__init__()
        self.conv = (nn.Conv2d if dim is None else CONV[dim])(cin, cout, 1, bias=bias and norm is None)
        self.norm_name = norm
        if norm == "bn":
            self.bn = BN[dim](cout)
        elif norm == "gn":
            self.gn = nn.GroupNorm(groups, cout)
        self.relu = relu

    def forward(self, x):
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        return F.relu(x) if self.relu else x


class MmcvNonLocal(nn.Module):
    """The 'mmcv' layout: ConvModules g/theta/phi/conv_out(/concat_project); use_scale on embedded
    gaussian."""

    def __init__(self, dim, c, d, mode, sub_sample, norm, use_scale=True, groups=None):
        super().__init__()
        self.mode, self.d, self.use_scale, self.sub_sample = mode, d, use_scale, sub_sample
        self.g = ConvModule(dim, c, d)
        self.conv_out = ConvModule(dim, d, c, norm=norm, groups=groups)
        if mode != "gaussian":
            self.theta = ConvModule(dim, c, d)
            self.phi = ConvModule(dim, c, d)
        if mode == "concatenation":
            self.concat_project = ConvModule(None, 2 * d, 1, bias=False, relu=True)  # no conv_cfg: Conv2d
        if sub_sample:
            self.g = nn.Sequential(self.g, POOL[dim]())
            self.phi = nn.Sequential(self.phi, POOL[dim]()) if mode != "gaussian" else POOL[dim]()

    def forward(self, x):
        b = x.shape[0]
        g_x = _tokens(self.g(x))
        theta_x = _tokens(x) if self.mode == "gaussian" else _tokens(self.theta(x))
        if self.mode == "gaussian":
            phi_x = _tokens(self.phi(x)) if self.sub_sample else _tokens(x)
        else:
            phi_x = _tokens(self.phi(x))
        scale = theta_x.shape[-1] ** -0.5 if (self.use_scale and self.mode == "embedded_gaussian") else None
        f = _pairwise(self.mode, theta_x, phi_x, getattr(self, "concat_project", None), scale)
        y = (f @ g_x).transpose(1, 2).reshape(b, self.d, *x.shape[2:])
        return x + self.conv_out(y)


def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    """timm.layers.helpers.make_divisible."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class TimmNonLocalAttn(nn.Module):
    """timm.layers.NonLocalAttn: t/p/g/z convs, norm = BatchNorm2d, logits * in_channels ** -0.5."""

    def __init__(self, in_channels, use_scale=True, rd_ratio=1 / 8, rd_channels=None, rd_divisor=8):
        super().__init__()
        if rd_channels is None:
            rd_channels = make_divisible(in_channels * rd_ratio, divisor=rd_divisor)
        self.scale = in_channels ** -0.5 if use_scale else 1.0
        self.t = nn.Conv2d(in_channels, rd_channels, kernel_size=1, stride=1, bias=True)
        self.p = nn.Conv2d(in_channels, rd_channels, kernel_size=1, stride=1, bias=True)
        self.g = nn.Conv2d(in_channels, rd_channels, kernel_size=1, stride=1, bias=True)
        self.z = nn.Conv2d(rd_channels, in_channels, kernel_size=1, stride=1, bias=True)
        self.norm = nn.BatchNorm2d(in_channels)

    def forward(self, x):
        shortcut = x
        t, p, g = self.t(x), self.p(x), self.g(x)
        B, C, H, W = t.size()
        t = t.view(B, C, -1).permute(0, 2, 1)
        p = p.view(B, C, -1)
        g = g.view(B, C, -1).permute(0, 2, 1)
        att = torch.bmm(t, p) * self.scale
        att = F.softmax(att, dim=2)
        x = torch.bmm(att, g)
        x = x.permute(0, 2, 1).reshape(B, C, H, W)
        x = self.z(x)
        return self.norm(x) + shortcut


def _peer(layout, dim, mode, sub_sample, norm, c=6, d=3, use_scale=True, groups=None):
    if layout == "mmcv":
        src = MmcvNonLocal(dim, c, d, mode, sub_sample, norm, use_scale=use_scale, groups=groups)
    else:
        src = PortNonLocal(dim, c, d, mode, sub_sample, norm == "bn")
    return _randomise(src).double()


# ---------------------------------------------------------------- import: everything read from the keys


@pytest.mark.parametrize("layout", ["non_local_pytorch", "mmcv"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("norm", [None, "bn"])
def test_state_dict_import_with_defaults(layout, mode, sub_sample, norm):
    """Only the layout named (and mode where the keys cannot tell embedded gaussian from dot product)."""
    src = _peer(layout, 2, mode, sub_sample, norm)  # mmcv: use_scale=True, its default
    block = nonlocal_from_state_dict(src.state_dict(), layout,
                                     mode="dot_product" if mode == "dot_product" else None)
    assert (block.mode, block.sub_sample, block.bn_layer) == (mode, sub_sample, norm == "bn")
    assert (block.in_channels, block.inter_channels) == (6, 3)
    _same_function(src, block, INPUT[2])
    if norm == "bn":
        _same_function(src, block, INPUT[2], train=True)  # batch statistics


@pytest.mark.parametrize("layout", ["non_local_pytorch", "mmcv"])
@pytest.mark.parametrize("dim", [1, 3])
@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian"])
def test_state_dict_import_1d_and_3d(layout, dim, mode):
    src = _peer(layout, dim, mode, True, "bn")
    block = nonlocal_from_state_dict(src.state_dict(), layout)
    assert type(block) is {1: NonLocal1d, 3: NonLocal3d}[dim] and block.sub_sample
    _same_function(src, block, INPUT[dim])


def test_mmcv_use_scale_defaults_to_true_and_can_be_turned_off():
    for use_scale in (True, False):
        src = _peer("mmcv", 2, "embedded_gaussian", False, None, use_scale=use_scale)
        kw = {} if use_scale else {"use_scale": False}
        block = nonlocal_from_state_dict(src.state_dict(), "mmcv", **kw)
        assert block.use_scale == use_scale
        _same_function(src, block, INPUT[2])


@pytest.mark.parametrize("sub_sample", [False, True])
def test_mmcv_group_norm(sub_sample):
    src = _peer("mmcv", 2, "embedded_gaussian", sub_sample, "gn", groups=3)
    sd = src.state_dict()
    block = nonlocal_from_state_dict(sd, "mmcv", norm_cfg=dict(type="GN", num_groups=3, requires_grad=True))
    assert isinstance(block.W[1], nn.GroupNorm) and block.W[1].num_groups == 3
    _same_function(src, block, INPUT[2])
    with pytest.raises(ValueError, match=r"GroupNorm \(conv_out.gn.\*\) .* pass norm_cfg=dict\(type='GN'"):
        nonlocal_from_state_dict(sd, "mmcv")
    with pytest.raises(ValueError, match=r"norm_cfg type 'BN' contradicts the state_dict, which records "
                                         r"conv_out.gn"):
        nonlocal_from_state_dict(sd, "mmcv", norm_cfg=dict(type="BN"))
    with pytest.raises(ValueError, match=r"num_groups=4 does not divide in_channels=6"):
        nonlocal_from_state_dict(sd, "mmcv", norm_cfg=dict(type="GN", num_groups=4))
    with pytest.raises(ValueError, match=r"needs num_groups"):
        nonlocal_from_state_dict(sd, "mmcv", norm_cfg=dict(type="GN"))
    with pytest.raises(ValueError, match=r"norm_cfg type must be one of"):
        nonlocal_from_state_dict(sd, "mmcv", norm_cfg=dict(type="LN"))
    with pytest.raises(ValueError, match=r"is no per-token linear map"):
        nonlocal_to_mha(block.eval())


def test_mmcv_sync_bn_config_and_eps():
    src = _peer("mmcv", 2, "embedded_gaussian", False, "bn")
    src.conv_out.bn.eps = 1e-3
    block = nonlocal_from_state_dict(src.state_dict(), "mmcv", norm_cfg=dict(type="SyncBN", eps=1e-3))
    assert isinstance(block.W[1], nn.BatchNorm2d) and block.W[1].eps == 1e-3
    _same_function(src, block, INPUT[2])


@pytest.mark.parametrize("layout", ["non_local_pytorch", "mmcv"])
def test_explicit_arguments_that_contradict_the_keys(layout):
    pooled = _peer(layout, 2, "embedded_gaussian", True, "bn").state_dict()
    plain = _peer(layout, 2, "embedded_gaussian", False, None).state_dict()
    g0 = "g.0.weight" if layout == "non_local_pytorch" else "g.0.conv.weight"
    with pytest.raises(ValueError, match=rf"sub_sample=False contradicts the {layout} state_dict: '{g0}' "
                                         r"records a max-pool after g"):
        nonlocal_from_state_dict(pooled, layout, sub_sample=False)
    with pytest.raises(ValueError, match=r"sub_sample=True contradicts .* records g without pooling"):
        nonlocal_from_state_dict(plain, layout, sub_sample=True)
    # consistent explicit arguments are fine
    nonlocal_from_state_dict(pooled, layout, "embedded_gaussian", True, layout == "mmcv")
    gauss = _peer(layout, 2, "gaussian", False, None).state_dict()
    with pytest.raises(ValueError, match=r"mode='embedded_gaussian' contradicts .* 'gaussian' \(no theta"):
        nonlocal_from_state_dict(gauss, layout, mode="embedded_gaussian")
    concat = _peer(layout, 2, "concatenation", False, None).state_dict()
    with pytest.raises(ValueError, match=r"mode='dot_product' contradicts .* 'concatenation' \(a concat_pro"):
        nonlocal_from_state_dict(concat, layout, mode="dot_product")
    with pytest.raises(ValueError, match=r"mode='concatenation' contradicts .* it has no concat_project"):
        nonlocal_from_state_dict(plain, layout, mode="concatenation")
    with pytest.raises(ValueError, match=r"mode must be None \(read from the keys\) or one of"):
        nonlocal_from_state_dict(plain, layout, mode="softmax")
    with pytest.raises(TypeError, match=r"sub_sample must be None \(the default\) or a bool, got 1"):
        nonlocal_from_state_dict(plain, layout, sub_sample=1)


@pytest.mark.parametrize("layout", ["non_local_pytorch", "mmcv"])
def test_missing_and_unknown_keys_are_value_errors_naming_them(layout):
    sd = _peer(layout, 2, "embedded_gaussian", True, "bn").state_dict()
    theta_b = "theta.bias" if layout == "non_local_pytorch" else "theta.conv.bias"
    missing = {k: v for k, v in sd.items() if k != theta_b}
    with pytest.raises(ValueError, match=rf"lacks \['{theta_b}'\]"):
        nonlocal_state_dict(missing, layout)
    with pytest.raises(ValueError, match=rf"not understood for layout '{layout}' .*: \['extra.weight'\]"):
        nonlocal_state_dict({**sd, "extra.weight": torch.zeros(1)}, layout)
    # phi pooled but g not: the state_dict is inconsistent, and the message names the keys
    phi_key = "phi.0.weight" if layout == "non_local_pytorch" else "phi.0.conv.weight"
    g_keys = [k for k in sd if k.startswith("g.0.")]
    odd = {(k.replace("g.0.", "g.", 1) if k in g_keys else k): v for k, v in sd.items()}
    g_plain = g_keys[0].replace("g.0.", "g.")
    with pytest.raises(ValueError, match=rf"inconsistent: '{g_plain}' says sub_sample=False "
                                         rf"but '{phi_key}' says sub_sample=True"):
        nonlocal_state_dict(odd, layout)
    # a BN saved before num_batches_tracked existed (torch < 0.4.1) still loads
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    nonlocal_from_state_dict(old, layout)
    with pytest.raises(ValueError, match=r"W.0.weight: the state_dict's tensor has shape \(6, 2, 1, 1\)"):
        w_key = "W.0.weight" if layout == "non_local_pytorch" else "conv_out.conv.weight"
        nonlocal_from_state_dict({**sd, w_key: torch.zeros(6, 2, 1, 1, dtype=torch.float64)}, layout)


def test_whole_model_state_dicts_and_prefixes():
    class Head(nn.Module):
        def __init__(self, nl):
            super().__init__()
            self.conv_seg = nn.Conv2d(6, 4, 1)
            self.nl_block = nl

    class Model(nn.Module):
        def __init__(self, *heads):
            super().__init__()
            self.backbone = nn.Conv2d(3, 6, 3)
            self.decode_head = heads[0]
            if len(heads) > 1:
                self.auxiliary_head = heads[1]

    src = _peer("mmcv", 2, "embedded_gaussian", True, "bn")
    model = Model(Head(src)).double()
    sd = model.state_dict()
    block = nonlocal_from_state_dict(sd, "mmcv")  # prefix found: decode_head.nl_block.
    _same_function(src, block, INPUT[2])
    for prefix in ("decode_head.nl_block.", "decode_head.nl_block"):
        _same_function(src, nonlocal_from_state_dict(sd, "mmcv", prefix=prefix), INPUT[2])
    with pytest.raises(ValueError, match=r"no key of the state_dict starts with prefix 'head.nl.'"):
        nonlocal_from_state_dict(sd, "mmcv", prefix="head.nl")
    with pytest.raises(ValueError, match=r"no mmcv non-local block found in the state_dict"):
        nonlocal_from_state_dict({"backbone.weight": torch.zeros(1)}, "mmcv")
    two = Model(Head(src), Head(_peer("mmcv", 2, "gaussian", False, None))).double().state_dict()
    with pytest.raises(ValueError, match=r"several mmcv non-local blocks, at prefixes "
                                         r"\['auxiliary_head.nl_block.', 'decode_head.nl_block.'\]; "
                                         r"pass prefix="):
        nonlocal_from_state_dict(two, "mmcv")
    aux = nonlocal_from_state_dict(two, "mmcv", prefix="auxiliary_head.nl_block.")
    assert aux.mode == "gaussian"
    with pytest.raises(ValueError, match=r"lacks \['decode_head.nl_block.theta.conv.bias'\]"):
        nonlocal_from_state_dict({k: v for k, v in sd.items() if k != "decode_head.nl_block.theta.conv.bias"},
                                 "mmcv")


def test_returned_dicts_hold_copies():
    src = _peer("mmcv", 2, "embedded_gaussian", False, "bn")
    sd = src.state_dict()
    out = nonlocal_state_dict(sd, "mmcv")
    ptrs = {v.data_ptr() for v in sd.values()}
    assert not any(v.data_ptr() in ptrs for v in out.values())
    block = nonlocal_from_state_dict(sd, "mmcv")
    before = block.g.weight.detach().clone()
    with torch.no_grad():
        src.g.conv.weight.add_(1.0)  # the caller edits its model after the conversion
    assert torch.equal(block.g.weight, before)
    exported = nonlocal_to_state_dict(block, "mmcv")
    bptrs = {v.data_ptr() for v in block.state_dict().values()}
    assert not any(v.data_ptr() in bptrs for v in exported.values())


# ---------------------------------------------------------------- timm, both directions; export round trips


@pytest.mark.parametrize("use_scale", [True, False])
@pytest.mark.parametrize("c", [16, 40])
def test_timm_nonlocal_attn_import(use_scale, c):
    src = _randomise(TimmNonLocalAttn(c, use_scale=use_scale)).double()
    assert src.t.out_channels == make_divisible(c / 8)  # timm's own reduction rule (8, 8)
    block = nonlocal_from_state_dict(src.state_dict(), "timm", **({} if use_scale else {"use_scale": False}))
    arch = (block.in_channels, block.inter_channels, block.bn_layer, block.sub_sample)
    assert arch == (c, src.t.out_channels, True, False)
    shape = (2, c, 5, 4)
    _same_function(src, block, shape)
    _same_function(src, block, shape, train=True)


@pytest.mark.parametrize("use_scale_block", [False, True])
@pytest.mark.parametrize("use_scale_timm", [True, False])
def test_timm_nonlocal_attn_export(use_scale_block, use_scale_timm):
    block = _randomise(NonLocal2d(16, inter_channels=8, sub_sample=False, use_scale=use_scale_block)).double()
    sd = nonlocal_to_state_dict(block, "timm", use_scale=use_scale_timm)
    peer = TimmNonLocalAttn(16, use_scale=use_scale_timm).double()  # rd_channels = make_divisible(2) = 8
    peer.load_state_dict(sd)  # strict
    back = nonlocal_from_state_dict(sd, "timm", use_scale=use_scale_timm)
    _same_function(peer, block, (2, 16, 4, 5))
    _same_function(peer, back, (2, 16, 4, 5))
    _same_function(peer, block, (2, 16, 4, 5), train=True)  # (updates both BNs' running statistics alike)


def test_timm_refusals():
    sd = _randomise(TimmNonLocalAttn(16)).double().state_dict()
    with pytest.raises(ValueError, match=r"mode='dot_product' contradicts the timm state_dict, which records "
                                         r"'embedded_gaussian'"):
        nonlocal_from_state_dict(sd, "timm", mode="dot_product")
    with pytest.raises(ValueError, match=r"sub_sample=True .* \(timm's NonLocalAttn never sub-samples\)"):
        nonlocal_from_state_dict(sd, "timm", sub_sample=True)
    with pytest.raises(ValueError, match=r"norm_cfg is mmcv's argument"):
        nonlocal_from_state_dict(sd, "timm", norm_cfg=dict(type="BN"))
    with pytest.raises(ValueError, match=r"timm's NonLocalAttn is a 2-D embedded-gaussian block without "):
        nonlocal_to_state_dict(NonLocal2d(16, sub_sample=True), "timm")
    with pytest.raises(ValueError, match=r"timm's NonLocalAttn is a 2-D"):
        nonlocal_to_state_dict(NonLocal2d(16, bn_layer=False, sub_sample=False), "timm")


@pytest.mark.parametrize("layout", ["non_local_pytorch", "mmcv"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub_sample,norm", [(False, None), (True, "bn")])
def test_export_loads_into_the_peer(layout, mode, sub_sample, norm):
    block = _randomise(NonLocal2d(6, inter_channels=3, mode=mode, sub_sample=sub_sample,
                                  bn_layer=norm == "bn", use_scale=False)).double()
    sd = nonlocal_to_state_dict(block, layout)  # mmcv: W[0].bias folded into BN's running_mean
    peer = _peer(layout, 2, mode, sub_sample, norm)  # mmcv: use_scale=True; the ratio went into theta
    peer.load_state_dict(sd)  # strict
    _same_function(peer, block, INPUT[2])
    if norm == "bn":
        _same_function(peer, block, INPUT[2], train=True)


def test_export_errors():
    src = _peer("mmcv", 2, "embedded_gaussian", False, "gn", groups=3)
    block = nonlocal_from_state_dict(src.state_dict(), "mmcv", norm_cfg=dict(type="GN", num_groups=3))
    src.load_state_dict(nonlocal_to_state_dict(block, "mmcv"))  # zero conv bias: fine
    with torch.no_grad():
        block.W[0].bias.add_(0.1)
    with pytest.raises(ValueError, match=r"non-zero W\[0\].bias does not fold into GroupNorm"):
        nonlocal_to_state_dict(block, "mmcv")
    with pytest.raises(ValueError, match=r"not GroupNorm"):
        nonlocal_to_state_dict(block, "non_local_pytorch")
    with pytest.raises(ValueError, match=r"non_local_pytorch's blocks have no logit scale"):
        nonlocal_to_state_dict(NonLocal2d(6), "non_local_pytorch", use_scale=True)
    with pytest.raises(TypeError, match=r"expects a NonLocal1d/2d/3d block"):
        nonlocal_to_state_dict(nn.Conv2d(1, 1, 1), "mmcv")


def test_adapter_errors():
    with pytest.raises(ValueError, match=r"layout must be one of \('non_local_pytorch', 'mmcv', 'timm'\)"):
        nonlocal_state_dict({}, "caffe2")
    with pytest.raises(ValueError, match=r"keys not understood for layout 'mmcv' .*: \['extra.weight'\]"):
        nonlocal_state_dict({"g.conv.weight": torch.zeros(3, 6, 1, 1), "g.conv.bias": torch.zeros(3),
                             "conv_out.conv.weight": torch.zeros(6, 3, 1, 1),
                             "conv_out.conv.bias": torch.zeros(6), "extra.weight": torch.zeros(1)}, "mmcv")
    with pytest.raises(TypeError, match=r"state_dict must be a mapping"):
        nonlocal_state_dict([1, 2], "mmcv")
    with pytest.raises(ValueError, match=r"only the embedded_gaussian mode is attention"):
        nonlocal_to_mha(NonLocal2d(6, mode="dot_product"))
    with pytest.raises(ValueError, match=r"call block.eval\(\) first"):
        nonlocal_to_mha(NonLocal2d(6))
    from attention import MultiheadAttention

    with pytest.raises(ValueError, match=r"needs one head"):
        mha_to_nonlocal(MultiheadAttention(6, 2))
    with pytest.raises(TypeError, match=r"dim must be the int 1, 2 or 3, got float 2.0"):
        mha_to_nonlocal(MultiheadAttention(6, 1), dim=2.0)
    with pytest.raises(ValueError, match=r"dim must be 1, 2 or 3, got 4"):
        mha_to_nonlocal(MultiheadAttention(6, 1), dim=4)
    with pytest.raises(ValueError, match=r"add_bias_kv / add_zero_attn"):
        mha_to_nonlocal(MultiheadAttention(6, 1, add_zero_attn=True))
