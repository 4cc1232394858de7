"""attention.MultiheadAttention == torch.nn.MultiheadAttention after weight conversion.

Forward and gradients w.r.t. the inputs and every weight; masks (bool and float, key padding and
attention masks, 2-D and 3-D), self- and cross-attention, kdim/vdim, bias on/off, batch_first both
ways, unbatched inputs, need_weights. float64 throughout (rtol 1e-9, atol 1e-10).
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


def _torch_mha(bias=True, kdim=None, vdim=None, batch_first=True, seed=0):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first).double()
    with torch.no_grad():  # non-zero biases so that they are tested
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _param_grads_torch(m: nn.MultiheadAttention) -> dict:
    e = m.embed_dim
    g = {}
    if m._qkv_same_embed_dim:
        gq, gk, gv = m.in_proj_weight.grad.split(e)
    else:
        gq, gk, gv = m.q_proj_weight.grad, m.k_proj_weight.grad, m.v_proj_weight.grad
    g.update(q_w=gq, k_w=gk, v_w=gv, out_w=m.out_proj.weight.grad)
    if m.in_proj_bias is not None:
        bq, bk, bv = m.in_proj_bias.grad.split(e)
        g.update(q_b=bq, k_b=bk, v_b=bv, out_b=m.out_proj.bias.grad)
    return g


def _param_grads_ours(m: MultiheadAttention) -> dict:
    g = dict(q_w=m.q_proj.weight.grad, k_w=m.k_proj.weight.grad, v_w=m.v_proj.weight.grad,
             out_w=m.out_proj.weight.grad)
    if m.q_proj.bias is not None:
        g.update(q_b=m.q_proj.bias.grad, k_b=m.k_proj.bias.grad, v_b=m.v_proj.bias.grad, out_b=m.out_proj.bias.grad)
    return g


def _compare(theirs, ours, inputs, **kw):
    kw.setdefault("need_weights", False)  # torch defaults to True, ours (as the issue asks) to False
    xs1 = [x.detach().clone().requires_grad_(True) for x in inputs]
    xs2 = [x.detach().clone().requires_grad_(True) for x in inputs]
    y1, w1 = theirs(*xs1, **kw)
    y2, w2 = ours(*xs2, **kw)
    torch.testing.assert_close(y2, y1, **TOL, msg=lambda m: f"output: {m}")
    if w1 is not None:
        torch.testing.assert_close(w2, w1, **TOL, msg=lambda m: f"weights: {m}")
    gen = torch.Generator().manual_seed(9)
    dout = torch.randn(y1.shape, generator=gen, dtype=y1.dtype)
    (y1 * dout).sum().backward()
    (y2 * dout).sum().backward()
    for i, (a, b) in enumerate(zip(xs1, xs2)):
        torch.testing.assert_close(b.grad, a.grad, **TOL, msg=lambda m: f"d/dinput{i}: {m}")
    g1, g2 = _param_grads_torch(theirs), _param_grads_ours(ours)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], **TOL, msg=lambda m: f"d/d{name}: {m}")


def _x(*shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("bias", [True, False])
def test_self_attention(bias):
    theirs = _torch_mha(bias=bias)
    ours = mha_from_torch(theirs)
    x = _x(B, L, E)
    _compare(theirs, ours, [x, x, x])


@pytest.mark.parametrize("kdim,vdim", [(None, None), (5, 6), (E, 4)])
def test_cross_attention_kdim_vdim(kdim, vdim):
    theirs = _torch_mha(kdim=kdim, vdim=vdim)
    ours = mha_from_torch(theirs)
    _compare(theirs, ours, [_x(B, L, E), _x(B, S, kdim or E, seed=2), _x(B, S, vdim or E, seed=3)])


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask is deprecated")
@pytest.mark.parametrize("kpm_kind", [None, "bool", "float"])
@pytest.mark.parametrize("am_kind", [None, "bool2d", "float2d", "bool3d", "float3d"])
def test_masks(kpm_kind, am_kind):
    theirs = _torch_mha()
    ours = mha_from_torch(theirs)
    gen = torch.Generator().manual_seed(4)
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
    _compare(theirs, ours, [_x(B, L, E), _x(B, S, E, seed=2), _x(B, S, E, seed=3)], key_padding_mask=kpm,
             attn_mask=am)


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
    theirs = _torch_mha()
    ours = mha_from_torch(theirs)
    kpm = torch.zeros(S, dtype=torch.bool)
    kpm[3] = True
    _compare(theirs, ours, [_x(L, E), _x(S, E, seed=2), _x(S, E, seed=3)], key_padding_mask=kpm, need_weights=True)


@pytest.mark.parametrize("kdim", [None, 5])
def test_round_trip_to_torch(kdim):
    ours = MultiheadAttention(E, H, kdim=kdim, vdim=kdim).double()
    theirs = mha_to_torch(ours)
    back = mha_from_torch(theirs)
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    x = _x(B, L, E)
    kv = _x(B, S, kdim or E, seed=2)
    _compare(theirs, ours, [x, kv, kv])


def test_backends_agree_on_one_instance():
    m = MultiheadAttention(E, H).double()
    x = _x(B, L, E)
    outs = {}
    for backend in ("chunked", "reference"):
        m.backend = backend
        outs[backend] = m(x)[0]
    torch.testing.assert_close(outs["chunked"], outs["reference"], **TOL)


def test_dropout_is_active_in_training_only():
    m = MultiheadAttention(E, H, dropout=0.5).double()
    x = _x(B, L, E)
    m.eval()
    y_eval = m(x)[0]
    torch.testing.assert_close(m(x)[0], y_eval, **TOL)  # the same float64 computation twice
    m.train()
    torch.manual_seed(0)
    y1, w1 = m(x, need_weights=True, average_attn_weights=False)
    torch.manual_seed(0)
    y2 = m(x)[0]
    assert not torch.allclose(y1, y_eval)
    torch.testing.assert_close(y1, y2, **TOL)  # same seed, same mask
    # dropped weights are exactly 0 and kept ones are scaled by 1 / (1 - p)
    m.eval()
    w_eval = m(x, need_weights=True, average_attn_weights=False)[1]
    ratio = w1[w1 != 0] / w_eval[w1 != 0]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 2.0), **TOL)  # x 1 / (1 - p) = 2 is exact


def test_bad_input():
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be divisible by num_heads \(3\)"):
        MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match=r"num_heads must be a positive int"):
        MultiheadAttention(12, 0)
    m = MultiheadAttention(E, H)
    with pytest.raises(ValueError, match=r"query must have shape \(B, L, E\) or \(L, E\) with E = 12, got \(2, 7, 5\)"):
        m(torch.randn(2, 7, 5))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, S\) = \(2, 7\), got \(2, 6\)"):
        m(torch.randn(2, 7, E), key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(L, S\) = \(7, 7\), got \(7, 6\)"):
        m(torch.randn(2, 7, E), attn_mask=torch.zeros(7, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(B \* num_heads, L, S\) = \(6, 7, 7\)"):
        m(torch.randn(2, 7, E), attn_mask=torch.zeros(2, 7, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"attn_mask must be bool or floating point"):
        m(torch.randn(2, 7, E), attn_mask=torch.zeros(7, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"add_bias_kv"):
        mha_from_torch(nn.MultiheadAttention(E, H, add_bias_kv=True))
    with pytest.raises(TypeError, match=r"expects torch.nn.MultiheadAttention"):
        mha_from_torch(m)
