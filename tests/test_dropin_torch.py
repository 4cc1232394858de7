"""attention.MultiheadAttention as a drop-in for torch.nn.MultiheadAttention in code written for torch.

The reference is torch itself: its module's signature and defaults (read with ``inspect``), its
state_dicts, and nn.TransformerEncoderLayer / nn.TransformerDecoderLayer / nn.TransformerEncoder
run with torch's module and again after ``layer.self_attn = mha_from_torch(layer.self_attn)``, in
train mode (the layers' own dropout drawn from the same seed) and in eval mode, with gradients
(the layers' regular path, which calls our forward) and without (their fused fast path, whose checks
read ``in_proj_weight``, ``in_proj_bias``, ``_qkv_same_embed_dim``, ``batch_first``, ``num_heads``
and call ``merge_masks``). float64; the tolerance argument is tests/test_attention.py's (sums of a few
hundred O(1) terms, 1e-9 relative is ~1e5 times float64 roundoff).
"""

from __future__ import annotations

import copy
import inspect
from unittest import mock

import pytest
import torch
from torch import nn

import nlgraph
from attention import MultiheadAttention
from nlgraph.adapters import mha_from_torch

TOL = dict(rtol=1e-9, atol=1e-10)
D, NH, B, L, S = 16, 4, 3, 6, 5


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_signature_defaults_and_positional_order_are_torchs():
    # nlgraph's own extensions are keyword-only, after torch's parameters (context parallelism)
    extensions = {"__init__": ["process_group", "distributed_method"], "forward": []}
    for name in ("__init__", "forward"):
        ours = inspect.signature(getattr(MultiheadAttention, name)).parameters
        theirs = inspect.signature(getattr(nn.MultiheadAttention, name)).parameters
        assert list(ours) == list(theirs) + extensions[name], name
        for p in extensions[name]:
            assert ours[p].kind is inspect.Parameter.KEYWORD_ONLY
            assert ours[p].default is not inspect.Parameter.empty
        for p in theirs:
            assert ours[p].default == theirs[p].default, (name, p)
            assert ours[p].kind == theirs[p].kind, (name, p)
    m = MultiheadAttention(D, NH)
    assert isinstance(m, nn.MultiheadAttention)
    assert m.batch_first is False and m.dropout == 0.0 and m.bias_k is None and not m.add_zero_attn
    # sequence-first by default, weights returned by default (averaged over heads)
    x = torch.randn(L, B, D)
    y, w = m(x, x, x)
    assert y.shape == (L, B, D) and w.shape == (B, L, L)


def test_positional_calls_mean_what_they_mean_in_torch():
    """Positional constructor (…, add_bias_kv, add_zero_attn, kdim, vdim, batch_first) and forward order."""
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(D, NH, 0.0, True, True, True, 5, 7, True, None, torch.float64)
    ours = MultiheadAttention(D, NH, 0.0, True, True, True, 5, 7, True, None, torch.float64)
    ours.load_state_dict(theirs.state_dict())
    q, k, v = _x(B, L, D), _x(B, S, 5, seed=2), _x(B, S, 7, seed=3)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, 1] = True
    am = torch.zeros(L, S, dtype=torch.bool)
    am[2, 3] = True
    for args in [(kpm, True, am, False), (None, False, am), (kpm, True, None, True, False)]:
        y1, w1 = theirs(q, k, v, *args)
        y2, w2 = ours(q, k, v, *args)
        torch.testing.assert_close(y2, y1, **TOL)
        assert y2.stride() == y1.stride()  # (L, B, E) in memory, as torch's
        assert (w1 is None) == (w2 is None)
        if w1 is not None:
            torch.testing.assert_close(w2, w1, **TOL)


@pytest.mark.parametrize("kdim", [None, 5])
@pytest.mark.parametrize("bias,add_bias_kv", [(True, False), (False, True)])
def test_state_dicts_interchange_and_device_dtype(kdim, bias, add_bias_kv):
    kw = dict(bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=True, kdim=kdim, vdim=kdim, device="cpu",
              dtype=torch.float64)
    theirs, ours = nn.MultiheadAttention(D, NH, **kw), MultiheadAttention(D, NH, **kw)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert p.shape == q.shape and p.dtype == torch.float64 and p.device.type == "cpu", n
    ours.load_state_dict(theirs.state_dict())  # strict both ways
    theirs.load_state_dict(ours.state_dict())
    assert ours._qkv_same_embed_dim == (kdim is None)
    assert (ours.in_proj_bias is None) == (not bias)


