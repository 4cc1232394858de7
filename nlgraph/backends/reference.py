"""The ``reference`` backend: materialises the full (..., N, M) score matrix, plain autograd.

It is the oracle the other backends are tested against (besides formulas written in the tests)
and the fallback for cases nothing else runs (e.g. gradients w.r.t. per-edge weights of an
``EdgeIndex`` graph). Memory is O(N M): use it for small problems only. With ``return_lse`` it
also returns log C_i from the same materialised scores (autograd differentiates it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import (
    clamp_scores,
    dropout_keep,
    edge_weights,
    exp_scores,
    finite_or_zero,
    lower,
    safe_log,
    tile_linear,
    tile_log_weights,
)

__all__ = ["can_run", "run", "RETURNS_LSE"]

RETURNS_LSE = True


def can_run(query, key, value, affinity, graph, dropout_p: float = 0.0) -> tuple[bool, str]:
    return True, ""


def run(query: Tensor, key: Tensor, value: Tensor, affinity, graph, *, dropout_p: float = 0.0,
        seed: int = 0, return_lse: bool = False):
    p = lower(query, key, value, affinity, graph)
    f = p.form
    lin = tile_linear(f, 0, p.n, 0, p.m)
    mask, logw = tile_log_weights(p.graph, p.bias, 0, p.n, 0, p.m, query.device, p.value.dtype)
    if f.kernel == "exp":
        s = exp_scores(clamp_scores(f, lin), mask, logw)
        if f.norm == "sum":
            mx = s.detach().amax(-1, keepdim=True)
            mx = finite_or_zero(mx)
            w = torch.exp(s - mx)
            den = w.sum(-1, keepdim=True)
            lse = (mx + safe_log(den))[..., 0]
            if f.lse_row is not None:
                lse = lse + f.lse_row
        else:
            w = torch.exp(s)
            den = None
            lse = torch.where(torch.isfinite(s).any(-1), 0.0, -math.inf).to(s.dtype)
    else:
        g = torch.relu(lin) if f.kernel == "relu" else lin
        ew = edge_weights(mask, logw, g.dtype)
        if ew is None:
            w = g
            den = torch.full(g.shape[:-1] + (1,), float(p.m), dtype=g.dtype, device=g.device)
        else:
            w = g * ew
            # C_i = sum_j w_ij over all M keys, also when the weights broadcast over them ((..., N|1, 1))
            den = ew.expand(torch.broadcast_shapes(ew.shape, g.shape)).sum(-1, keepdim=True)
        lse = safe_log(den)[..., 0]
    if dropout_p > 0:
        # dropout acts on the normalised weights: the normaliser above is computed without it
        w = w * dropout_keep((*p.lead, p.n, p.m), dropout_p, seed, 0, query.device, w.dtype)
    out = w @ p.value
    if den is not None:
        out = out / torch.where(den > 0, den, torch.ones_like(den))
    y = out.expand(*p.lead, p.n, p.e).to(query.dtype)
    return (y, lse.expand(*p.lead, p.n)) if return_lse else y
