"""The efficient non-local family (nlgraph.blocks): each block == its paper's formula written out here.

Each formula materialises its N x M (or N x K, K x K, M x M) matrix with einsum and an explicit
softmax, uses only torch.nn.functional for the plain layers (convolutions, normalisations), and is
compared with the block in float64: forward and the gradient of the input and of every parameter,
on every backend that can run the block. Then: a new block is the identity, bad input raises a
clear error, shapes and layouts.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import nlgraph
from nlgraph.blocks import (
    CompactNonLocal,
    DisentangledNonLocal,
    GlobalContextBlock,
    LatentGraphBlock,
    NeighborhoodAttention,
    PyramidNonLocal,
)
from nlgraph.blocks.pyramid import pyramid_cells

from .formulas import TOLERANCES

TOL = dict(zip(("rtol", "atol"), TOLERANCES[torch.float64], strict=True))
SHAPES = {1: (2, 8, 11), 2: (2, 8, 5, 7), 3: (2, 8, 3, 4, 5)}


def _x(dim: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*SHAPES[dim], generator=gen, dtype=torch.float64)


def _randomise(block, seed: int = 1, std: float = 0.5):
    """Every parameter (incl. the zero-initialised output scales) random, float64."""
    block = block.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return block


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def _conv(t, conv, groups: int = 1):
    return F.conv1d(t, conv.weight, conv.bias, groups=groups)


def _bn(t, bn):
    """BatchNorm in training mode: statistics of this batch over (B, positions)."""
    return F.batch_norm(t, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)


def _unit(t, dim):
    return t / t.norm(dim=dim, keepdim=True).clamp_min(1e-12)


def _adaptive_avg(t, out_sizes):
    """Adaptive average pooling written from its definition: cell i of an axis of n spans
    [floor(i n / s), ceil((i + 1) n / s)). (B, d, *spatial) -> (B, d, prod(out_sizes)), row-major."""
    spatial = t.shape[2:]
    cells = []
    for idx in itertools.product(*[range(s) for s in out_sizes]):
        sl = tuple(slice(math.floor(i * n / s), math.ceil((i + 1) * n / s))
                   for i, n, s in zip(idx, spatial, out_sizes, strict=True))
        cells.append(t[(slice(None), slice(None), *sl)].mean(dim=tuple(range(2, t.dim()))))
    return torch.stack(cells, dim=-1)


# ---------------------------------------------------------------------------------------------
# The papers' formulas


def gcnet_formula(m: GlobalContextBlock, x):
    """Cao et al. 2019, eq. (4) with the 'add' fusion: z_i = x_i + W2 ReLU(LN(W1 sum_j a_j x_j))."""
    flat = x.flatten(2)
    a = _softmax(_conv(flat, m.conv_mask)[:, 0])  # (B, N): one softmax shared by every query
    c = torch.einsum("bn,bcn->bc", a, flat)
    lin1, ln, _, lin2 = m.transform
    h = torch.relu(F.layer_norm(F.linear(c, lin1.weight, lin1.bias), (m.planes,), ln.weight, ln.bias, ln.eps))
    delta = F.linear(h, lin2.weight, lin2.bias)
    return x + delta.reshape(*delta.shape, *([1] * (x.dim() - 2)))


def apnb_formula(m: PyramidNonLocal, x):
    """Zhu et al. 2019: softmax(q k_P^T / sqrt(d)) v_P over the pooled pyramid cells (N x M)."""
    b, spatial = x.shape[0], x.shape[2:]
    flat = x.flatten(2)
    q = _conv(flat, m.key_query)
    v = _conv(flat, m.value)
    def pool(t):
        t = t.reshape(b, -1, *spatial)
        return torch.cat([_adaptive_avg(t, [min(s, n) for n in spatial]) for s in m.pool_scales], dim=-1)

    kp, vp = pool(q), pool(v)  # (B, d, M)
    logits = torch.einsum("bdn,bdm->bnm", q, kp)
    if m.use_scale:
        logits = logits / math.sqrt(m.inter_channels)
    y = torch.einsum("bnm,bdm->bdn", _softmax(logits), vp)
    return x + _bn(_conv(y, m.W.conv), m.W.bn).reshape(x.shape)


def latent_formula(m: LatentGraphBlock, x):
    """Zhang et al. 2019 (the authors' code, asymmetric mode): N -> K -> K -> N with explicit K x N maps."""
    flat = x.flatten(2)
    u = _unit(_bn(_conv(flat, m.down_v2l[0]), m.down_v2l[1]), 1)
    w = _unit(_bn(_conv(flat, m.down_l2v[0]), m.down_l2v[1]), 1)
    a = _unit(torch.relu(_bn(_conv(u, m.psi_v2l[0]), m.psi_v2l[1])), 2)  # (B, K, N)
    bb = _unit(torch.relu(_bn(_conv(w, m.psi_l2v[0]), m.psi_l2v[1])), 1)  # (B, K, N)
    z = torch.einsum("bkn,bdn->bkd", a, u)
    if m.latent_graph:
        zh = _unit(z, -1)
        z = _softmax(torch.einsum("bkd,bld->bkl", zh, zh)) @ z
    y = torch.einsum("bkn,bkd->bdn", bb, z)
    return x + m.gamma * _bn(_conv(y, m.up[0]), m.up[1]).reshape(x.shape)


def cgnl_kernel(m: CompactNonLocal, t, p):
    """f(t_n, p_m) for every pair of scalar nodes, (..., M, M), materialised."""
    tp = t[..., :, None] * p[..., None, :]
    if m.kernel == "dot":
        return tp
    series = sum((2 * m.gamma * tp) ** r / math.factorial(r) for r in range(m.order + 1))
    if m.prefactor == "exact":
        return torch.exp(-m.gamma * t * t)[..., :, None] * torch.exp(-m.gamma * p * p)[..., None, :] * series
    return math.exp(-2 * m.gamma) * series


def cgnl_formula(m: CompactNonLocal, x, kernel=None):
    """Yue et al. 2018: y_n = sum_m f(t_n, p_m) g_m over the (channel, position) nodes of each group."""
    b, g = x.shape[0], m.groups
    flat = x.flatten(2)
    t, p, v = (_conv(flat, c).reshape(b, g, -1) for c in (m.t, m.p, m.g))
    f = (kernel or cgnl_kernel)(m, t, p)  # (B, G, M, M)
    y = torch.einsum("bgnm,bgm->bgn", f, v)
    if m.use_scale:
        y = y / math.sqrt(t.shape[-1])
    y = _conv(y.reshape(b, m.inter_channels, -1), m.z, groups=g)
    return x + F.group_norm(y, g, m.gn.weight, m.gn.bias, m.gn.eps).reshape(x.shape)


def dnl_formula(m: DisentangledNonLocal, x):
    """Yin et al. 2020: [softmax((q - mu_q)(k - mu_k)^T / (sqrt(d) tau)) + 1 softmax(w_m x)^T] g."""
    flat = x.flatten(2)
    q, k, v = _conv(flat, m.theta), _conv(flat, m.phi), _conv(flat, m.g)  # (B, d, N)
    q = q - q.mean(-1, keepdim=True)
    k = k - k.mean(-1, keepdim=True)
    logits = torch.einsum("bdn,bdm->bnm", q, k) / m.temperature
    if m.use_scale:
        logits = logits / math.sqrt(m.inter_channels)
    pairwise = _softmax(logits)  # (B, N, N)
    unary = _softmax(_conv(flat, m.conv_mask)[:, 0])  # (B, N), the same row for every query
    y = torch.einsum("bnm,bdm->bdn", pairwise + unary[:, None, :], v)
    return x + _bn(_conv(y, m.W.conv), m.W.bn).reshape(x.shape)


def window_adjacency(shape, radius):
    """adj[i, j] = every |c_i - c_j| <= r (per axis), from a Python loop over grid nodes."""
    r = [radius] * len(shape) if isinstance(radius, int) else list(radius)
    coords = list(itertools.product(*[range(s) for s in shape]))
    adj = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for i, ci in enumerate(coords):
        for j, cj in enumerate(coords):
            adj[i, j] = all(abs(a - c) <= ra for a, c, ra in zip(ci, cj, r, strict=True))
    return adj


def window_formula(m: NeighborhoodAttention, x):
    """Per head: softmax over the window of q_i . k_j / sqrt(d_h) (N x N logits, -inf outside)."""
    b, h = x.shape[0], m.num_heads
    flat = x.flatten(2)
    q, k, v = (_conv(flat, c).reshape(b, h, m.inter_channels // h, -1) for c in (m.query, m.key, m.value))
    logits = torch.einsum("bhdn,bhdm->bhnm", q, k) / math.sqrt(m.inter_channels // h)
    logits = logits.masked_fill(~window_adjacency(x.shape[2:], m.radius), float("-inf"))
    y = torch.einsum("bhnm,bhdm->bhdn", _softmax(logits), v).reshape(b, m.inter_channels, -1)
    return x + _bn(_conv(y, m.W.conv), m.W.bn).reshape(x.shape)


CASES = {
    # planes 4: a LayerNorm over 2 features only keeps signs, which would hide a wrong context
    "gcnet": (lambda: GlobalContextBlock(8, reduction=2), gcnet_formula),
    "apnb": (lambda: PyramidNonLocal(8, inter_channels=4, pool_scales=(1, 2, 3)), apnb_formula),
    "apnb_noscale": (lambda: PyramidNonLocal(8, inter_channels=3, pool_scales=(4, 1), use_scale=False),
                     apnb_formula),
    "latent": (lambda: LatentGraphBlock(8, num_latent=5, inter_channels=3), latent_formula),
    "latent_nograph": (lambda: LatentGraphBlock(8, num_latent=4, latent_graph=False), latent_formula),
    "cgnl_gauss": (lambda: CompactNonLocal(8, inter_channels=4, groups=2, gamma=0.3, order=3), cgnl_formula),
    "cgnl_exact": (lambda: CompactNonLocal(8, inter_channels=4, gamma=0.3, prefactor="exact", use_scale=True),
                   cgnl_formula),
    "cgnl_dot": (lambda: CompactNonLocal(8, groups=4, kernel="dot"), cgnl_formula),
    "dnl": (lambda: DisentangledNonLocal(8, inter_channels=4, temperature=0.5), dnl_formula),
    "dnl_noscale": (lambda: DisentangledNonLocal(8, temperature=2.0, use_scale=False), dnl_formula),
    "window": (lambda: NeighborhoodAttention(8, radius=1, num_heads=2), window_formula),
}
# the exact backends each block's calls can all run on ("auto" first)
BACKENDS = {name: ["auto", "chunked", "reference"] + (["algebra"] if name.startswith("cgnl") else [])
            for name in CASES}


def _check_against_formula(block, formula, x):
    x = x.clone().requires_grad_(True)
    z = block(x)
    params = dict(block.named_parameters())
    dz = torch.randn(z.shape, generator=torch.Generator().manual_seed(7), dtype=z.dtype)
    grads = torch.autograd.grad(z, [x, *params.values()], dz)
    x2 = x.detach().clone().requires_grad_(True)
    z_ref = formula(block, x2)
    grads_ref = torch.autograd.grad(z_ref, [x2, *params.values()], dz)
    torch.testing.assert_close(z, z_ref, **TOL, msg=lambda msg: f"forward: {msg}")
    for name, g, gr in zip(["x", *params], grads, grads_ref, strict=True):
        torch.testing.assert_close(g, gr, **TOL, msg=lambda msg, name=name: f"d/d{name}: {msg}")


@pytest.mark.parametrize("case,backend", [(c, b) for c in CASES for b in BACKENDS[c]])
def test_block_matches_paper_formula(case, backend):
    make, formula = CASES[case]
    block = _randomise(make())
    block.backend = backend
    _check_against_formula(block, formula, _x(2))


@pytest.mark.parametrize("dim", [1, 3])
@pytest.mark.parametrize("case", ["gcnet", "apnb", "latent", "cgnl_gauss", "dnl", "window"])
def test_block_matches_formula_on_sequences_and_clips(case, dim):
    make, formula = CASES[case]
    block = _randomise(make())
    if case == "window" and dim == 3:
        block.radius = (0, 1, 2)  # per-axis radius: frames apart never meet
    _check_against_formula(block, formula, _x(dim, seed=dim))


@pytest.mark.parametrize("prefactor", ["constant", "exact"])
@pytest.mark.parametrize("order", [0, 1, 3])
def test_taylor_features_dot_products_are_the_kernel(prefactor, order):
    """psi(t_n) . psi(p_m) == the materialised Taylor kernel (GroupNorm after the block would hide a
    wrong constant factor, so the features are checked on their own)."""
    block = CompactNonLocal(8, order=order, gamma=0.4, prefactor=prefactor)
    gen = torch.Generator().manual_seed(3)
    t, p = (torch.randn(2, 1, 9, generator=gen, dtype=torch.float64) for _ in range(2))
    got = block.node_features(t) @ block.node_features(p).transpose(-1, -2)
    torch.testing.assert_close(got, cgnl_kernel(block, t, p), **TOL)


def test_cgnl_exact_prefactor_is_the_gaussian_up_to_the_taylor_remainder():
    """With the exact prefactor, CGNL's kernel is exp(-gamma (t - p)^2) minus the truncated tail:
    |f - gauss| <= exp(-gamma (t^2 + p^2)) (2 gamma |t p|)^(P+1) exp(2 gamma |t p|) / (P+1)! per pair."""
    block = _randomise(CompactNonLocal(8, inter_channels=4, gamma=0.5, order=2, prefactor="exact"))
    x = _x(2)

    def gaussian(m, t, p):
        return torch.exp(-m.gamma * (t[..., :, None] - p[..., None, :]) ** 2)

    def remainder(m, t, p):
        a = 2 * m.gamma * (t[..., :, None] * p[..., None, :]).abs()
        pre = torch.exp(-m.gamma * t * t)[..., :, None] * torch.exp(-m.gamma * p * p)[..., None, :]
        return pre * a ** (m.order + 1) * torch.exp(a) / math.factorial(m.order + 1)

    with torch.no_grad():
        b, flat = x.shape[0], x.flatten(2)
        t, p, v = (_conv(flat, c).reshape(b, 1, -1) for c in (block.t, block.p, block.g))
        y_block = nlgraph.aggregate(block.node_features(t), block.node_features(p), v[..., None],
                                    nlgraph.DotProduct(scale=float(t.shape[-1])))[..., 0]
        y_gauss = torch.einsum("bgnm,bgm->bgn", gaussian(block, t, p), v)
        bound = torch.einsum("bgnm,bgm->bgn", remainder(block, t, p), v.abs())
    err = (y_block - y_gauss).abs()
    assert float(err.max()) > 1e-6  # the truncation is visible at this gamma ...
    assert bool((err <= bound * (1 + 1e-9) + 1e-12).all())  # ... and within Lagrange's bound


@pytest.mark.parametrize("make,expected", [
    (lambda: LatentGraphBlock(8, num_latent=6),
     [("algebra", "DotProduct"), ("sdpa", "Softmax"), ("algebra", "DotProduct")]),
    (lambda: CompactNonLocal(8, groups=2), [("algebra", "DotProduct")]),
], ids=["latent", "cgnl"])
def test_bipartite_and_compact_sums_run_through_the_algebra_backend(make, expected, dispatched):
    """LatentGNN's N -> K -> N steps and CGNL's channel-position sum never build a pairwise matrix (on
    this 64x64 map CGNL's M = 2 * 4096 nodes per group would need 512 MiB per group for M x M); the
    K x K latent softmax goes to torch's fused attention (the sdpa backend)."""
    block = make()
    with torch.no_grad():
        block(torch.randn(1, 8, 64, 64))
    assert dispatched == expected


ALL = {
    "gcnet": lambda: GlobalContextBlock(8, reduction=2),
    "apnb": lambda: PyramidNonLocal(8),
    "latent": lambda: LatentGraphBlock(8),
    "cgnl": lambda: CompactNonLocal(8, groups=2),
    "dnl": lambda: DisentangledNonLocal(8),
    "window": lambda: NeighborhoodAttention(8, radius=2),
}


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("name", list(ALL))
def test_new_block_is_identity(name, dim):
    block = ALL[name]().double()
    x = _x(dim)
    assert torch.equal(block(x), x)
    block.eval()
    assert torch.equal(block(x), x)


def test_global_context_is_query_independent():
    """GCNet's update is one vector for the whole map: z - x is the same at every position."""
    block = _randomise(GlobalContextBlock(8, reduction=2))
    x = _x(2)
    delta = (block(x) - x).flatten(2)
    torch.testing.assert_close(delta, delta[..., :1].expand_as(delta), **TOL)


def test_pyramid_cell_count():
    assert pyramid_cells((32, 32), (1, 3, 6, 8)) == 110
    assert pyramid_cells((4, 14, 14), (1, 3, 6, 8)) == 1 + 27 + 4 * 36 + 4 * 64
    assert pyramid_cells((5,), (1, 3, 6, 8)) == 1 + 3 + 5 + 5


@pytest.mark.parametrize("name", list(ALL))
def test_shapes_layouts_and_dtypes(name):
    """Batch 1, non-square maps, a non-contiguous input, clips and float32: the input's shape and dtype
    out, finite gradients; the non-contiguous input gives what its contiguous copy gives."""
    block = _randomise(ALL[name]()).float()
    strided = torch.randn(3, 9, 8, 5).transpose(1, 2)[:, :, :, :4]  # (3, 8, 9, 4), not contiguous
    assert not strided.is_contiguous()
    for x in (torch.randn(1, 8, 6, 9), strided, torch.randn(2, 8, 2, 3, 4), torch.randn(2, 8, 7)):
        x = x.requires_grad_(True)
        z = block(x)
        assert z.shape == x.shape and z.dtype == torch.float32
        z.square().sum().backward()
        assert torch.isfinite(x.grad).all()
    block.eval()
    rtol, atol = TOLERANCES[torch.float32]
    torch.testing.assert_close(block(strided), block(strided.contiguous()), rtol=rtol, atol=atol)


def test_backend_attribute_reaches_the_core_op():
    block = GlobalContextBlock(8)
    block.backend = "no-such-backend"
    with pytest.raises(ValueError, match="backend must be 'auto' or one of .* got 'no-such-backend'"):
        block(torch.randn(1, 8, 4, 4))


@pytest.mark.parametrize("name", list(ALL))
def test_bad_input(name):
    block = ALL[name]()
    with pytest.raises(TypeError, match="x must be a tensor, got list"):
        block([1.0])
    with pytest.raises(TypeError, match="x must be floating point, got torch.int64"):
        block(torch.ones(1, 8, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must have shape .* with C = 8, got \(2, 7, 4, 4\)"):
        block(torch.randn(2, 7, 4, 4))
    with pytest.raises(ValueError, match=r"x must have shape .* with C = 8, got \(8, 16\)"):
        block(torch.randn(8, 16))
    with pytest.raises(ValueError, match=r"x must not be empty, got shape \(0, 8, 4, 4\)"):
        block(torch.randn(0, 8, 4, 4))
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        block(torch.full((1, 8, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="in_channels must be a positive int, got 0"):
        type(block)(0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="reduction must be a positive int, got 0"):
        GlobalContextBlock(8, reduction=0)
    for scales in ((), (0, 2), "136", (1.5,)):
        with pytest.raises(ValueError, match="pool_scales must be a non-empty sequence of positive ints"):
            PyramidNonLocal(8, pool_scales=scales)
    with pytest.raises(ValueError, match="inter_channels must be a positive int, got -2"):
        PyramidNonLocal(8, inter_channels=-2)
    with pytest.raises(ValueError, match="num_latent must be a positive int, got 0"):
        LatentGraphBlock(8, num_latent=0)
    with pytest.raises(ValueError, match=r"groups \(3\) must divide in_channels \(8\) and inter_ch"):
        CompactNonLocal(8, groups=3)
    with pytest.raises(ValueError, match="kernel must be one of"):
        CompactNonLocal(8, kernel="embedded")
    with pytest.raises(ValueError, match="order must be an int >= 0, got -1"):
        CompactNonLocal(8, order=-1)
    with pytest.raises(ValueError, match="gamma must be a finite number > 0, got 0"):
        CompactNonLocal(8, gamma=0)
    with pytest.raises(ValueError, match="prefactor must be one of"):
        CompactNonLocal(8, prefactor="none")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got -1"):
        DisentangledNonLocal(8, temperature=-1)
    with pytest.raises(ValueError, match=r"radius must be an int >= 0 or 1-3 of them"):
        NeighborhoodAttention(8, radius=-1)
    with pytest.raises(ValueError, match=r"num_heads \(3\) must divide inter_channels \(4\)"):
        NeighborhoodAttention(8, num_heads=3)
    with pytest.raises(ValueError, match=r"radius \(1, 2\) has 2 entries but x \(1, 8, 2, 3, 4\) has 3"):
        NeighborhoodAttention(8, radius=(1, 2))(torch.randn(1, 8, 2, 3, 4))
