"""Weight conversion between nlgraph's modules and other parameter layouts.

* :func:`mha_from_torch` / :func:`mha_to_torch`: our :class:`attention.MultiheadAttention` <->
  :class:`torch.nn.MultiheadAttention`. Ours subclasses torch's and has its parameters under its
  names, so both are a strict ``load_state_dict`` (packed or separate in-projections, bias on or
  off, add_bias_kv, add_zero_attn, kdim/vdim, batch_first, device, dtype).
* :func:`nonlocal_to_mha` / :func:`mha_to_nonlocal`: an embedded-gaussian non-local block <-> a
  single-head attention over its H*W (or T*H*W) tokens: ``block(x) == x + mha(t, t, t)[0]``.
* :func:`nonlocal_state_dict` / :func:`nonlocal_from_state_dict` import, and
  :func:`nonlocal_to_state_dict` exports, the parameter layouts of public non-local blocks
  (:data:`NONLOCAL_LAYOUTS`):

  ``"non_local_pytorch"`` (AlexHex7/Non-local_pytorch)
      ``g``, ``theta``, ``phi`` convolutions, ``W`` = conv or ``Sequential(conv, BN)``; sub-sampling
      wraps g (and phi) as ``Sequential(conv, maxpool)``: ``g.0.weight``; ``concat_project.0.weight``.
      No logit scale.
  ``"mmcv"`` (mmcv.cnn.NonLocal1d/2d/3d, used by mmseg/mmdet/mmaction)
      ``g``/``theta``/``phi``/``conv_out`` ConvModules: ``*.conv.weight``; ``conv_out``'s norm is
      ``conv_out.bn`` (BN, SyncBN) or ``conv_out.gn`` (GroupNorm), its conv then has no bias;
      sub-sampling nests as ``g.0.conv.weight``; ``concat_project.conv.weight``. ``use_scale``
      (default True there) divides embedded-gaussian logits by sqrt(inter_channels).
  ``"timm"`` (timm.layers.NonLocalAttn)
      ``t``, ``p``, ``g`` (theta, phi, g), ``z`` (W) convolutions and ``norm`` (BatchNorm2d);
      embedded gaussian, 2-D, no sub-sampling; ``use_scale`` (default True) multiplies the logits by
      in_channels ** -0.5 (not inter_channels); reduction rd_channels =
      make_divisible(in_channels / 8, 8) by default (read from the weights here).

  Everything the keys record is read from them (dimensionality, channels, sub-sampling, the mode
  where keys decide it, BatchNorm / GroupNorm); an explicit argument that contradicts the keys is a
  ValueError, as is a missing or unknown key (named). Whole-model state_dicts work: the block's key
  prefix (e.g. ``decode_head.nl_block.``) is found automatically, or given as ``prefix=``.
* :func:`criss_cross_from_state_dict`: CCNet's and mmcv's ``CrissCrossAttention`` (mmcv's
  ``gamma.scale`` has shape ()) into :class:`attention.CrissCrossAttention`.

Every conversion copies tensors (no sharing with its input) and produces a module whose forward and
gradients match the source up to float rounding; the tests prove it against the peers' forward
passes rebuilt from their public code.

This module sits above the core (it imports the modules built on it); the core never imports it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, cast

import torch
from torch import Tensor, nn

from .affinity import Softmax
from .nonlocal_blocks import MODES, NonLocal1d, NonLocal2d, NonLocal3d, _NonLocalNd

__all__ = ["mha_from_torch", "mha_to_torch", "nonlocal_to_mha", "mha_to_nonlocal", "nonlocal_state_dict",
           "nonlocal_from_state_dict", "nonlocal_to_state_dict", "criss_cross_from_state_dict",
           "NONLOCAL_LAYOUTS", "CRISS_CROSS_LAYOUTS"]

NONLOCAL_LAYOUTS = ("non_local_pytorch", "mmcv", "timm")
CRISS_CROSS_LAYOUTS = ("ccnet", "mmcv")

_BLOCKS = {1: NonLocal1d, 2: NonLocal2d, 3: NonLocal3d}
_BN_STATS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _attention():
    import attention  # a layer above the core: imported on use

    return attention


# ---------------------------------------------------------------- torch.nn.MultiheadAttention


def _mha_config(src: nn.MultiheadAttention) -> dict:
    w = src.out_proj.weight
    return dict(embed_dim=src.embed_dim, num_heads=src.num_heads, dropout=float(src.dropout),
                bias=src.in_proj_bias is not None, add_bias_kv=src.bias_k is not None,
                add_zero_attn=bool(src.add_zero_attn), kdim=src.kdim, vdim=src.vdim,
                batch_first=bool(src.batch_first), device=w.device, dtype=w.dtype)


def mha_from_torch(src: nn.MultiheadAttention):
    """An :class:`attention.MultiheadAttention` with the configuration and (copied) weights of ``src``.

    Typical use: ``layer.self_attn = mha_from_torch(layer.self_attn)`` in an
    ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``.

    Raises:
        TypeError: ``src`` is not a torch.nn.MultiheadAttention.
    """
    if not isinstance(src, nn.MultiheadAttention):
        raise TypeError(f"mha_from_torch expects torch.nn.MultiheadAttention, got {type(src).__name__}")
    dst = _attention().MultiheadAttention(**_mha_config(src))
    dst.load_state_dict(src.state_dict())  # the same parameter names: strict, copying
    dst.train(src.training)
    return dst


def mha_to_torch(src) -> nn.MultiheadAttention:
    """A plain :class:`torch.nn.MultiheadAttention` with the configuration and (copied) weights of ours."""
    att = _attention()
    if not isinstance(src, att.MultiheadAttention):
        raise TypeError(f"mha_to_torch expects attention.MultiheadAttention, got {type(src).__name__}")
    dst = nn.MultiheadAttention(**_mha_config(src))
    dst.load_state_dict(src.state_dict())
    dst.train(src.training)
    return dst


def _mha_projections(mha) -> tuple[Tensor, Tensor, Tensor]:
    """(W_q, W_k, W_v) of a torch-layout module: views of in_proj_weight, or the separate weights."""
    if mha._qkv_same_embed_dim:
        return mha.in_proj_weight.chunk(3)
    return mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight


# ---------------------------------------------------------------- non-local block <-> attention


def _conv_params(conv: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    """(weight, bias or None) of a convolution (``nn.Module.__getattr__`` is typed Tensor | Module)."""
    return cast(Tensor, conv.weight), cast(Optional[Tensor], conv.bias)


def _linear_of(conv: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight (out, in), bias (out,)) of a 1x1(x1) convolution."""
    weight, bias = _conv_params(conv)
    w = weight.reshape(weight.shape[0], -1)
    b = bias if bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    return w, b


