"""Multi-head self-/cross-attention on nlgraph's core op.

Same constructor, forward signature and mask semantics as :class:`torch.nn.MultiheadAttention`
(Vaswani et al. 2017): per head ``y_i = sum_j softmax_j(q_i . k_j / sqrt(d)) v_j`` is
``nlgraph.aggregate(q, k, v, Softmax())`` over the complete graph, restricted by the masks. The
module owns the projections and the head split; the aggregation is the core op's.

Exact: forward and gradients equal torch's module after :func:`nlgraph.adapters.mha_from_torch`
(up to float rounding). One deliberate difference: a query whose keys are all masked gets a zero
output (torch returns NaN there).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

import nlgraph
from nlgraph import graph as G

__all__ = ["MultiheadAttention", "attention_graph"]


def _check_mask(name: str, mask: Tensor) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")


def attention_graph(batch: int, heads: int, n: int, m: int, key_padding_mask: Optional[Tensor] = None,
                    attn_mask: Optional[Tensor] = None) -> Optional[G.Graph]:
    """Translate torch.nn.MultiheadAttention's masks into an nlgraph graph over (B, H, N, M) scores.

    Bool masks mean True = *not allowed* (torch's convention, the opposite of SDPA's); float masks are
    added to the logits.

    Args:
        batch: B.
        heads: H.
        n: number of queries L.
        m: number of keys S.
        key_padding_mask: (B, S).
        attn_mask: (L, S) or (B * H, L, S).
    """
    lead = (batch, heads)
    graphs = []
    if key_padding_mask is not None:
        _check_mask("key_padding_mask", key_padding_mask)
        if tuple(key_padding_mask.shape) != (batch, m):
            raise ValueError(f"key_padding_mask must have shape (B, S) = ({batch}, {m}), got "
                             f"{tuple(key_padding_mask.shape)}")
        kpm = key_padding_mask.reshape(batch, 1, 1, m)
        graphs.append(G.Mask(~kpm if kpm.dtype == torch.bool else kpm))
    if attn_mask is not None:
        _check_mask("attn_mask", attn_mask)
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (n, m):
                raise ValueError(f"attn_mask must have shape (L, S) = ({n}, {m}), got {tuple(attn_mask.shape)}")
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
        graphs.append(G.Mask(~am if am.dtype == torch.bool else am))
    if not graphs:
        return None
    return graphs[0] if len(graphs) == 1 else G.Intersection(graphs)


class MultiheadAttention(nn.Module):
    """Multi-head attention with torch.nn.MultiheadAttention's interface, on ``nlgraph.aggregate``.

    Args:
        embed_dim: model width E (split into ``num_heads`` heads of E / num_heads).
        num_heads: number of heads H; must divide embed_dim.
        dropout: dropout on the attention weights (after the softmax), in training mode only.
        bias: add biases to the input and output projections.
        kdim: key feature width (default embed_dim).
        vdim: value feature width (default embed_dim).
        batch_first: inputs are (B, L, E) if True (default here), (L, B, E) otherwise.

    Attributes:
        q_proj, k_proj, v_proj, out_proj: the :class:`torch.nn.Linear` projections.
        backend: the core op's backend ("auto" by default); set it to compare paths on one instance.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, batch_first: bool = True):
        super().__init__()
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        for name, val in (("kdim", kdim), ("vdim", vdim)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim, vdim
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.backend = "auto"
        self._reset_parameters(bias)

    def _reset_parameters(self, bias: bool) -> None:
        # torch initialises the packed (3E, E) in_proj with one xavier_uniform_; do the same per block.
        packed = torch.empty(3 * self.embed_dim, self.embed_dim)
        nn.init.xavier_uniform_(packed)
        with torch.no_grad():
            self.q_proj.weight.copy_(packed[: self.embed_dim])
            for proj, i in ((self.k_proj, 1), (self.v_proj, 2)):
                if proj.weight.shape == (self.embed_dim, self.embed_dim):
                    proj.weight.copy_(packed[i * self.embed_dim:(i + 1) * self.embed_dim])
                else:
                    nn.init.xavier_uniform_(proj.weight)
            if bias:
                for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
                    proj.bias.zero_()

    def _check(self, name: str, x: Tensor, width: int) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.shape[-1] != width:
            layout = "(B, L, E)" if self.batch_first else "(L, B, E)"
            raise ValueError(f"{name} must have shape {layout} or (L, E) with E = {width}, got {tuple(x.shape)}")

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                need_weights: bool = False, average_attn_weights: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        """Attend from ``query`` to ``key``/``value`` (self-attention when they are None).

        Returns:
            (output, weights): output like ``query``; weights (B, L, S) averaged over heads (or
            (B, H, L, S)) when ``need_weights``, else None. Weights are after dropout, as torch's.
        """
        key = query if key is None else key
        value = key if value is None else value
        self._check("query", query, self.embed_dim)
        self._check("key", key, self.kdim)
        self._check("value", value, self.vdim)
        if not query.dim() == key.dim() == value.dim():
            raise ValueError(f"query, key and value must all be batched or all unbatched, got shapes "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query[None], key[None], value[None]
            if key_padding_mask is not None:
                _check_mask("key_padding_mask", key_padding_mask)
                if key_padding_mask.dim() != 1:
                    raise ValueError(f"key_padding_mask must have shape (S,) for unbatched inputs, got "
                                     f"{tuple(key_padding_mask.shape)}")
                key_padding_mask = key_padding_mask[None]
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, n, _ = query.shape
        if key.shape[:2] != value.shape[:2] or key.shape[0] != b:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must share (batch, length) "
                             f"with query batch {b}")
        m = key.shape[1]
        graph = attention_graph(b, self.num_heads, n, m, key_padding_mask, attn_mask)

        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(query).view(b, n, h, hd).transpose(1, 2)
        k = self.k_proj(key).view(b, m, h, hd).transpose(1, 2)
        v = self.v_proj(value).view(b, m, h, hd).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        if need_weights:
            # The weights are the op applied to one-hot values: same call, same dropout mask.
            eye = torch.eye(m, dtype=v.dtype, device=v.device).expand(*v.shape[:-2], m, m)
            both = nlgraph.aggregate(q, k, torch.cat([v, eye], -1), nlgraph.Softmax(), graph,
                                     backend=self.backend, dropout_p=p)
            y, weights = both[..., :hd], both[..., hd:]
        else:
            y = nlgraph.aggregate(q, k, v, nlgraph.Softmax(), graph, backend=self.backend, dropout_p=p)
            weights = None
        out = self.out_proj(y.transpose(1, 2).reshape(b, n, self.embed_dim))
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        if unbatched:
            out = out[0]
            weights = None if weights is None else weights[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"kdim={self.kdim}, vdim={self.vdim}, batch_first={self.batch_first}")
