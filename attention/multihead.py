"""Multi-head self-/cross-attention on nlgraph's core op.

:class:`MultiheadAttention` *is* a :class:`torch.nn.MultiheadAttention` (a subclass): the same
constructor ``(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
batch_first, device, dtype)`` with torch's defaults, the same parameters (``in_proj_weight`` or
``q/k/v_proj_weight``, ``in_proj_bias``, ``out_proj``, ``bias_k``/``bias_v``; torch's state_dicts
load unchanged), the same forward ``(query, key, value, key_padding_mask, need_weights, attn_mask,
average_attn_weights, is_causal)`` and mask rules (Vaswani et al. 2017). Only the forward differs:
per head ``y_i = sum_j softmax_j(q_i . k_j / sqrt(d)) v_j`` is ``nlgraph.aggregate(q, k, v,
Softmax(), graph)`` with the masks as the graph. The bias key/value (``add_bias_kv``) and the zero
key/value (``add_zero_attn``) are appended to the core op's keys and values, exactly as torch
appends them; ``need_weights`` runs the same call on values extended by one-hot columns, so the
weights carry the output's dropout mask.

Exact: forward and gradients equal torch's module with the same parameters (up to float rounding),
also inside ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``. In eval mode without
gradients those layers may take torch's fused fast path, which reads ``in_proj_weight`` etc. directly
and never calls a ``self_attn`` module's forward (as with torch's own module).

One deliberate difference: a query whose keys are all masked gets zero attention output, so the
module returns ``out_proj.bias`` there (zeros without bias) and zero weights; torch returns NaN.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nlgraph
from nlgraph import graph as G

__all__ = ["MultiheadAttention", "attention_graph"]


def _check_mask(name: str, mask: Tensor) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")


def _allow_extra_keys(mask: Tensor, extra: int) -> Tensor:
    """Append ``extra`` key columns that every query may attend (torch's convention: False / 0.0)."""
    if extra == 0:
        return mask
    return torch.cat([mask, mask.new_zeros(*mask.shape[:-1], extra)], dim=-1)


def attention_graph(batch: int, heads: int, n: int, m: int, key_padding_mask: Optional[Tensor] = None,
                    attn_mask: Optional[Tensor] = None, extra_keys: int = 0,
                    is_causal: bool = False) -> Optional[G.Graph]:
    """Translate torch.nn.MultiheadAttention's masks into an nlgraph graph over (B, H, N, M + extra) scores.

    Bool masks mean True = *not allowed* (torch's convention, the opposite of SDPA's); float masks are
    added to the logits.

    Args:
        batch: B.
        heads: H.
        n: number of queries L.
        m: number of keys S the masks describe.
        key_padding_mask: (B, S).
        attn_mask: (L, S) or (B * H, L, S).
        extra_keys: keys appended after the S masked ones (``add_bias_kv``, ``add_zero_attn``); the
            masks allow them, as torch pads its masks for them.
        is_causal: use the causal mask (query i attends keys j <= i, over all M + extra keys) instead
            of ``attn_mask``, which is still checked: torch's hint that attn_mask is that mask.
    """
    lead = (batch, heads)
    graphs: list[G.Graph] = []
    if key_padding_mask is not None:
        _check_mask("key_padding_mask", key_padding_mask)
        if tuple(key_padding_mask.shape) != (batch, m):
            raise ValueError(f"key_padding_mask must have shape (B, S) = ({batch}, {m}), got "
                             f"{tuple(key_padding_mask.shape)}")
        kpm = _allow_extra_keys(key_padding_mask, extra_keys).reshape(batch, 1, 1, m + extra_keys)
        graphs.append(G.Mask(~kpm if kpm.dtype == torch.bool else kpm))
    if attn_mask is not None:
        _check_mask("attn_mask", attn_mask)
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (n, m):
                raise ValueError(f"attn_mask must have shape (L, S) = ({n}, {m}), got "
                                 f"{tuple(attn_mask.shape)}")
            am = attn_mask
        elif attn_mask.dim() == 3:
            want = (math.prod(lead), n, m)
            if tuple(attn_mask.shape) != want:
                raise ValueError(f"attn_mask must have shape (B * num_heads, L, S) = {want}, got "
                                 f"{tuple(attn_mask.shape)}")
            am = attn_mask.reshape(*lead, n, m)
        else:
            raise ValueError(f"attn_mask must be 2-D (L, S) or 3-D (B * num_heads, L, S), got shape "
                             f"{tuple(attn_mask.shape)}")
        if not is_causal:
            am = _allow_extra_keys(am, extra_keys)
            graphs.append(G.Mask(~am if am.dtype == torch.bool else am))
    if is_causal:  # top-left aligned over all M + extra keys: SDPA's is_causal (no mask is built)
        graphs.append(G.Causal())
    if not graphs:
        return None
    return graphs[0] if len(graphs) == 1 else G.Intersection(graphs)


def _positive_int(name: str, val) -> int:
    if isinstance(val, bool) or not isinstance(val, int):
        raise TypeError(f"{name} must be a positive int, got {type(val).__name__} {val!r}")
    if val < 1:
        raise ValueError(f"{name} must be a positive int, got {val!r}")
    return val


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose attention runs on ``nlgraph.aggregate``.

    Args (torch's, in torch's order and with torch's defaults):
        embed_dim: model width E (split into ``num_heads`` heads of E / num_heads).
        num_heads: number of heads H; must divide embed_dim.
        dropout: dropout on the attention weights (after the softmax), in training mode only.
        bias: biases on the input and output projections.
        add_bias_kv: a learned key and value (``bias_k``, ``bias_v``) appended to every sequence.
        add_zero_attn: a zero key and value appended to every sequence (after ``bias_k``).
        kdim: key feature width (default embed_dim).
        vdim: value feature width (default embed_dim).
        batch_first: inputs are (B, L, E) if True, (L, B, E) otherwise (default, as torch).
        device, dtype: of the parameters.

    Attributes:
        in_proj_weight / q_proj_weight, k_proj_weight, v_proj_weight, in_proj_bias, out_proj, bias_k,
            bias_v: torch's parameters, under torch's names.
        backend: the core op's backend ("auto" by default); set it to compare paths on one instance.

    Context parallelism (an nlgraph extension, keyword-only): with ``process_group=`` (a
    ``torch.distributed`` group) query, key and value are this rank's contiguous shards of the
    sequence (rank order) and the output is this rank's shard; the attention runs on
    :func:`nlgraph.distributed.aggregate` (``distributed_method`` "ring" or "allgather"), exactly the
    single-process module's. ``attn_mask`` / ``key_padding_mask`` are then the *global* masks
    ((L, S) / (B, S) over all ranks' positions), ``need_weights`` must be False, ``add_bias_kv`` /
    ``add_zero_attn`` are not supported, and attention dropout must be 0.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None, *,
                 process_group=None, distributed_method: str = "ring") -> None:
        _positive_int("embed_dim", embed_dim)
        _positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout must be a number in [0, 1], got {type(dropout).__name__} {dropout!r}")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout!r}")
        for name, val in (("kdim", kdim), ("vdim", vdim)):
            if val is not None:
                _positive_int(name, val)
        super().__init__(embed_dim, num_heads, float(dropout), bias, add_bias_kv, add_zero_attn, kdim, vdim,
                         batch_first, device, dtype)
        self.backend = "auto"
        #: a torch.distributed process group for context parallelism (class docstring)
        self.process_group = process_group
        self.distributed_method = distributed_method

    def _check(self, name: str, x: Tensor, width: int) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.is_nested:
            raise TypeError(f"{name} is a nested tensor: only torch's fused fast path takes those "
                            f"(torch.nn.MultiheadAttention outside it refuses them too)")
        if x.dim() not in (2, 3) or x.shape[-1] != width:
            layout = "(B, L, E)" if self.batch_first else "(L, B, E)"
            raise ValueError(f"{name} must have shape {layout} or (L, E) with E = {width}, got "
                             f"{tuple(x.shape)}")
        w = self.out_proj.weight
        if x.dtype != w.dtype and not torch.is_autocast_enabled():
            raise TypeError(f"{name} has dtype {x.dtype} but the module's parameters are {w.dtype}")

    def _projections(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v = the input projections, (B, L|S, E), as torch's ``_in_projection(_packed)``."""
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if self._qkv_same_embed_dim:
            if query is key and key is value:
                q, k, v = F.linear(query, self.in_proj_weight, b).chunk(3, dim=-1)
                return q, k, v
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """Attend from ``query`` to ``key``/``value``; torch.nn.MultiheadAttention.forward's contract.

        Args:
            query: (L, B, E), (B, L, E) with batch_first, or unbatched (L, E).
            key: (S, B, kdim) / (B, S, kdim) / (S, kdim).
            value: (S, B, vdim) / (B, S, vdim) / (S, vdim).
            key_padding_mask: (B, S) or (S,) unbatched; bool True = ignore that key, float = added.
            need_weights: also return the attention weights (default True, as torch).
            attn_mask: (L, S) or (B * num_heads, L, S) ((num_heads, L, S) unbatched); bool True = not
                allowed, float = added to the logits.
            average_attn_weights: average the returned weights over heads.
            is_causal: hint that ``attn_mask`` is the causal mask (it must be given, as in torch);
                without key_padding_mask and need_weights the causal mask is used in its place.

        Returns:
            (output, weights): output like ``query``; weights (B, L, S') averaged over heads (or
            (B, H, L, S')), unbatched without B, when ``need_weights``, else None; S' counts the
            appended bias / zero keys. Weights are after dropout, as torch's.
        """
        self._check("query", query, self.embed_dim)
        self._check("key", key, self.kdim)
        self._check("value", value, self.vdim)
        if not query.dim() == key.dim() == value.dim():
            raise ValueError(f"query, key and value must all be batched or all unbatched, got shapes "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True is a hint that attn_mask is the causal mask and needs attn_mask "
                             "too (as torch.nn.MultiheadAttention); e.g. "
                             "nn.Transformer.generate_square_subsequent_mask(L)")
        batched = query.dim() == 3
        q, k, v = self._projections(query, key, value)
        if not batched:
            q, k, v = q[None], k[None], v[None]
            if key_padding_mask is not None:
                _check_mask("key_padding_mask", key_padding_mask)
                if key_padding_mask.dim() != 1:
                    raise ValueError(f"key_padding_mask must have shape (S,) for unbatched inputs, got "
                                     f"{tuple(key_padding_mask.shape)}")
                key_padding_mask = key_padding_mask[None]
        elif not self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        b, n, e = q.shape
        if k.shape[:2] != v.shape[:2] or k.shape[0] != b:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must share (batch, "
                             f"length) with query {tuple(query.shape)} (batch_first={self.batch_first})")
        m = k.shape[1]
        if self.bias_k is not None and self.bias_v is not None:  # (add_bias_kv: both or neither)
            k = torch.cat([k, self.bias_k.expand(b, 1, e)], dim=1)
            v = torch.cat([v, self.bias_v.expand(b, 1, e)], dim=1)
        h, hd = self.num_heads, self.head_dim
        q, k, v = (t.reshape(b, t.shape[1], h, hd).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(b, h, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(b, h, 1, hd)], dim=2)
        m_all = k.shape[2]
        causal = bool(is_causal) and key_padding_mask is None and not need_weights
        gn, gm = n, m  # the masks' sizes: with a process group, the whole sequence's
        if self.process_group is not None:
            from nlgraph import distributed

            gn, gm = (sum(t) for t in distributed.global_sizes(n, m, self.process_group))
        graph = attention_graph(b, h, gn, gm, key_padding_mask, attn_mask, extra_keys=m_all - m,
                                is_causal=causal)

        p = self.dropout if self.training else 0.0
        if self.process_group is not None:
            return self._forward_sharded(q, k, v, graph, p, need_weights, n, b, e, batched)
        if need_weights:
            # the weights are the op applied to one-hot values: same call, same dropout mask
            eye = torch.eye(m_all, dtype=v.dtype, device=v.device).expand(b, h, m_all, m_all)
            both = nlgraph.aggregate(q, k, torch.cat([v, eye], -1), nlgraph.Softmax(), graph,
                                     backend=self.backend, dropout_p=p)
            y, weights = both[..., :hd], both[..., hd:]
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            y = nlgraph.aggregate(q, k, v, nlgraph.Softmax(), graph, backend=self.backend, dropout_p=p)
            weights = None
        # (L, B, E) in memory, batch_first or not, as torch's: code after the module (a dropout drawing
        # its mask in memory order, as nn.TransformerEncoderLayer's) then sees the same tensor
        out = F.linear(y.permute(2, 0, 1, 3).reshape(n, b, e), self.out_proj.weight, self.out_proj.bias)
        if not batched:
            return out[:, 0], None if weights is None else weights[0]
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _forward_sharded(self, q, k, v, graph, p, need_weights, n, b, e, batched):
        """The attention on this rank's shard, the rest as :meth:`forward` (class docstring)."""
        from nlgraph import distributed

        if need_weights:
            raise ValueError("MultiheadAttention(process_group=...) returns no attention weights: pass "
                             "need_weights=False")
        if self.bias_k is not None or self.add_zero_attn:
            raise ValueError("MultiheadAttention(process_group=...) does not support add_bias_kv or "
                             "add_zero_attn")
        if p > 0:
            raise ValueError(f"MultiheadAttention(process_group=...) has no attention dropout, got "
                             f"dropout={self.dropout} in training mode")
        y = distributed.aggregate(q, k, v, nlgraph.Softmax(), graph, group=self.process_group,
                                  method=self.distributed_method, backend=self.backend)
        out = F.linear(y.permute(2, 0, 1, 3).reshape(n, b, e), self.out_proj.weight, self.out_proj.bias)
        if not batched:
            return out[:, 0], None
        return (out.transpose(0, 1) if self.batch_first else out), None

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"add_bias_kv={self.bias_k is not None}, add_zero_attn={self.add_zero_attn}, "
                f"kdim={self.kdim}, vdim={self.vdim}, batch_first={self.batch_first}")