def _logit_scale(block: _NonLocalNd) -> float:
    """The logit scale of an embedded-gaussian block's Softmax affinity (1, or 1/sqrt(inter_channels))."""
    aff = block.affinity()
    if not isinstance(aff, Softmax) or not isinstance(aff.scale, (int, float)):
        raise TypeError(f"{type(block).__name__}.affinity() is not a Softmax with a number scale: {aff!r}")
    return float(aff.scale)


def _conv_norm(block: _NonLocalNd) -> nn.Sequential:
    """``block.W`` of a block built with ``bn_layer=True``: the ``Sequential(conv, norm)``."""
    w = block.W
    if not isinstance(w, nn.Sequential) or len(w) != 2:
        raise TypeError(f"{type(block).__name__}.W must be nn.Sequential(conv, norm) with bn_layer=True, "
                        f"got {type(w).__name__}")
    return w


def _output_map(block: _NonLocalNd) -> tuple[Tensor, Tensor]:
    """W (and BN with running statistics) as one affine map (C, inter), (C,)."""
    if not block.bn_layer:
        return _linear_of(block.W)
    conv, bn = _conv_norm(block)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise ValueError(f"nonlocal_to_mha: the block's norm is {type(bn).__name__}, which normalises over "
                         f"positions and is no per-token linear map; only BatchNorm (eval mode) folds")
    mean, var = bn.running_mean, bn.running_var
    if bn.training or not bn.track_running_stats or mean is None or var is None:
        raise ValueError("nonlocal_to_mha: BatchNorm with batch statistics is not a fixed linear map; "
                         "call block.eval() first (or use bn_layer=False)")
    w, b = _linear_of(conv)
    scale = bn.weight / torch.sqrt(var + bn.eps)
    return scale[:, None] * w, scale * (b - mean) + bn.bias


