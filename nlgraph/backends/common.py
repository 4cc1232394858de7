"""Tile-level pieces shared by the PyTorch backends: the lowered problem and one tile's scores.

Nothing here aggregates; the reference backend evaluates one tile covering everything with
autograd, the chunked backend loops over tiles with its own backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .._shapes import broadcast_shapes, slice_rows_cols
from .._values import untransformed
from ..affinity import Affinity, ScoreForm
from ..graph import Graph, safe_log

__all__ = ["Problem", "lower", "compute_dtype", "safe_log", "rows", "tile_linear", "tile_log_weights",
           "dropout_keep", "clamp_scores", "floor_scores", "finite_or_zero", "exp_scores", "edge_weights",
           "call"]


def call(function: type[torch.autograd.Function], *args):
    """``function.apply(*args)``, or its ``forward`` called directly when nothing will be differentiated.

    For the backends' autograd Functions written with ``setup_context`` (their ``forward`` takes no
    ctx): when grad mode is off or no tensor argument requires grad, outside torch.func transforms and
    torch.compile, the Function's bookkeeping (the signature binding ``apply`` does on every call, the
    context, the saved tensors: ~0.1 ms) buys nothing, so the same ``forward`` runs under no_grad and
    the result is bit-identical. Everywhere else (also inside a forward-mode AD level, where tangents
    need the Function's jvp) ``apply`` runs as before.
    """
    if (not torch.is_grad_enabled() or not any(isinstance(a, Tensor) and a.requires_grad for a in args)) \
            and fwAD._current_level < 0 and untransformed():
        with torch.no_grad():
            return function.forward(*args)
    return function.apply(*args)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp16/bf16 are computed in fp32; fp32/fp64 in themselves."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass
class Problem:
    """An aggregation lowered to the canonical form, in the compute dtype."""

    form: ScoreForm
    value: Tensor
    bias: Optional[Tensor]
    graph: Optional[Graph]
    lead: tuple[int, ...]
    n: int
    m: int
    e: int


def lower(query: Tensor, key: Tensor, value: Tensor, affinity: Affinity, graph: Optional[Graph],
          dense_bias: bool = True) -> Problem:
    """Lower (q, k, v, affinity, graph) to a :class:`Problem` in the compute dtype.

    ``dense_bias=False`` leaves the graph's dense (..., N, M) bias out (``Problem.bias`` is None), for a
    backend that reads the graph's own compact logits (the grid backend and a window's ``rpb``)."""
    cd = compute_dtype(query.dtype)
    form = affinity.form(query.to(cd), key.to(cd))
    bias = graph.dense_bias() if graph is not None and dense_bias else None
    if bias is not None:
        bias = bias.to(cd)
    if graph is not None and graph.is_complete:
        graph = None
    n, m, e = query.shape[-2], key.shape[-2], value.shape[-1]
    shapes = [query.shape[:-2], key.shape[:-2], value.shape[:-2]]
    if bias is not None:
        shapes.append(bias.shape[:-2])
    if graph is not None:
        shapes.append(torch.Size(graph.lead_shape))
    lead = tuple(broadcast_shapes(*shapes))
    return Problem(form, value.to(cd), bias, graph, lead, n, m, e)


def rows(t: Tensor, start: int, stop: int) -> Tensor:
    """``t[..., start:stop, :]``, or ``t`` itself when that is all of its rows (a one-tile problem: no
    view per tile)."""
    return t if start == 0 and stop == t.shape[-2] else t[..., start:stop, :]


def tile_linear(form: ScoreForm, i0: int, i1: int, j0: int, j1: int, out: Optional[Tensor] = None) -> Tensor:
    """``q'_i . k'_j + r_i + c_j`` for queries [i0, i1) and keys [j0, j1): (..., tn, tm).

    ``out`` (or None): a buffer with at least as many elements as the (..., tn, tm) result, for forms with
    a feature product: the scores are written into (a contiguous view of) it and returned. A tile loop
    reuses one buffer for all its tiles instead of allocating a fresh score tile each time (the
    allocator returns large blocks to the OS and faults them back in: up to 3x the tile's arithmetic
    on the CPU). The caller owns the result only until its next tile."""
    s: Optional[Tensor] = None
    if form.query is not None and form.key is not None:
        a, b = rows(form.query, i0, i1), rows(form.key, j0, j1).transpose(-1, -2)
        if out is None:
            s = a @ b
        else:
            shape = (*broadcast_shapes(a.shape[:-2], b.shape[:-2]), i1 - i0, j1 - j0)
            if out.shape != shape:
                out = out.view(-1)[:math.prod(shape)].view(shape)
            s = torch.matmul(a, b, out=out)
    for t in (None if form.row is None else form.row[..., i0:i1, None],
              None if form.col is None else form.col[..., None, j0:j1]):
        if t is not None:
            inplace = s is not None and out is not None and broadcast_shapes(s.shape, t.shape) == s.shape
            s = t if s is None else s.add_(t) if inplace else s + t
    assert s is not None  # every form has a feature product or a bias
    return s


def tile_log_weights(graph: Optional[Graph], bias: Optional[Tensor], i0: int, i1: int, j0: int, j1: int,
                     device: torch.device, dtype: torch.dtype) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The graph's tile as (bool mask or None, additive log-weight or None).

    A float block (edge multiplicities/weights) becomes a log-weight with -inf for "no edge";
    the dense bias slice is added on top.
    """
    mask: Optional[Tensor] = None
    logw: Optional[Tensor] = None
    if graph is not None:
        blk = graph.block(i0, i1, j0, j1, device)
        if blk is not None:
            if blk.dtype == torch.bool:
                mask = blk
            else:
                logw = safe_log(blk.to(dtype))
    if bias is not None:
        b = slice_rows_cols(bias, i0, i1, j0, j1)
        logw = b if logw is None else logw + b
    return mask, logw


