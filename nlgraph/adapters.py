"""Weight conversion between nlgraph's modules and other parameter layouts.

* :func:`mha_from_torch` / :func:`mha_to_torch`: our :class:`attention.MultiheadAttention` <->
  :class:`torch.nn.MultiheadAttention` (packed ``in_proj_weight`` or separate
  ``q/k/v_proj_weight`` when kdim/vdim differ; with or without bias).
* :func:`nonlocal_to_mha` / :func:`mha_to_nonlocal`: an embedded-gaussian non-local block <-> a
  single-head attention over its H*W (or T*H*W) tokens: ``block(x) == x + mha(tokens)``.
* :func:`nonlocal_state_dict` / :func:`nonlocal_from_state_dict`: import the parameter layouts of
  the two most used public non-local implementations, ``"non_local_pytorch"`` (blocks holding
  ``g``, ``theta``, ``phi``, ``W`` = conv + BN, with ``.0`` nesting when sub-sampling) and
  ``"mmcv"`` (``g``/``theta``/``phi``/``conv_out`` as ConvModules: ``*.conv.weight``, a norm named
  ``bn``, ``concat_project.conv.weight``).

Every conversion copies tensors (no sharing) and produces a module whose forward and gradients
match the source up to float rounding; the tests prove it for every layout.

This module sits above the core (it imports the modules built on it); the core never imports it.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn

from .nonlocal_blocks import NonLocal1d, NonLocal2d, NonLocal3d, _NonLocalNd

__all__ = ["mha_from_torch", "mha_to_torch", "nonlocal_to_mha", "mha_to_nonlocal", "nonlocal_state_dict",
           "nonlocal_from_state_dict", "NONLOCAL_LAYOUTS"]

NONLOCAL_LAYOUTS = ("non_local_pytorch", "mmcv")


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


def _linear_of(conv: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight (out, in), bias (out,)) of a 1x1(x1) convolution."""
    w = conv.weight.reshape(conv.weight.shape[0], -1)
    b = conv.bias if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    return w, b


def _output_map(block: _NonLocalNd) -> tuple[Tensor, Tensor]:
    """W (and BN with running statistics) as one affine map (C, inter), (C,)."""
    if not block.bn_layer:
        return _linear_of(block.W)
    conv, bn = block.W[0], block.W[1]
    if bn.training or not bn.track_running_stats:
        raise ValueError("nonlocal_to_mha: BatchNorm with batch statistics is not a fixed linear map; "
                         "call block.eval() first (or use bn_layer=False)")
    w, b = _linear_of(conv)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale[:, None] * w, scale * (b - bn.running_mean) + bn.bias


def nonlocal_to_mha(block: _NonLocalNd):
    """A single-head :class:`attention.MultiheadAttention` with ``block(x) == x + mha(q, k, v)[0]``.

    With ``sub_sample=False`` the attention runs on the block's own tokens:
    ``q = k = v = x.flatten(2).transpose(1, 2)``, and theta/phi/g/W become the q/k/v/out projections
    (zero-padded from inter_channels to embed_dim = in_channels, which changes no dot product).
    With ``sub_sample=True`` the block max-pools *after* phi and g, which no linear key projection
    can express; the keys and values are then the pooled projected tokens
    ``_, k, v = block.embed(x)`` and the returned module's k/v projections are (padded) identities.

    The logit scale (1, or 1/sqrt(inter_channels) with use_scale) is folded into q_proj; BatchNorm is
    folded into out_proj and must be in eval mode.
    """
    if not isinstance(block, _NonLocalNd):
        raise TypeError(f"nonlocal_to_mha expects a NonLocal1d/2d/3d block, got {type(block).__name__}")
    if block.mode != "embedded_gaussian":
        raise ValueError(f"nonlocal_to_mha: only the embedded_gaussian mode is attention, got {block.mode!r}")
    c, d = block.in_channels, block.inter_channels
    if d > c:
        raise ValueError(f"nonlocal_to_mha: inter_channels ({d}) > in_channels ({c}) does not fit embed_dim = {c}")
    kv_dim = d if block.sub_sample else c
    ref = block.g.weight
    mha = _attention().MultiheadAttention(c, 1, bias=True, kdim=kv_dim, vdim=kv_dim).to(ref.device, ref.dtype)
    s_nl = block.affinity().scale
    alpha = s_nl * math.sqrt(c)  # mha scales logits by 1/sqrt(head_dim) = 1/sqrt(c)
    with torch.no_grad():
        for p in mha.parameters():
            p.zero_()
        wq, bq = _linear_of(block.theta)
        mha.q_proj.weight[:d] = alpha * wq
        mha.q_proj.bias[:d] = alpha * bq
        for proj, conv in ((mha.k_proj, block.phi), (mha.v_proj, block.g)):
            if block.sub_sample:
                proj.weight[:d] = torch.eye(d, dtype=ref.dtype, device=ref.device)
            else:
                w, b = _linear_of(conv)
                proj.weight[:d] = w
                proj.bias[:d] = b
        wo, bo = _output_map(block)
        mha.out_proj.weight[:, :d] = wo
        mha.out_proj.bias.copy_(bo)
    mha.train(block.training)
    return mha