def nonlocal_to_mha(block: _NonLocalNd):
    """A single-head :class:`attention.MultiheadAttention` with ``block(x) == t + mha(t, k, v)[0]``.

    The module is batch_first (tokens (B, N, C)). With ``sub_sample=False`` the attention runs on
    the block's own tokens: ``t = k = v = x.flatten(2).transpose(1, 2)``, and theta/phi/g/W become
    the q/k/v/out projections (zero-padded from inter_channels to embed_dim = in_channels, which
    changes no dot product). With ``sub_sample=True`` the block max-pools *after* phi and g, which
    no linear key projection can express; the keys and values are then the pooled projected tokens
    ``_, k, v = block.embed(x)`` and the returned module's k/v projections are (padded) identities.

    The logit scale (1, or 1/sqrt(inter_channels) with use_scale) is folded into the q projection;
    BatchNorm is folded into out_proj and must be in eval mode.
    """
    if not isinstance(block, _NonLocalNd):
        raise TypeError(f"nonlocal_to_mha expects a NonLocal1d/2d/3d block, got {type(block).__name__}")
    if block.mode != "embedded_gaussian":
        raise ValueError(f"nonlocal_to_mha: only the embedded_gaussian mode is attention, got {block.mode!r}")
    c, d = block.in_channels, block.inter_channels
    if d > c:
        raise ValueError(f"nonlocal_to_mha: inter_channels ({d}) > in_channels ({c}) does not fit "
                         f"embed_dim = {c}")
    wo, bo = _output_map(block)
    kv_dim = d if block.sub_sample else c
    ref = block.g.weight
    mha = _attention().MultiheadAttention(c, 1, bias=True, kdim=kv_dim, vdim=kv_dim, batch_first=True,
                                          device=ref.device, dtype=ref.dtype)
    alpha = _logit_scale(block) * math.sqrt(c)  # mha scales logits by 1/sqrt(head_dim) = 1/sqrt(c)
    with torch.no_grad():
        for p in mha.parameters():
            p.zero_()
        wq, wk, wv = _mha_projections(mha)
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        w, b = _linear_of(block.theta)
        wq[:d] = alpha * w
        bq[:d] = alpha * b
        for wt, bt, conv in ((wk, bk, block.phi), (wv, bv, block.g)):
            if block.sub_sample:
                wt[:d] = torch.eye(d, dtype=ref.dtype, device=ref.device)
            else:
                w, b = _linear_of(conv)
                wt[:d] = w
                bt[:d] = b
        mha.out_proj.weight[:, :d] = wo
        mha.out_proj.bias.copy_(bo)
    mha.train(block.training)
    return mha


def mha_to_nonlocal(mha, dim: int = 2) -> _NonLocalNd:
    """An embedded-gaussian NonLocal{dim}d with ``block(x) == t + mha(t, t, t)[0]`` for a single-head module.

    ``t`` are the block's tokens (B, N, C) (for a sequence-first module, their transpose). The
    block has inter_channels = embed_dim, ``use_scale=True`` (the 1/sqrt(d) of attention),
    ``sub_sample=False`` and ``bn_layer=False``; theta/phi/g/W take the q/k/v/out projections.
    """
    att = _attention()
    if not isinstance(mha, att.MultiheadAttention):
        raise TypeError(f"mha_to_nonlocal expects attention.MultiheadAttention, got {type(mha).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be the int 1, 2 or 3, got {type(dim).__name__} {dim!r}")
    if dim not in _BLOCKS:
        raise ValueError(f"dim must be 1, 2 or 3, got {dim!r}")
    if mha.num_heads != 1 or mha.kdim != mha.embed_dim or mha.vdim != mha.embed_dim:
        raise ValueError(f"mha_to_nonlocal needs one head and kdim = vdim = embed_dim, got num_heads="
                         f"{mha.num_heads}, kdim={mha.kdim}, vdim={mha.vdim}, embed_dim={mha.embed_dim}")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("mha_to_nonlocal: add_bias_kv / add_zero_attn append keys a non-local block does "
                         "not have")
    e = mha.embed_dim
    ref = mha.out_proj.weight
    block = _BLOCKS[dim](e, inter_channels=e, mode="embedded_gaussian", sub_sample=False, bn_layer=False,
                         use_scale=True).to(ref.device, ref.dtype)
    wq, wk, wv = _mha_projections(mha)
    biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
    with torch.no_grad():
        for conv, w, b in ((block.theta, wq, biases[0]), (block.phi, wk, biases[1]), (block.g, wv, biases[2]),
                           (block.W, mha.out_proj.weight, mha.out_proj.bias)):
            weight, bias = _conv_params(conv)
            bias = cast(Tensor, bias)  # the block above is built with biased convolutions
            weight.copy_(w.reshape(weight.shape))
            bias.copy_(b if b is not None else torch.zeros_like(bias))
    block.train(mha.training)
    return block


# ---------------------------------------------------------------- public non-local layouts


def _check_layout(layout: Any, known: tuple) -> None:
    if layout not in known:
        raise ValueError(f"layout must be one of {known}, got {layout!r}")