def _layer_pair(kind: str, batch_first: bool, norm_first: bool, seed: int = 0):
    torch.manual_seed(seed)
    cls = nn.TransformerEncoderLayer if kind == "encoder" else nn.TransformerDecoderLayer
    theirs = cls(D, NH, dim_feedforward=24, dropout=0.1, batch_first=batch_first, norm_first=norm_first,
                 dtype=torch.float64)
    with torch.no_grad():
        for p in theirs.parameters():  # non-zero biases
            p.add_(0.05 * torch.randn_like(p))
    attn = ["self_attn"] + (["multihead_attn"] if kind == "decoder" else [])
    for name in attn:  # attention dropout: torch and ours draw different masks; the layers' dropouts stay on
        getattr(theirs, name).dropout = 0.0
    ours = copy.deepcopy(theirs)
    for name in attn:
        setattr(ours, name, mha_from_torch(getattr(ours, name)))
        assert type(getattr(ours, name)) is MultiheadAttention
    return theirs, ours


def _run_both(theirs, ours, inputs, kwargs, grad: bool):
    outs, grads = [], []
    for mod in (theirs, ours):
        mod.zero_grad()
        xs = [x.detach().clone().requires_grad_(grad) for x in inputs]
        torch.manual_seed(123)  # the layers' own dropout: the same masks in both runs
        with mock.patch.object(nlgraph, "aggregate", wraps=nlgraph.aggregate) as agg:
            with torch.set_grad_enabled(grad):
                y = mod(*xs, **kwargs)
        calls = agg.call_count
        if grad:
            (y * _x(*y.shape, seed=7)).sum().backward()
            grads.append([x.grad for x in xs] + [p.grad for p in mod.parameters()])
        outs.append((y, calls))
    (y1, _), (y2, calls) = outs
    torch.testing.assert_close(y2, y1, **TOL, msg=lambda m: f"output: {m}")
    if grad:
        names = ["input"] * len(inputs) + [n for n, _ in theirs.named_parameters()]
        for name, g1, g2 in zip(names, *grads, strict=True):
            torch.testing.assert_close(g2, g1, **TOL, msg=lambda m: f"d/d{name}: {m}")
    return calls


@pytest.mark.parametrize("batch_first,norm_first", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("mode", ["train", "eval+grad", "eval+no_grad"])
def test_transformer_encoder_layer(batch_first, norm_first, mode):
    theirs, ours = _layer_pair("encoder", batch_first, norm_first)
    for m in (theirs, ours):
        m.train(mode == "train")
    src = _x(B, L, D) if batch_first else _x(L, B, D)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    for kwargs in [{}, {"src_key_padding_mask": kpm}, {"src_mask": causal, "is_causal": True}]:
        calls = _run_both(theirs, ours, [src], kwargs, grad=mode != "eval+no_grad")
        # our forward runs on the layers' regular path; torch's fused fast path (eval, no grad, even heads,
        # batch_first, post-norm...) reads the parameters itself, as it does with torch's module
        fast = mode == "eval+no_grad" and batch_first
        assert (calls == 0) if fast else (calls > 0), (mode, kwargs, calls)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval+grad", "eval+no_grad"])
def test_transformer_decoder_layer(batch_first, mode):
    theirs, ours = _layer_pair("decoder", batch_first, norm_first=False)
    for m in (theirs, ours):
        m.train(mode == "train")
    tgt = _x(B, L, D) if batch_first else _x(L, B, D)
    mem = _x(B, S, D, seed=2) if batch_first else _x(S, B, D, seed=2)
    mkpm = torch.zeros(B, S, dtype=torch.bool)
    mkpm[0, -1] = True
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    for kwargs in [{}, {"tgt_mask": causal, "tgt_is_causal": True, "memory_key_padding_mask": mkpm}]:
        calls = _run_both(theirs, ours, [tgt, mem], kwargs, grad=mode != "eval+no_grad")
        assert calls > 0  # the decoder layer has no fast path


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("mode", ["train", "eval+grad", "eval+no_grad"])
def test_transformer_encoder_stack_with_nested_tensor_fast_path(mode):
    """nn.TransformerEncoder packs padded batches into nested tensors on its eval fast path."""
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(D, NH, dim_feedforward=24, dropout=0.0, batch_first=True,
                                       dtype=torch.float64)
    theirs = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)
    ours = copy.deepcopy(theirs)
    for lay in ours.layers:
        lay.self_attn = mha_from_torch(lay.self_attn)
    for m in (theirs, ours):
        m.train(mode == "train")
    src = _x(B, L, D)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, -3:] = True  # left-aligned padding: the nested-tensor path
    calls = _run_both(theirs, ours, [src], {"src_key_padding_mask": kpm}, grad=mode != "eval+no_grad")
    assert (calls == 0) if mode == "eval+no_grad" else (calls > 0)


def test_a_fast_path_refusal_reaches_our_forward():
    """Odd heads: the encoder layer's fast path declines and calls self_attn, as for torch's module."""
    torch.manual_seed(2)
    theirs = nn.TransformerEncoderLayer(15, 3, dim_feedforward=8, batch_first=True, dtype=torch.float64)
    theirs.eval()
    ours = copy.deepcopy(theirs)
    ours.self_attn = mha_from_torch(ours.self_attn)
    calls = _run_both(theirs, ours, [_x(B, L, 15)], {}, grad=False)
    assert calls > 0