def mha_to_nonlocal(mha, dim: int = 2) -> _NonLocalNd:
    """An embedded-gaussian NonLocal{dim}d with ``block(x) == x + mha(tokens)[0]`` for a single-head module.

    The block has inter_channels = embed_dim, ``use_scale=True`` (the 1/sqrt(d) of attention),
    ``sub_sample=False`` and ``bn_layer=False``; theta/phi/g/W take the q/k/v/out projections.
    """
    att = _attention()
    if not isinstance(mha, att.MultiheadAttention):
        raise TypeError(f"mha_to_nonlocal expects attention.MultiheadAttention, got {type(mha).__name__}")
    if mha.num_heads != 1 or mha.kdim != mha.embed_dim or mha.vdim != mha.embed_dim:
        raise ValueError(f"mha_to_nonlocal needs one head and kdim = vdim = embed_dim, got num_heads="
                         f"{mha.num_heads}, kdim={mha.kdim}, vdim={mha.vdim}, embed_dim={mha.embed_dim}")
    cls = {1: NonLocal1d, 2: NonLocal2d, 3: NonLocal3d}.get(dim)
    if cls is None:
        raise ValueError(f"dim must be 1, 2 or 3, got {dim!r}")
    e = mha.embed_dim
    ref = mha.out_proj.weight
    block = cls(e, inter_channels=e, mode="embedded_gaussian", sub_sample=False, bn_layer=False,
                use_scale=True).to(ref.device, ref.dtype)
    with torch.no_grad():
        for conv, lin in ((block.theta, mha.q_proj), (block.phi, mha.k_proj), (block.g, mha.v_proj),
                          (block.W, mha.out_proj)):
            conv.weight.copy_(lin.weight.reshape(conv.weight.shape))
            conv.bias.copy_(lin.bias if lin.bias is not None else torch.zeros_like(conv.bias))
    block.train(mha.training)
    return block


def nonlocal_state_dict(state_dict: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """Convert a public implementation's non-local state_dict to this library's layout.

    Args:
        state_dict: the source block's ``state_dict()`` (keys relative to the block).
        layout: ``"non_local_pytorch"`` or ``"mmcv"`` (see the module docstring).

    Returns:
        A dict for ``NonLocalNd.load_state_dict`` (strict). Every source tensor is used; an unknown
        key raises ValueError naming it.
    """
    if layout not in NONLOCAL_LAYOUTS:
        raise ValueError(f"layout must be one of {NONLOCAL_LAYOUTS}, got {layout!r}")
    sd = dict(state_dict)
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(src: str, dst: str) -> bool:
        if src in sd:
            out[dst] = sd[src]
            used.add(src)
            return True
        return False

    conv = "" if layout == "non_local_pytorch" else "conv."
    for name in ("g", "theta", "phi"):
        for suffix in ("weight", "bias"):
            take(f"{name}.{conv}{suffix}", f"{name}.{suffix}") or take(f"{name}.0.{conv}{suffix}",
                                                                        f"{name}.{suffix}")
    bn_keys = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    if layout == "non_local_pytorch":
        for k in list(sd):
            if k.startswith("W."):
                take(k, k)
        take("concat_project.0.weight", "concat_project")
    else:
        if "conv_out.bn.weight" in sd:
            take("conv_out.conv.weight", "W.0.weight")
            if not take("conv_out.conv.bias", "W.0.bias"):  # ConvModule drops the bias before a norm
                w = sd["conv_out.conv.weight"]
                out["W.0.bias"] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
            for k in bn_keys:
                take(f"conv_out.bn.{k}", f"W.1.{k}")
        else:
            take("conv_out.conv.weight", "W.weight")
            if not take("conv_out.conv.bias", "W.bias"):
                w = sd["conv_out.conv.weight"]
                out["W.bias"] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        take("concat_project.conv.weight", "concat_project")
    if "concat_project" in out:
        out["concat_project"] = out["concat_project"].reshape(-1)
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"nonlocal_state_dict: keys not understood for layout {layout!r}: {unused}")
    return out


def nonlocal_from_state_dict(state_dict: Mapping[str, Tensor], layout: str, mode: str = "embedded_gaussian",
                             sub_sample: bool = False, use_scale: bool = False) -> _NonLocalNd:
    """Build a NonLocal1d/2d/3d from a public implementation's state_dict (strict load).

    Channels, dimensionality and the presence of BatchNorm are read from the tensors; ``mode``,
    ``sub_sample`` and ``use_scale`` are architecture choices the weights do not record (mmcv's
    default is ``use_scale=True``, the Non-local_pytorch port has no scale).
    """
    converted = nonlocal_state_dict(state_dict, layout)
    if "g.weight" not in converted:
        raise ValueError("nonlocal_from_state_dict: the state_dict has no g convolution weight")
    g = converted["g.weight"]
    dim = g.dim() - 2
    cls = {1: NonLocal1d, 2: NonLocal2d, 3: NonLocal3d}.get(dim)
    if cls is None:
        raise ValueError(f"nonlocal_from_state_dict: g.weight has shape {tuple(g.shape)}, not a 1x1 conv")
    block = cls(g.shape[1], inter_channels=g.shape[0], mode=mode, sub_sample=sub_sample,
                bn_layer="W.1.weight" in converted, use_scale=use_scale).to(g.device, g.dtype)
    block.load_state_dict(converted)
    return block