def _find_prefix(sd: Mapping[str, Any], prefix: Optional[str], probes: list[tuple[str, str]],
                 what: str) -> str:
    """The key prefix of one block in ``sd``: ``prefix`` (normalised to end in '.'), or found from probes.

    A probe (a, b) matches prefix P when both P + a and P + b are keys."""
    if prefix is not None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {type(prefix).__name__}")
        prefix = prefix if prefix == "" or prefix.endswith(".") else prefix + "."
        if not any(k.startswith(prefix) for k in sd):
            raise ValueError(f"no key of the state_dict starts with prefix {prefix!r}")
        return prefix
    found = set()
    for k in sd:
        for a, b in probes:
            if k.endswith(a):
                p = k[: len(k) - len(a)]
                if (p == "" or p.endswith(".")) and p + b in sd:
                    found.add(p)
    if len(found) == 1:
        return found.pop()
    if not found:
        sample = sorted(sd)[:6]
        raise ValueError(f"no {what} found in the state_dict (looked for keys ending in "
                         f"{sorted({a for a, _ in probes})}); its keys start with {sample}")
    raise ValueError(f"the state_dict holds several {what}s, at prefixes {sorted(found)}; pass prefix= to "
                     f"pick one")


def _mmcv_norm(norm_cfg: Optional[Mapping], recorded: Optional[str]) -> Optional[dict]:
    """The norm of mmcv's conv_out: None, or {"kind": "bn"|"gn", "eps", "momentum", "num_groups", ...}."""
    if norm_cfg is not None and not isinstance(norm_cfg, Mapping):
        raise TypeError(f"norm_cfg must be None or a dict like mmcv's (e.g. dict(type='GN', num_groups=32)), "
                        f"got {type(norm_cfg).__name__}")
    if norm_cfg is None:
        if recorded == "gn":
            raise ValueError("the state_dict has a GroupNorm (conv_out.gn.*) whose number of groups its "
                             "weights do not record: pass norm_cfg=dict(type='GN', num_groups=...) as the "
                             "model's config does")
        if recorded is None:
            return None
        return {"kind": "bn", "eps": 1e-5, "momentum": 0.1, "requires_grad": True}
    cfg = dict(norm_cfg)
    kind_name = cfg.pop("type", None)
    kind = {"BN": "bn", "BN1d": "bn", "BN2d": "bn", "BN3d": "bn", "SyncBN": "bn", "GN": "gn"}.get(kind_name)
    if kind is None:
        raise ValueError(f"norm_cfg type must be one of BN, BN1d, BN2d, BN3d, SyncBN, GN, got {kind_name!r}")
    if recorded != kind:
        has = ("no norm (conv_out.conv.bias, no conv_out.bn/gn)" if recorded is None
               else f"conv_out.{recorded}.*")
        raise ValueError(f"norm_cfg type {kind_name!r} contradicts the state_dict, which records {has}")
    out = {"kind": kind, "eps": float(cfg.pop("eps", 1e-5)),
           "requires_grad": bool(cfg.pop("requires_grad", True))}
    if kind == "bn":
        out["momentum"] = cfg.pop("momentum", 0.1)
    else:
        groups = cfg.pop("num_groups", None)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"norm_cfg for GN needs num_groups, a positive int, got {groups!r}")
        out["num_groups"] = groups
    cfg.pop("affine", None)
    if cfg:
        raise ValueError(f"norm_cfg keys not understood: {sorted(cfg)}")
    return out


def _layout_keys(layout: str, mode: str, sub_sample: bool,
                 norm: Optional[str]) -> list[tuple[str, str, bool]]:
    """(our key, the layout's key, required) for every tensor of a block."""
    nest = ".0" if sub_sample else ""
    pairs: list[tuple[str, str, bool]] = []

    def add(ours: str, theirs: str, required: bool = True) -> None:
        pairs.append((ours, theirs, required))

    conv = "" if layout in ("non_local_pytorch", "timm") else ".conv"
    names = ({"theta": "t", "phi": "p", "g": "g"} if layout == "timm"
             else {n: n for n in ("theta", "phi", "g")})
    for ours in ("g", "theta", "phi"):
        if ours != "g" and mode == "gaussian":
            continue
        pooled = nest if ours in ("g", "phi") else ""
        for s in ("weight", "bias"):
            add(f"{ours}.{s}", f"{names[ours]}{pooled}{conv}.{s}")
    if mode == "concatenation":
        add("concat_project",
            "concat_project.0.weight" if layout == "non_local_pytorch" else "concat_project.conv.weight")
    if layout == "non_local_pytorch":
        if norm is None:
            add("W.weight", "W.weight")
            add("W.bias", "W.bias")
        else:
            for s in ("weight", "bias"):
                add(f"W.0.{s}", f"W.0.{s}")
            for s in _BN_STATS:
                add(f"W.1.{s}", f"W.1.{s}", s != "num_batches_tracked")
    elif layout == "mmcv":
        if norm is None:
            add("W.weight", "conv_out.conv.weight")
            add("W.bias", "conv_out.conv.bias")
        else:
            add("W.0.weight", "conv_out.conv.weight")
            add("W.0.bias", "conv_out.conv.bias", False)  # ConvModule drops the bias before a norm
            stats = _BN_STATS if norm == "bn" else ("weight", "bias")
            for s in stats:
                add(f"W.1.{s}", f"conv_out.{norm}.{s}", s != "num_batches_tracked")
    else:
        add("W.0.weight", "z.weight")
        add("W.0.bias", "z.bias")
        for s in _BN_STATS:
            add(f"W.1.{s}", f"norm.{s}", s != "num_batches_tracked")
    return pairs


