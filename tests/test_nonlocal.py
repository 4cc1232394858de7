"""Non-local blocks: identity at init, every mode == a formula written here, forward and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nlgraph import NonLocal1d, NonLocal2d, NonLocal3d
from nlgraph.nonlocal_blocks import MODES

# float64 rounding bound, derived in tests/formulas.py (TOLERANCES)
TOL = dict(rtol=1e-9, atol=1e-10)
SHAPES = {1: (2, 6, 10), 2: (2, 6, 6, 4), 3: (2, 6, 2, 4, 4)}
BLOCKS = {1: NonLocal1d, 2: NonLocal2d, 3: NonLocal3d}


def _x(dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*SHAPES[dim], generator=gen, dtype=torch.float64)


def _randomise(block, seed=1):
    """Give every parameter (incl. the zero-initialised W / BN scale) a random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return block


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub_sample", [True, False])
@pytest.mark.parametrize("bn_layer", [True, False])
def test_new_block_is_identity(dim, mode, sub_sample, bn_layer):
    block = BLOCKS[dim](6, mode=mode, sub_sample=sub_sample, bn_layer=bn_layer).double()
    x = _x(dim)
    assert torch.equal(block(x), x)
    block.eval()
    assert torch.equal(block(x), x)


def _pool(dim, t):
    return {1: lambda u: F.max_pool1d(u, 2), 2: lambda u: F.max_pool2d(u, 2),
            3: lambda u: F.max_pool3d(u, (1, 2, 2))}[dim](t)


def _formula(block, x):
    """The block written out from the paper: explicit N x M pairwise function, then W, BN, residual."""
    dim = x.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dim]
    pool = (lambda t: _pool(dim, t)) if block.sub_sample else (lambda t: t)
    flat = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731  (B, positions, channels)
    g = flat(pool(conv(x, block.g.weight, block.g.bias)))
    if block.mode == "gaussian":
        theta, phi = flat(x), flat(pool(x))
    else:
        theta = flat(conv(x, block.theta.weight, block.theta.bias))
        phi = flat(pool(conv(x, block.phi.weight, block.phi.bias)))
    m = phi.shape[1]
    if block.mode in ("gaussian", "embedded_gaussian"):
        logits = theta @ phi.transpose(1, 2)
        if block.mode == "embedded_gaussian" and block.use_scale:
            logits = logits / math.sqrt(block.inter_channels)
        f = torch.exp(logits - logits.amax(-1, keepdim=True))
        f = f / f.sum(-1, keepdim=True)
    elif block.mode == "dot_product":
        f = theta @ phi.transpose(1, 2) / m
    else:
        w = block.concat_project
        pairs = torch.cat([theta[:, :, None, :].expand(-1, -1, m, -1),
                           phi[:, None, :, :].expand(-1, theta.shape[1], -1, -1)], dim=-1)
        f = torch.relu(pairs @ w) / m
    y = (f @ g).transpose(1, 2).reshape(x.shape[0], block.inter_channels, *x.shape[2:])
    return block.W(y) + x


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub_sample", [True, False])
def test_mode_matches_formula(dim, mode, sub_sample):
    block = _randomise(BLOCKS[dim](6, mode=mode, sub_sample=sub_sample, use_scale=True).double())
    x = _x(dim).requires_grad_(True)
    z = block(x)
    params = dict(block.named_parameters())
    dz = torch.randn_like(z)
    grads = torch.autograd.grad(z, [x, *params.values()], dz)
    x2 = x.detach().clone().requires_grad_(True)
    z_ref = _formula(block, x2)
    grads_ref = torch.autograd.grad(z_ref, [x2, *params.values()], dz)
    torch.testing.assert_close(z, z_ref, **TOL, msg=lambda m: f"forward: {m}")
    for name, g, gr in zip(["x", *params], grads, grads_ref, strict=True):
        torch.testing.assert_close(g, gr, **TOL, msg=lambda m: f"d/d{name}: {m}")


def test_use_scale_only_changes_embedded_gaussian():
    for mode in MODES:
        a = BLOCKS[2](6, mode=mode, use_scale=False)
        b = BLOCKS[2](6, mode=mode, use_scale=True)
        same = repr(a.affinity()) == repr(b.affinity())
        assert same == (mode != "embedded_gaussian"), mode


@pytest.mark.parametrize("mode,expected", [("dot_product", "algebra"), ("concatenation", "algebra"),
                                           ("embedded_gaussian", "sdpa"), ("gaussian", "sdpa")])
def test_dispatch_never_materialises_for_linear_modes(mode, expected, dispatched):
    """On a 64x64 map, dot_product / concatenation go through the exact algebra (no 4096 x 4096)."""
    block = _randomise(NonLocal2d(8, mode=mode, sub_sample=False))
    with torch.no_grad():
        block(torch.randn(1, 8, 64, 64))
    assert [name for name, _ in dispatched] == [expected]


def test_backend_attribute_switches_path():
    block = _randomise(NonLocal2d(6, mode="dot_product").double())
    x = _x(2)
    block.backend = "chunked"
    z1 = block(x)
    block.backend = "algebra"
    torch.testing.assert_close(block(x), z1, **TOL)


def test_inter_channels_default():
    assert NonLocal2d(7).inter_channels == 3
    assert NonLocal2d(1).inter_channels == 1
    assert NonLocal2d(8, inter_channels=5).inter_channels == 5


def test_bad_input():
    with pytest.raises(ValueError, match=r"inter_channels must be a positive int .* got 0"):
        NonLocal2d(8, inter_channels=0)
    with pytest.raises(ValueError, match=r"mode must be one of .* got 'softmax'"):
        NonLocal2d(8, mode="softmax")
    with pytest.raises(ValueError, match=r"in_channels must be a positive int, got -1"):
        NonLocal1d(-1)
    block = NonLocal2d(8)
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\) with C = 8, got \(2, 7, 4, 4\)"):
        block(torch.randn(2, 7, 4, 4))
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\) with C = 8, got \(8, 4, 4\)"):
        block(torch.randn(8, 4, 4))
    with pytest.raises(ValueError, match=r"sub_sample halves the spatial size"):
        block(torch.randn(1, 8, 1, 4))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        NonLocal3d(8)(torch.randn(1, 8, 4, 4))
