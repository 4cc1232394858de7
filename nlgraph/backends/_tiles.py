"""The tile loop's shared pieces: tile spans, the per-call tile plan, one tile's scores and the
tile-recomputing backward that every backend whose forward saves the per-query statistic reuses.

A tiled backend covers the N x M pairs with (block_n x block_m) tiles (:func:`spans`), asks the graph
once per call which tile pairs may hold edges (:func:`tile_plan`, from
:meth:`nlgraph.graph.Graph.tile_pairs`) and evaluates one tile at a time (:func:`tile_scores`, the
graph's :meth:`~nlgraph.graph.Graph.block` and the dense bias sliced by
:func:`nlgraph._shapes.slice_rows_cols`). :class:`TileRun` is the typed description of one such loop
(the lowered problem, the tile sizes, dropout), passed to the autograd Functions and to
:func:`tile_backward` (chunked's own backward, and triton's for a float mask's gradient).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._shapes import broadcast_shapes, slice_rows_cols
from .._values import checking_values, untransformed
from ..affinity import ScoreForm
from ._exp_jit import exp_shifted_
from .common import (
    Problem,
    clamp_scores,
    dropout_keep,
    edge_weights,
    exp_scores,
    finite_or_zero,
    tile_linear,
    tile_log_weights,
)

__all__ = ["TileRun", "spans", "tile_plan", "tile_scores", "score_buffer", "scratch", "release_buffer",
           "tile_dropout", "bind", "tile_backward"]


@dataclass(frozen=True)
class TileRun:
    """One tiled evaluation of a lowered problem: what the forward and the backward tile loops share.

    Attributes:
        problem: the aggregation in canonical form (its tensors may be rebound with :func:`bind`).
        blocks: (block_n, block_m), queries and keys per tile.
        dropout_p: message dropout probability (0: none).
        seed: the dropout seed; tile (i0, j0) draws its mask from ``seed + i0 * M + j0``.
    """

    problem: Problem
    blocks: tuple[int, int]
    dropout_p: float = 0.0
    seed: int = 0


def spans(size: int, block: int) -> list[tuple[int, int]]:
    """[start, stop) of each tile of ``block`` along an axis of ``size`` (the last one may be shorter)."""
    return [(a, min(size, a + block)) for a in range(0, size, block)]


def tile_plan(p: Problem, bn: int, bm: int, device: torch.device) -> Optional[list[list[bool]]]:
    """Which tile pairs may hold edges (one vectorised test per call), or None to try them all."""
    if p.graph is None or not checking_values():
        return None  # traced code takes no data-dependent branch: every tile is computed
    pairs = p.graph.tile_pairs(spans(p.n, bn), spans(p.m, bm), device)
    return None if pairs is None else pairs.tolist()


def tile_scores(p: Problem, i0: int, i1: int, j0: int, j1: int, device: torch.device,
                out: Optional[Tensor] = None):
    """(linear scores, validity mask, log-weights) of one tile; (None, None, None) when it has no edge.

    ``out``: a reusable score buffer (see :func:`score_buffer`); the scores are then valid until the
    next tile written into it."""
    mask, logw = tile_log_weights(p.graph, p.bias, i0, i1, j0, j1, device, p.value.dtype)
    if mask is not None and checking_values() and not bool(mask.any()):
        return None, None, None
    lin = tile_linear(p.form, i0, i1, j0, j1, out)
    if lin.shape[:-2] != p.lead:  # batch dims that only value or the graph has: scores per batch entry
        lin = lin.expand(*p.lead, *lin.shape[-2:]).contiguous()
    return lin, mask, logw


#: Scratch tensors of at most this many elements (a default tile: 2 MiB in fp32) are kept per thread
#: between calls (larger ones are fresh each time).
SCRATCH_MAX = 1 << 19
#: ... and at least this many (64 KiB in fp32): the allocator reuses smaller blocks without faulting
#: them in, and a fresh one costs less than the scratch's bookkeeping (~1 vs ~10 us a call).
SCRATCH_MIN = 1 << 14

_SCRATCH = threading.local()


def score_buffer(p: Problem, bn: int, bm: int, slot: str = "scores") -> Optional[Tensor]:
    """One (lead, bn, bm) buffer that a tile loop writes every tile's scores into, or None (allocate
    per tile) where that does not pay (CPU tiles under :data:`SCRATCH_MIN` elements) or cannot be
    done: under torch.func transforms (a batched tile cannot be written into a plain buffer),
    torch.compile (it plans memory itself), forms without a feature product or whose scores
    broadcast to fewer batch dims than the problem's.

    On the CPU the buffer comes from this thread's scratch (``slot``: "scores", or "dp" for the
    backward's second buffer) and goes back there with :func:`release_buffer`: a fresh 1-2 MiB tile
    per call costs a few hundred page faults (glibc returns such blocks to the OS when they are
    freed), measured 0.4 ms of a 4 ms one-head N=1024 forward. A buffer is taken out of the scratch
    while in use, so a nested or concurrent user gets another; inference-mode buffers are kept apart
    (an inference tensor cannot be written outside inference mode)."""
    f = p.form
    if f.query is None or f.key is None or not untransformed():
        return None
    shape = (*p.lead, min(bn, p.n), min(bm, p.m))
    if p.value.device.type == "cpu" and math.prod(shape) < SCRATCH_MIN:
        return None  # small tiles: a fresh one per tile is cheaper than the bookkeeping
    if broadcast_shapes(f.query.shape[:-2], f.key.shape[:-2]) != p.lead:
        return None
    return scratch(shape, p.value.dtype, p.value.device, slot)


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, slot: str) -> Tensor:
    """An uninitialised tensor of ``shape`` from this thread's scratch ``slot`` (CPU, from
    :data:`SCRATCH_MIN` to :data:`SCRATCH_MAX` elements; otherwise fresh); give it back with
    :func:`release_buffer`."""
    numel = math.prod(shape)
    if device.type != "cpu" or not SCRATCH_MIN <= numel <= SCRATCH_MAX:
        return torch.empty(shape, dtype=dtype, device=device)
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    kept = bufs.pop((slot, dtype, torch.is_inference_mode_enabled()), None)
    if kept is None or kept.numel() < numel:
        kept = torch.empty(numel, dtype=dtype)
    return kept[:numel].view(shape)


def release_buffer(buf: Optional[Tensor], slot: str = "scores") -> None:
    """Return a :func:`score_buffer` or :func:`scratch` tensor to this thread's ``slot`` (nothing for
    None, CUDA, small or large ones)."""
    if buf is None or buf.device.type != "cpu" or not SCRATCH_MIN <= buf.numel() <= SCRATCH_MAX:
        return
    flat = buf.view(-1)  # contiguous by construction; inference-mode views keep no ``_base``
    _SCRATCH.__dict__.setdefault("bufs", {})[(slot, buf.dtype, torch.is_inference_mode_enabled())] = flat


def tile_dropout(run: TileRun, lead, i0, i1, j0, j1, device, dtype) -> Optional[Tensor]:
    """This tile's dropout multipliers (regenerated identically in backward), or None."""
    if run.dropout_p <= 0:
        return None
    tile = i0 * run.problem.m + j0
    return dropout_keep((*lead, i1 - i0, j1 - j0), run.dropout_p, run.seed, tile, device, dtype)