_G_KEYS = {"non_local_pytorch": ("g.weight", "g.0.weight"), "mmcv": ("g.conv.weight", "g.0.conv.weight"),
           "timm": ("g.weight",)}
_OUT_KEYS = {"non_local_pytorch": ("W.weight", "W.0.weight"), "mmcv": ("conv_out.conv.weight",),
             "timm": ("z.weight",)}
_DEFAULT_SCALE = {"non_local_pytorch": False, "mmcv": True, "timm": True}


def _layout_scale(layout: str, use_scale: bool, in_channels: int, inter_channels: int) -> float:
    """The layout's embedded-gaussian logit scale."""
    if not use_scale:
        return 1.0
    return in_channels ** -0.5 if layout == "timm" else inter_channels ** -0.5


def _read_layout(state_dict: Mapping[str, Tensor], layout: str, mode: Optional[str],
                 sub_sample: Optional[bool], use_scale: Optional[bool], prefix: Optional[str],
                 norm_cfg: Optional[Mapping]):
    """Parse a layout's block: (our state_dict (copies), the block's constructor arguments, norm config)."""
    _check_layout(layout, NONLOCAL_LAYOUTS)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be None (read from the keys) or one of {MODES}, got {mode!r}")
    for name, val in (("sub_sample", sub_sample), ("use_scale", use_scale)):
        if val is not None and not isinstance(val, bool):
            raise TypeError(f"{name} must be None (the default) or a bool, got {val!r}")
    if norm_cfg is not None and layout != "mmcv":
        raise ValueError(f"norm_cfg is mmcv's argument; layout {layout!r} records its norm in its keys")
    g_keys, out_keys = _G_KEYS[layout], _OUT_KEYS[layout]
    pre = _find_prefix(state_dict, prefix, [(g, o) for g in g_keys for o in out_keys],
                       f"{layout} non-local block")
    sd = {k[len(pre):]: v for k, v in state_dict.items() if k.startswith(pre)}
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"state_dict[{pre + k!r}] must be a tensor, got {type(v).__name__}")
    where = f" (prefix {pre!r})" if pre else ""

    # sub-sampling: recorded by the nesting of g as Sequential(conv, maxpool)
    pooled = len(g_keys) > 1 and g_keys[1] in sd
    if not pooled and g_keys[0] not in sd:
        raise ValueError(f"the state_dict{where} has no g convolution ({' or '.join(g_keys)})")
    if sub_sample is not None and sub_sample != pooled:
        why = (f"{g_keys[1]!r} records a max-pool after g (Sequential(conv, pool))" if pooled else
               f"{g_keys[0]!r} records g without pooling" + (" (timm's NonLocalAttn never sub-samples)"
                                                              if layout == "timm" else ""))
        raise ValueError(f"sub_sample={sub_sample} contradicts the {layout} state_dict{where}: {why}")
    if layout != "timm":  # phi is pooled with g (except in gaussian mode, where phi is the pool itself)
        conv = "" if layout == "non_local_pytorch" else ".conv"
        phi_plain, phi_pooled = f"phi{conv}.weight", f"phi.0{conv}.weight"
        if (phi_pooled in sd and not pooled) or (phi_plain in sd and pooled):
            g_key = g_keys[1] if pooled else g_keys[0]
            phi_key = phi_pooled if phi_pooled in sd else phi_plain
            raise ValueError(f"the {layout} state_dict{where} is inconsistent: {g_key!r} says "
                             f"sub_sample={pooled} but {phi_key!r} says sub_sample={not pooled}")
    # mode: gaussian has no theta/phi, concatenation has concat_project; the rest needs mode=
    theta_key = {"non_local_pytorch": "theta.weight", "mmcv": "theta.conv.weight", "timm": "t.weight"}[layout]
    concat = any(k.startswith("concat_project.") for k in sd)
    recorded = "gaussian" if theta_key not in sd else "concatenation" if concat else None
    if layout == "timm":
        recorded = "embedded_gaussian"
    if mode is not None and recorded is not None and mode != recorded:
        why = ("timm's NonLocalAttn is embedded gaussian" if layout == "timm" else
               "no theta convolution" if recorded == "gaussian" else "a concat_project")
        raise ValueError(f"mode={mode!r} contradicts the {layout} state_dict{where}, which records "
                         f"{recorded!r} ({why})")
    if mode == "concatenation" and not concat:
        raise ValueError(f"mode='concatenation' contradicts the {layout} state_dict{where}: it has no "
                         f"concat_project")
    mode = mode or recorded or "embedded_gaussian"
    # the norm after W
    if layout == "non_local_pytorch":
        norm_kind = "bn" if any(k.startswith("W.1.") for k in sd) else None
        norm = None if norm_kind is None else {"kind": "bn"}
    elif layout == "timm":
        norm_kind, norm = "bn", {"kind": "bn"}
    else:
        kinds = sorted({k.split(".")[1] for k in sd if k.startswith("conv_out.") and k.count(".") >= 2}
                       - {"conv"})
        if len(kinds) > 1 or (kinds and kinds[0] not in ("bn", "gn")):
            raise ValueError(f"conv_out norm {kinds} not understood{where}: mmcv names BatchNorm 'bn' and "
                             f"GroupNorm 'gn'")
        norm_kind = kinds[0] if kinds else None
        norm = _mmcv_norm(norm_cfg, norm_kind)

    pairs = _layout_keys(layout, mode, pooled, norm_kind)
    missing = [theirs for _, theirs, required in pairs if required and theirs not in sd]
    if missing:
        raise ValueError(f"the {layout} state_dict{where} lacks {[pre + k for k in missing]} (expected for "
                         f"mode {mode!r}, sub_sample={pooled}, norm={norm_kind})")
    unknown = sorted(set(sd) - {theirs for _, theirs, _ in pairs})
    if unknown:
        raise ValueError(f"keys not understood for layout {layout!r} (mode {mode!r}, sub_sample={pooled}, "
                         f"norm={norm_kind}): {[pre + k for k in unknown]}")
    g = sd[g_keys[1] if pooled else g_keys[0]]
    dim = g.dim() - 2
    if dim not in _BLOCKS or any(s != 1 for s in g.shape[2:]):
        raise ValueError(f"g's weight has shape {tuple(g.shape)}, not a 1x1 conv of a 1d/2d/3d block")
    if layout == "timm" and dim != 2:
        raise ValueError(f"timm's NonLocalAttn is 2-D, but g's weight has shape {tuple(g.shape)}")
    c, d = g.shape[1], g.shape[0]
    out: dict[str, Tensor] = {}
    for ours, theirs, _ in pairs:
        if theirs in sd:
            out[ours] = sd[theirs].detach().clone()
        elif ours.endswith("num_batches_tracked"):
            out[ours] = torch.zeros((), dtype=torch.long, device=g.device)
        else:  # mmcv's bias-free conv before a norm
            out[ours] = torch.zeros(c, dtype=g.dtype, device=g.device)
    if "concat_project" in out:
        out["concat_project"] = out["concat_project"].reshape(-1)
    if use_scale is None:
        use_scale = _DEFAULT_SCALE[layout]
    ours_scale = use_scale and layout != "timm"
    if layout == "timm" and use_scale and mode == "embedded_gaussian":
        # timm multiplies the logits by in_channels ** -0.5: folded into theta (the block has use_scale=False)
        s = _layout_scale("timm", True, c, d)
        out["theta.weight"].mul_(s)
        out["theta.bias"].mul_(s)
    arch = dict(in_channels=c, inter_channels=d, mode=mode, sub_sample=pooled, bn_layer=norm is not None,
                use_scale=ours_scale, dim=dim)
    return out, arch, norm, pre


