"""attention.MultiheadAttention == torch.nn.MultiheadAttention with the same parameters.

Forward and gradients w.r.t. the inputs and every parameter (compared by name: the two modules have
torch's parameter layout); masks (bool and float, key padding and attention masks, 2-D and 3-D),
is_causal, add_bias_kv, add_zero_attn, self- and cross-attention, kdim/vdim, bias on/off,
batch_first both ways, unbatched inputs, need_weights. float64 throughout: every compared number is
a sum of at most a few hundred O(1) products, so 1e-9 relative / 1e-10 absolute is ~1e5 times float64
roundoff and far below any real difference. The drop-in contract itself (signature, defaults,
positional order, state_dict, nn.Transformer*Layer) is in tests/test_dropin_torch.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attention import MultiheadAttention
from nlgraph.adapters import mha_from_torch, mha_to_torch

# float64 rounding bound, derived in tests/formulas.py (TOLERANCES)
TOL = dict(rtol=1e-9, atol=1e-10)
B, L, S, E, H = 2, 7, 9, 12, 3


def _torch_mha(bias=True, kdim=None, vdim=None, batch_first=True, add_bias_kv=False, add_zero_attn=False,
               seed=0):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first,
                              add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, dtype=torch.float64)
    with torch.no_grad():  # non-zero biases so that they are tested
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _compare(theirs, ours, inputs, **kw):
    """Same call on both modules: outputs, weights, input gradients and every parameter's gradient."""
    xs1 = [x.detach().clone().requires_grad_(True) for x in inputs]
    xs2 = [x.detach().clone().requires_grad_(True) for x in inputs]
    y1, w1 = theirs(*xs1, **kw)
    y2, w2 = ours(*xs2, **kw)
    torch.testing.assert_close(y2, y1, **TOL, msg=lambda m: f"output: {m}")
    assert (w1 is None) == (w2 is None)
    if w1 is not None:
        torch.testing.assert_close(w2, w1, **TOL, msg=lambda m: f"weights: {m}")
    gen = torch.Generator().manual_seed(9)
    dout = torch.randn(y1.shape, generator=gen, dtype=y1.dtype)
    loss1, loss2 = (y1 * dout).sum(), (y2 * dout).sum()
    if w1 is not None:  # the weights' gradient path too
        dw = torch.randn(w1.shape, generator=gen, dtype=w1.dtype)
        loss1, loss2 = loss1 + (w1 * dw).sum(), loss2 + (w2 * dw).sum()
    loss1.backward()
    loss2.backward()
    for i, (a, b) in enumerate(zip(xs1, xs2, strict=True)):
        torch.testing.assert_close(b.grad, a.grad, **TOL, msg=lambda m: f"d/dinput{i}: {m}")
    p1, p2 = dict(theirs.named_parameters()), dict(ours.named_parameters())
    assert p1.keys() == p2.keys()
    for name in p1:
        torch.testing.assert_close(p2[name].grad, p1[name].grad, **TOL, msg=lambda m: f"d/d{name}: {m}")