def bind(p: Problem, fq, fk, row, col, bias, value) -> Problem:
    """The problem with its tensors replaced by the Function's own inputs (or saved tensors).

    Under torch.func transforms a Function's forward and backward receive unwrapped tensors, not the
    ones the problem was lowered with; the tiles must read exactly the tensors they are given."""
    f = p.form
    form = ScoreForm(fq, fk, row, col, f.kernel, f.norm, f.clamp, floor=f.floor)
    return Problem(form, value, bias, p.graph, p.lead, p.n, p.m, p.e)


def _add(parts: dict, key, grad: Tensor) -> None:
    """parts[key] += grad, out of place (vmap-compatible)."""
    parts[key] = grad if key not in parts else parts[key] + grad


def _assemble(parts: dict, spans: list[tuple[int, int]], dim: int, like: Tensor) -> Tensor:
    """Concatenate per-tile gradients (tile index -> tensor) along ``dim``; missing tiles are zeros."""
    def unit(shape):  # the shape with the tiled dimension set to 1, for broadcasting
        return tuple(1 if i == dim % len(shape) else d for i, d in enumerate(shape))

    shape = list(torch.broadcast_shapes(*(unit(t.shape) for t in parts.values())) if parts else like.shape)
    pieces = []
    for idx, (a, b) in enumerate(spans):
        shape[dim] = b - a
        pieces.append(parts[idx].expand(shape) if idx in parts else like.new_zeros(shape))
    return torch.cat(pieces, dim)