def nonlocal_state_dict(state_dict: Mapping[str, Tensor], layout: str, mode: Optional[str] = None,
                        sub_sample: Optional[bool] = None, use_scale: Optional[bool] = None, *,
                        prefix: Optional[str] = None,
                        norm_cfg: Optional[Mapping] = None) -> dict[str, Tensor]:
    """Convert a public implementation's non-local state_dict to this library's layout (copies).

    Args:
        state_dict: the source block's ``state_dict()``, or a whole model's (see ``prefix``).
        layout: one of :data:`NONLOCAL_LAYOUTS` (see the module docstring).
        mode: None reads it from the keys (gaussian: no theta; concatenation: a concat_project;
            otherwise embedded_gaussian, the common default, unless ``mode="dot_product"``).
        sub_sample: None reads it from the keys; a contradicting bool is a ValueError.
        use_scale: the source's logit scale; None = the layout's default (mmcv, timm: True). For
            timm the factor in_channels ** -0.5 is folded into theta (the block's use_scale is False).
        prefix: the block's key prefix in a whole-model state_dict (``"decode_head.nl_block."``);
            None finds it (a ValueError lists the candidates when there are several blocks).
        norm_cfg: mmcv's ``norm_cfg`` of the block (needed for GroupNorm: its number of groups).

    Returns:
        A dict for ``NonLocalNd.load_state_dict`` (strict). Every source tensor under the prefix is
        used; a missing or unknown key raises ValueError naming it.
    """
    return _read_layout(state_dict, layout, mode, sub_sample, use_scale, prefix, norm_cfg)[0]


