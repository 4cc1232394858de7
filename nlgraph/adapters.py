"""Weight conversion between nlgraph's modules and other parameter layouts.

* :func:`mha_from_torch` / :func:`mha_to_torch`: our :class:`attention.MultiheadAttention` <->
  :class:`torch.nn.MultiheadAttention` (packed ``in_proj_weight`` or separate
  ``q/k/v_proj_weight`` when kdim/vdim differ; with or without bias).

Every conversion copies tensors (no sharing) and produces a module whose forward and gradients
match the source up to float rounding; the tests prove it for every layout.

This module sits above the core (it imports the modules built on it); the core never imports it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["mha_from_torch", "mha_to_torch"]


def _attention():
    import attention  # a layer above the core: imported on use

    return attention


def mha_from_torch(src: nn.MultiheadAttention):
    """Build an :class:`attention.MultiheadAttention` with the weights of a torch module.

    Raises:
        TypeError: ``src`` is not a torch.nn.MultiheadAttention.
        ValueError: ``src`` uses add_bias_kv or add_zero_attn (no counterpart here).
    """
    if not isinstance(src, nn.MultiheadAttention):
        raise TypeError(f"mha_from_torch expects torch.nn.MultiheadAttention, got {type(src).__name__}")
    if src.bias_k is not None or src.add_zero_attn:
        raise ValueError("mha_from_torch: add_bias_kv / add_zero_attn have no counterpart in attention.MultiheadAttention")
    e = src.embed_dim
    bias = src.in_proj_bias is not None
    dst = _attention().MultiheadAttention(e, src.num_heads, dropout=src.dropout, bias=bias, kdim=src.kdim,
                                          vdim=src.vdim, batch_first=src.batch_first)
    dst = dst.to(device=src.out_proj.weight.device, dtype=src.out_proj.weight.dtype)
    with torch.no_grad():
        if src._qkv_same_embed_dim:
            wq, wk, wv = src.in_proj_weight.chunk(3, dim=0)
        else:
            wq, wk, wv = src.q_proj_weight, src.k_proj_weight, src.v_proj_weight
        for proj, w in ((dst.q_proj, wq), (dst.k_proj, wk), (dst.v_proj, wv)):
            proj.weight.copy_(w)
        if bias:
            for proj, b in zip((dst.q_proj, dst.k_proj, dst.v_proj), src.in_proj_bias.chunk(3)):
                proj.bias.copy_(b)
            dst.out_proj.bias.copy_(src.out_proj.bias)
        dst.out_proj.weight.copy_(src.out_proj.weight)
    dst.train(src.training)
    return dst


def mha_to_torch(src) -> nn.MultiheadAttention:
    """Build a :class:`torch.nn.MultiheadAttention` with the weights of our module."""
    att = _attention()
    if not isinstance(src, att.MultiheadAttention):
        raise TypeError(f"mha_to_torch expects attention.MultiheadAttention, got {type(src).__name__}")
    bias = src.q_proj.bias is not None
    w = src.out_proj.weight
    dst = nn.MultiheadAttention(src.embed_dim, src.num_heads, dropout=src.dropout, bias=bias, kdim=src.kdim,
                                vdim=src.vdim, batch_first=src.batch_first, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        if dst._qkv_same_embed_dim:
            dst.in_proj_weight.copy_(torch.cat([src.q_proj.weight, src.k_proj.weight, src.v_proj.weight]))
        else:
            dst.q_proj_weight.copy_(src.q_proj.weight)
            dst.k_proj_weight.copy_(src.k_proj.weight)
            dst.v_proj_weight.copy_(src.v_proj.weight)
        if bias:
            dst.in_proj_bias.copy_(torch.cat([src.q_proj.bias, src.k_proj.bias, src.v_proj.bias]))
            dst.out_proj.bias.copy_(src.out_proj.bias)
        dst.out_proj.weight.copy_(src.out_proj.weight)
    dst.train(src.training)
    return dst