def tile_backward(run: TileRun, needs, fq, fk, row, col, bias, value, out, stat, dout,
                  dstat: Optional[Tensor] = None):
    """Gradients of the canonical form from the output, its saved statistic and dout, tile by tile.

    ``stat`` is the log-sum-exp per query (exp kernel, C = sum f), unused for C = 1, or the
    normaliser (count). Shared by every backend whose forward saves that statistic. ``dstat`` (or
    None) is the gradient of the statistic: with lse_i = log sum_j exp(s_ij), d lse_i / d s_ij = p_ij,
    so it adds p_ij dlse_i to ds_ij = p_ij (dp_ij - D_i), i.e. D_i becomes D_i - dlse_i; with the count
    C_i = sum_j w_ij, d C_i / d log w_ij = w_ij, which D_i - dC_i C_i carries in the same place.
    Gradients are collected per tile and concatenated (nothing is written into a preallocated
    buffer), so the backward is vmap-compatible (``torch.func.jacrev``).
    Returns the gradients of (fq, fk, row, col, bias, value).
    """
    p = bind(run.problem, fq, fk, row, col, bias, value)
    bn, bm = run.blocks
    kernel, norm = p.form.kernel, p.form.norm
    need_q, need_k, need_r, need_c, need_b, need_v = needs
    device, dtype = value.device, value.dtype
    lead, n, m = p.lead, p.n, p.m
    dout = dout.to(dtype)
    rows, cols = spans(n, bn), spans(m, bm)
    # tile index -> gradient (db: (row block, column block) of the bias -> gradient)
    dq: dict[int, Tensor] = {}
    dk: dict[int, Tensor] = {}
    dr: dict[int, Tensor] = {}
    dc: dict[int, Tensor] = {}
    dv: dict[int, Tensor] = {}
    db: dict[tuple[int, int], Tensor] = {}
    need_lin = need_q or need_k or need_r or need_c
    b_rows = need_b and bias.shape[-2] != 1  # the float mask has a row per query (else it broadcasts)
    b_cols = need_b and bias.shape[-1] != 1

    plan = tile_plan(p, bn, bm, device)
    # the scores' and dP's buffers, reused by every tile (None: fresh tiles, e.g. under torch.func)
    buf = score_buffer(p, bn, bm) if kernel == "exp" else None
    dbuf = None if buf is None else score_buffer(p, bn, bm, "dp")
    for ti, (i0, i1) in enumerate(rows):
        do = dout[..., i0:i1, :]
        st = stat[..., i0:i1]
        # D_i = dO_i . O_i (softmax and count normalisations; C = 1 has none: a 0 that is never read).
        dsum = (do * out[..., i0:i1, :]).sum(-1) if norm != "none" else do.new_zeros(())
        if dstat is not None and norm != "none":
            ds_ = dstat[..., i0:i1].to(dtype)
            dsum = dsum - (ds_ if norm == "sum" else ds_ * st)
        if kernel == "exp":
            base = finite_or_zero(st)
        else:
            pos = st > 0
            inv = torch.where(pos, 1.0 / torch.where(pos, st, torch.ones_like(st)), torch.zeros_like(st))
        for tj, (j0, j1) in enumerate(cols):
            if plan is not None and not plan[ti][tj]:
                continue
            lin, mask, logw = tile_scores(p, i0, i1, j0, j1, device, buf)
            if lin is None:
                continue
            v = value[..., j0:j1, :]
            vt = v.transpose(-1, -2)
            if dbuf is None:
                dp = do @ vt
            else:
                shape = (*broadcast_shapes(do.shape[:-2], vt.shape[:-2]), i1 - i0, j1 - j0)
                dp = torch.matmul(do, vt, out=dbuf.view(-1)[:math.prod(shape)].view(shape))
            keep = tile_dropout(run, lead, i0, i1, j0, j1, device, dtype)
            if keep is not None:
                dp = dp * keep  # the loss sees the kept messages only
            if kernel == "exp":
                flat = None if p.form.clamp is None else (lin + p.form.clamp) >= 0  # capped: no gradient
                s = exp_scores(clamp_scores(p.form, lin), mask, logw)
                if norm == "none":
                    prob = torch.exp(s)  # C = 1: the raw kernel value
                    dlin = prob * dp
                else:
                    # exp(s) / C from the saved log-sum-exp
                    prob = s if exp_shifted_(s, base) else s.sub_(base[..., None]).exp_()
                    # dp is this tile's own: in place when it is the buffer (never a torch.func batch)
                    dlin = (dp.sub_(dsum[..., None]) if dbuf is not None and keep is None
                            else dp - dsum[..., None]).mul_(prob)
                dlogw = dlin
                if flat is not None:
                    dlin = dlin.masked_fill(flat, 0.0)
                if need_v:
                    kept = prob if keep is None else prob * keep
                    _add(dv, tj, kept.transpose(-1, -2) @ do)
            else:
                g = torch.relu(lin) if kernel == "relu" else lin
                ew = edge_weights(mask, logw, dtype)
                a = inv[..., None] if ew is None else ew * inv[..., None]
                if need_v:
                    kept = g * a if keep is None else g * a * keep
                    _add(dv, tj, kept.transpose(-1, -2) @ do)
                if need_lin:
                    dlin = a * dp
                    if kernel == "relu":
                        dlin = dlin * (lin > 0)
                if need_b:
                    dlogw = ew * (g * dp - dsum[..., None]) * inv[..., None]
            if need_lin:
                if need_q:
                    _add(dq, ti, dlin @ fk[..., j0:j1, :])
                if need_k:
                    _add(dk, tj, dlin.transpose(-1, -2) @ fq[..., i0:i1, :])
                if need_r:
                    _add(dr, ti, dlin.sum(-1))
                if need_c:
                    _add(dc, tj, dlin.sum(-2))
            if need_b:
                key = (ti if b_rows else 0, tj if b_cols else 0)
                # the bias' own (broadcast) tile: its gradient sums over the dims it broadcasts along
                g = dlogw.sum_to_size(slice_rows_cols(bias, i0, i1, j0, j1).shape)
                if dbuf is not None and g.untyped_storage().data_ptr() == dbuf.untyped_storage().data_ptr():
                    g = g.clone()  # a full-size mask's tile is dP's buffer itself: keep a copy
                _add(db, key, g)

    def reduce(parts: dict, spans, dim: int, like: Optional[Tensor], need: bool) -> Optional[Tensor]:
        if not need or like is None:
            return None
        return _assemble(parts, spans, dim, like).sum_to_size(like.shape)

    grad_b = None
    if need_b:  # the float mask's blocks, (N|1) x (M|1) of them, zeros where no tile contributed
        r_spans = rows if b_rows else [(0, 1)]
        c_spans = cols if b_cols else [(0, 1)]

        def block(ri: int, cj: int, r: int, c: int) -> Tensor:
            return db[(ri, cj)] if (ri, cj) in db else bias.new_zeros(*bias.shape[:-2], r, c)

        grad_b = torch.cat([torch.cat([block(ri, cj, a1 - a0, c1 - c0)
                                       for cj, (c0, c1) in enumerate(c_spans)], -1)
                            for ri, (a0, a1) in enumerate(r_spans)], -2)
    grads = (reduce(dq, rows, -2, fq, need_q), reduce(dk, cols, -2, fk, need_k),
             reduce(dr, rows, -1, row, need_r), reduce(dc, cols, -1, col, need_c), grad_b,
             reduce(dv, cols, -2, value, need_v))
    release_buffer(buf)
    release_buffer(dbuf, "dp")
    return grads