def nonlocal_from_state_dict(state_dict: Mapping[str, Tensor], layout: str, mode: Optional[str] = None,
                             sub_sample: Optional[bool] = None, use_scale: Optional[bool] = None, *,
                             prefix: Optional[str] = None, norm_cfg: Optional[Mapping] = None) -> _NonLocalNd:
    """Build a NonLocal1d/2d/3d equal to a public implementation's block from its state_dict (strict load).

    Arguments as :func:`nonlocal_state_dict`. Dimensionality, channels, sub-sampling, BatchNorm or
    GroupNorm and (where the keys decide it) the mode are read from the tensors; ``use_scale``
    defaults to the layout's own default. A GroupNorm (mmcv, ``norm_cfg=dict(type='GN', ...)``)
    becomes the block's ``W[1]``. The block's train/eval mode is the constructor's (train): call
    ``.eval()`` as for the source.
    """
    sd, arch, norm, _ = _read_layout(state_dict, layout, mode, sub_sample, use_scale, prefix, norm_cfg)
    dim = arch.pop("dim")
    ref = sd["g.weight"]
    block = _BLOCKS[dim](**arch)
    if norm is not None:
        c = arch["in_channels"]
        if norm["kind"] == "gn":
            if c % norm["num_groups"]:
                raise ValueError(f"norm_cfg num_groups={norm['num_groups']} does not divide in_channels={c}")
            _conv_norm(block)[1] = nn.GroupNorm(norm["num_groups"], c, eps=norm["eps"])
        elif "eps" in norm:
            bn = _conv_norm(block)[1]
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):  # (always: the constructor's BatchNorm)
                bn.eps, bn.momentum = norm["eps"], norm["momentum"]
        if not norm.get("requires_grad", True):
            _conv_norm(block)[1].requires_grad_(False)
    block = block.to(ref.device, ref.dtype)
    expected = block.state_dict()
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{k}: the state_dict's tensor has shape {tuple(v.shape)}, a block with "
                             f"in_channels={arch['in_channels']}, inter_channels={arch['inter_channels']} "
                             f"needs {tuple(expected[k].shape)}")
    block.load_state_dict(sd)
    return block


