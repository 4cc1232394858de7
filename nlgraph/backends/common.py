"""Tile-level pieces shared by the PyTorch backends: the lowered problem and one tile's scores.

Nothing here aggregates; the reference backend evaluates one tile covering everything with
autograd, the chunked backend loops over tiles with its own backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._shapes import broadcast_shapes, slice_rows_cols
from ..affinity import Affinity, ScoreForm
from ..graph import Graph, safe_log

__all__ = ["Problem", "lower", "compute_dtype", "safe_log", "tile_linear", "tile_log_weights", "dropout_keep",
           "clamp_scores", "floor_scores", "finite_or_zero", "exp_scores", "edge_weights"]


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


def tile_linear(form: ScoreForm, i0: int, i1: int, j0: int, j1: int) -> Tensor:
    """``q'_i . k'_j + r_i + c_j`` for queries [i0, i1) and keys [j0, j1): (..., tn, tm)."""
    s: Optional[Tensor] = None
    if form.query is not None and form.key is not None:
        s = form.query[..., i0:i1, :] @ form.key[..., j0:j1, :].transpose(-1, -2)
    if form.row is not None:
        r = form.row[..., i0:i1, None]
        s = r if s is None else s + r
    if form.col is not None:
        c = form.col[..., None, j0:j1]
        s = c if s is None else s + c
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