def _x(*shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_self_attention(bias, need_weights):
    theirs = _torch_mha(bias=bias)
    ours = mha_from_torch(theirs)
    x = _x(B, L, E)
    _compare(theirs, ours, [x, x, x], need_weights=need_weights)


@pytest.mark.parametrize("kdim,vdim", [(None, None), (5, 6), (E, 4)])
def test_cross_attention_kdim_vdim(kdim, vdim):
    theirs = _torch_mha(kdim=kdim, vdim=vdim)
    ours = mha_from_torch(theirs)
    _compare(theirs, ours, [_x(B, L, E), _x(B, S, kdim or E, seed=2), _x(B, S, vdim or E, seed=3)])


def _masks(kpm_kind, am_kind, seed=4):
    gen = torch.Generator().manual_seed(seed)
    kpm = None
    if kpm_kind is not None:
        kpm = torch.rand(B, S, generator=gen) > 0.7
        kpm[:, 0] = False  # keep every query's row non-empty (torch gives NaN otherwise)
        if kpm_kind == "float":
            kpm = torch.where(kpm, -5.0, 0.3).double()
    am = None
    if am_kind is not None:
        shape = (L, S) if am_kind.endswith("2d") else (B * H, L, S)
        am = torch.rand(*shape, generator=gen) > 0.6
        am[..., 0] = False
        if am_kind.startswith("float"):
            am = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return kpm, am


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask is deprecated")
@pytest.mark.parametrize("kpm_kind", [None, "bool", "float"])
@pytest.mark.parametrize("am_kind", [None, "bool2d", "float2d", "bool3d", "float3d"])
def test_masks(kpm_kind, am_kind):
    theirs = _torch_mha()
    ours = mha_from_torch(theirs)
    kpm, am = _masks(kpm_kind, am_kind)
    _compare(theirs, ours, [_x(B, L, E), _x(B, S, E, seed=2), _x(B, S, E, seed=3)], key_padding_mask=kpm,
             attn_mask=am, need_weights=False)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask is deprecated")
@pytest.mark.parametrize("add_bias_kv,add_zero_attn", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("kpm_kind,am_kind", [(None, None), ("bool", "float2d"), ("float", "bool3d")])
@pytest.mark.parametrize("need_weights", [True, False])
def test_bias_kv_and_zero_attn(add_bias_kv, add_zero_attn, kpm_kind, am_kind, need_weights):
    """The appended bias / zero key and value, masks padded for them, weights over S + extras."""
    theirs = _torch_mha(add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, kdim=5, vdim=6)
    ours = mha_from_torch(theirs)
    kpm, am = _masks(kpm_kind, am_kind)
    _compare(theirs, ours, [_x(B, L, E), _x(B, S, 5, seed=2), _x(B, S, 6, seed=3)], key_padding_mask=kpm,
             attn_mask=am, need_weights=need_weights, average_attn_weights=False)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask is deprecated")
@pytest.mark.parametrize("with_kpm", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("extras", [False, True])
def test_is_causal(with_kpm, need_weights, extras):
    """is_causal is torch's hint: the causal mask replaces attn_mask without kpm / need_weights."""
    theirs = _torch_mha(add_bias_kv=extras, add_zero_attn=extras)
    ours = mha_from_torch(theirs)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    kpm = None
    if with_kpm:
        kpm = torch.zeros(B, L, dtype=torch.bool)
        kpm[1, -2:] = True
    x = _x(B, L, E)
    _compare(theirs, ours, [x, x, x], attn_mask=causal, is_causal=True, key_padding_mask=kpm,
             need_weights=need_weights)


@pytest.mark.parametrize("average", [True, False])
def test_need_weights(average):
    theirs = _torch_mha()
    ours = mha_from_torch(theirs)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -2:] = True
    _compare(theirs, ours, [_x(B, L, E), _x(B, S, E, seed=2), _x(B, S, E, seed=3)], need_weights=True,
             average_attn_weights=average, key_padding_mask=kpm)


def test_sequence_first_and_unbatched():
    theirs = _torch_mha(batch_first=False)
    ours = mha_from_torch(theirs)
    assert not ours.batch_first
    _compare(theirs, ours, [_x(L, B, E), _x(S, B, E, seed=2), _x(S, B, E, seed=3)])
    theirs = _torch_mha(add_bias_kv=True, add_zero_attn=True)
    ours = mha_from_torch(theirs)
    kpm = torch.zeros(S, dtype=torch.bool)
    kpm[3] = True
    am = torch.rand(H, L, S, generator=torch.Generator().manual_seed(3)) > 0.7
    am[..., 0] = False
    _compare(theirs, ours, [_x(L, E), _x(S, E, seed=2), _x(S, E, seed=3)], key_padding_mask=kpm, attn_mask=am,
             average_attn_weights=False)


@pytest.mark.parametrize("kdim", [None, 5])
def test_round_trip_to_torch(kdim):
    ours = MultiheadAttention(E, H, kdim=kdim, vdim=kdim, add_bias_kv=True, dtype=torch.float64)
    theirs = mha_to_torch(ours)
    assert type(theirs) is nn.MultiheadAttention
    back = mha_from_torch(theirs)
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
        assert p1.data_ptr() != p2.data_ptr()  # copies, not shared
    x = _x(L, B, E)
    kv = _x(S, B, kdim or E, seed=2)
    _compare(theirs, ours, [x, kv, kv])


def test_fully_masked_query_returns_the_output_bias():
    """The deliberate difference: zero attention output, so out_proj(0) = out_proj.bias (torch: NaN)."""
    ours = mha_from_torch(_torch_mha())
    am = torch.zeros(L, S, dtype=torch.bool)
    am[2] = True  # query 2 may attend nothing
    y, w = ours(_x(B, L, E), _x(B, S, E, seed=2), _x(B, S, E, seed=3), attn_mask=am)
    torch.testing.assert_close(y[:, 2], ours.out_proj.bias.expand(B, E), rtol=0, atol=0)
    assert torch.equal(w[:, 2], torch.zeros(B, S, dtype=w.dtype))
    assert torch.isfinite(y).all()


def test_backends_agree_on_one_instance():
    m = MultiheadAttention(E, H, batch_first=True).double()
    x = _x(B, L, E)
    outs = {}
    for backend in ("chunked", "reference"):
        m.backend = backend
        outs[backend] = m(x, x, x)
    for a, b in zip(outs["chunked"], outs["reference"], strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_dropout_is_active_in_training_only():
    m = MultiheadAttention(E, H, dropout=0.5, batch_first=True).double()
    x = _x(B, L, E)
    m.eval()
    y_eval = m(x, x, x)[0]
    torch.testing.assert_close(m(x, x, x)[0], y_eval, **TOL)  # the same float64 computation twice
    m.train()
    torch.manual_seed(0)
    y1, w1 = m(x, x, x, need_weights=True, average_attn_weights=False)
    torch.manual_seed(0)
    y2 = m(x, x, x, need_weights=False)[0]
    assert not torch.allclose(y1, y_eval)
    torch.testing.assert_close(y1, y2, **TOL)  # same seed, same mask
    # dropped weights are exactly 0 and kept ones are scaled by 1 / (1 - p)
    m.eval()
    w_eval = m(x, x, x, need_weights=True, average_attn_weights=False)[1]
    ratio = w1[w1 != 0] / w_eval[w1 != 0]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 2.0), **TOL)  # x 1 / (1 - p) = 2 is exact


def test_bad_input():
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be divisible by num_heads \(3\)"):
        MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match=r"num_heads must be a positive int"):
        MultiheadAttention(12, 0)
    with pytest.raises(TypeError, match=r"kdim must be a positive int, got bool True"):
        MultiheadAttention(12, 3, kdim=True)
    with pytest.raises(TypeError, match=r"vdim must be a positive int, got float 4.0"):
        MultiheadAttention(12, 3, vdim=4.0)
    with pytest.raises(TypeError, match=r"embed_dim must be a positive int, got float 12.0"):
        MultiheadAttention(12.0, 3)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\]"):
        MultiheadAttention(12, 3, dropout=1.5)
    m = MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(2, 7, E)
    with pytest.raises(ValueError,
                       match=r"query must have shape \(B, L, E\) or \(L, E\) with E = 12, got \(2, 7, 5\)"):
        m(torch.randn(2, 7, 5), x, x)
    with pytest.raises(ValueError,
                       match=r"key_padding_mask must have shape \(B, S\) = \(2, 7\), got \(2, 6\)"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(L, S\) = \(7, 7\), got \(7, 6\)"):
        m(x, x, x, attn_mask=torch.zeros(7, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(B \* num_heads, L, S\) = \(6, 7, 7\)"):
        m(x, x, x, attn_mask=torch.zeros(2, 7, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"attn_mask must be bool or floating point"):
        m(x, x, x, attn_mask=torch.zeros(7, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"is_causal=True .* needs attn_mask"):
        m(x, x, x, is_causal=True)
    with pytest.raises(TypeError, match=r"query has dtype torch.float64 but the module's parameters are "
                                        r"torch.float32"):
        m(x.double(), x, x)
    with pytest.raises(ValueError, match=r"must share \(batch, length\)"):
        m(x, x, torch.randn(2, 6, E))
    with pytest.raises(TypeError, match=r"expects torch.nn.MultiheadAttention"):
        mha_from_torch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"expects attention.MultiheadAttention"):
        mha_to_torch(nn.MultiheadAttention(E, H))