def nonlocal_to_state_dict(block: _NonLocalNd, layout: str,
                           use_scale: Optional[bool] = None) -> dict[str, Tensor]:
    """Export a block to a public layout's state_dict (copies), for the peer's ``load_state_dict``.

    Args:
        block: a NonLocal1d/2d/3d (timm: a NonLocal2d, embedded gaussian, no sub-sampling, with BN).
        layout: one of :data:`NONLOCAL_LAYOUTS`.
        use_scale: the target module's ``use_scale`` (None: the layout's default: mmcv and timm True,
            non_local_pytorch has none). Where the target's logit scale differs from the block's, the
            ratio is folded into theta; build the peer with this use_scale (timm also with
            ``rd_channels=block.inter_channels`` unless its rule gives that number).

    Raises:
        ValueError: the layout cannot hold the block (named reason).
    """
    _check_layout(layout, NONLOCAL_LAYOUTS)
    if not isinstance(block, _NonLocalNd):
        raise TypeError(f"nonlocal_to_state_dict expects a NonLocal1d/2d/3d block, got "
                        f"{type(block).__name__}")
    if use_scale is not None and not isinstance(use_scale, bool):
        raise TypeError(f"use_scale must be None or a bool, got {use_scale!r}")
    use_scale = _DEFAULT_SCALE[layout] if use_scale is None else use_scale
    if layout == "non_local_pytorch" and use_scale:
        raise ValueError("non_local_pytorch's blocks have no logit scale (use_scale)")
    norm_mod = _conv_norm(block)[1] if block.bn_layer else None
    norm = None if norm_mod is None else "gn" if isinstance(norm_mod, nn.GroupNorm) else "bn"
    if layout == "timm":
        if block.dim != 2 or block.mode != "embedded_gaussian" or block.sub_sample or norm != "bn":
            raise ValueError(f"timm's NonLocalAttn is a 2-D embedded-gaussian block without sub-sampling and "
                             f"with BatchNorm; got {type(block).__name__}(mode={block.mode!r}, sub_sample="
                             f"{block.sub_sample}, norm={norm})")
    if layout == "non_local_pytorch" and norm == "gn":
        raise ValueError("non_local_pytorch's W has BatchNorm or no norm, not GroupNorm")
    ours = {k: v.detach().clone() for k, v in block.state_dict().items()}
    if block.mode == "embedded_gaussian":
        target = _layout_scale(layout, use_scale, block.in_channels, block.inter_channels)
        ratio = _logit_scale(block) / target
        if ratio != 1.0:
            ours["theta.weight"].mul_(ratio)
            ours["theta.bias"].mul_(ratio)
    out: dict[str, Tensor] = {}
    for key, theirs, required in _layout_keys(layout, block.mode, block.sub_sample, norm):
        t = ours[key]
        if key == "concat_project":
            t = t.reshape(1, -1, 1, 1)
        if not required and key == "W.0.bias":  # mmcv: no conv bias before a norm
            if norm == "bn":  # BN(conv + b) == BN'(conv) with running_mean - b (batch statistics cancel b)
                ours["W.1.running_mean"].sub_(t)
            elif bool((t != 0).any()):
                raise ValueError("mmcv's conv_out has no bias before its GroupNorm, and a non-zero W[0].bias "
                                 "does not fold into GroupNorm")
            continue
        out[theirs] = t
    return out


# ---------------------------------------------------------------- criss-cross attention


def criss_cross_from_state_dict(state_dict: Mapping[str, Tensor], layout: str = "mmcv", *,
                                prefix: Optional[str] = None):
    """Build an :class:`attention.CrissCrossAttention` from CCNet's or mmcv's ``CrissCrossAttention`` weights.

    Both hold ``query_conv``/``key_conv``/``value_conv`` (1x1 convs with bias) and a zero-initialised
    residual weight: ``gamma`` of shape (1,) in CCNet (speedinghzl/CCNet), ``gamma.scale`` of shape
    () in mmcv (an ``mmcv.cnn.Scale``). The module's key width is read from query_conv.

    Args:
        state_dict: the module's or a whole model's state_dict.
        layout: ``"mmcv"`` or ``"ccnet"``.
        prefix: the module's key prefix; None finds it.
    """
    _check_layout(layout, CRISS_CROSS_LAYOUTS)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    gamma = "gamma.scale" if layout == "mmcv" else "gamma"
    pre = _find_prefix(state_dict, prefix, [("query_conv.weight", gamma)], f"{layout} CrissCrossAttention")
    sd = {k[len(pre):]: v for k, v in state_dict.items() if k.startswith(pre)}
    keys = [f"{c}_conv.{s}" for c in ("query", "key", "value") for s in ("weight", "bias")] + [gamma]
    missing = [pre + k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"the {layout} CrissCrossAttention state_dict lacks {missing}")
    unknown = sorted(pre + k for k in set(sd) - set(keys))
    if unknown:
        raise ValueError(f"keys not understood for layout {layout!r}: {unknown}")
    wq, wv, g = sd["query_conv.weight"], sd["value_conv.weight"], sd[gamma]
    if wq.dim() != 4 or wv.dim() != 4 or wv.shape[0] != wv.shape[1] or wq.shape[1] != wv.shape[1]:
        raise ValueError(f"query_conv.weight {tuple(wq.shape)} / value_conv.weight {tuple(wv.shape)} are not "
                         f"the 1x1 convs (d, C, 1, 1) / (C, C, 1, 1) of a criss-cross module")
    if g.numel() != 1:
        raise ValueError(f"{gamma} must hold one number, got shape {tuple(g.shape)}")
    mod = _attention().CrissCrossAttention(wq.shape[1], key_channels=wq.shape[0]).to(wq.device, wq.dtype)
    ours = {k: sd[k].detach().clone() for k in keys[:-1]}
    ours["gamma"] = g.detach().reshape(1).clone()
    expected = mod.state_dict()
    for k, v in ours.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{k}: shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    mod.load_state_dict(ours)
    return mod