def dropout_keep(shape: tuple[int, ...], p: float, seed: int, tile: int, device: torch.device,
                 dtype: torch.dtype) -> Tensor:
    """Dropout multipliers m / (1 - p), m ~ Bernoulli(1 - p), drawn reproducibly for one tile.

    The same (seed, tile) always gives the same mask, so a backward pass can regenerate it.
    """
    if p >= 1.0:
        return torch.zeros(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed((seed + tile) % (2**63 - 1))
    return (torch.rand(shape, generator=gen, device=device, dtype=dtype) >= p).to(dtype) / (1.0 - p)


def clamp_scores(form: ScoreForm, lin: Tensor, inplace: bool = False) -> Tensor:
    """The flat top of an exp kernel, ``min(s + clamp, 0)`` (when ``form.clamp`` is set), then its
    cut-off: -inf below ``-form.floor`` (when set). The identity when neither is."""
    if form.clamp is not None:
        lin = lin.add_(form.clamp).clamp_max_(0.0) if inplace else (lin + form.clamp).clamp(max=0.0)
    if form.floor is not None:
        lin = floor_scores(lin, form.floor, inplace)
    return lin


def floor_scores(s: Tensor, floor: float, inplace: bool = False) -> Tensor:
    """The cut-off of a truncated exp kernel: scores below ``-floor`` become -inf (f = 0)."""
    cut = s.detach() < -floor
    return s.masked_fill_(cut, -math.inf) if inplace else s.masked_fill(cut, -math.inf)


def finite_or_zero(t: Tensor) -> Tensor:
    """``t`` with its non-finite entries (a row max or log-sum-exp of -inf: no neighbour) set to 0, the
    safe shift of an online softmax."""
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def exp_scores(lin: Tensor, mask: Optional[Tensor], logw: Optional[Tensor]) -> Tensor:
    """Scores of an exp kernel: log-weights added, non-edges at -inf."""
    s = lin if logw is None else lin + logw
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    return s


def edge_weights(mask: Optional[Tensor], logw: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Multiplicative edge weights of a linear/relu kernel (None: every edge weighs 1)."""
    w = None if logw is None else torch.exp(logw)
    if mask is not None:
        w = mask.to(dtype) if w is None else w * mask
    return w
