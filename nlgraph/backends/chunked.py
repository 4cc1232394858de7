"""The ``chunked`` backend: pure PyTorch, tiled over queries and keys, never N x M.

Forward walks key tiles for each query tile with an online (running-max) softmax, as
FlashAttention does; backward recomputes each tile's scores from the saved log-sum-exp (or the
saved normaliser for count-normalised affinities) and accumulates gradients tile by tile, so the
extra memory is O((N + M) (d + e) + B tn tm) for B = batch x heads. Tiles whose graph block has
no edge are skipped (local windows, criss-cross and k-NN graphs are block sparse).

Everything is computed in fp32 for fp16/bf16 inputs and in the input dtype otherwise. This is
the default backend on CPU and the fallback on every device. It traces under torch.compile /
torch.export (every tile is then computed: skipping empty tiles is a data-dependent branch), and
its autograd Function works under torch.func (vmap, grad, vjp, jacrev).

With ``return_lse`` it returns the log-normaliser too: the forward's per-query statistic is
log C_i itself for the exp kernels (the log-sum-exp for C = sum f, 0 or -inf for C = 1) and C_i for
count normalisation (its log is taken outside, by autograd); the backward takes that output's
gradient as well (for C = sum f: d lse_i / d s_ij = p_ij, which enters as D_i = dO_i . O_i - dlse_i;
for the count: d C_i / d log w_ij = w_ij, the same shift by dC_i C_i).

Options (``nlgraph.aggregate(..., backend="chunked", options={...})``):
    block_n: queries per tile (default: chosen from the problem size).
    block_m: keys per tile (default: chosen from the problem size).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._values import checking_values
from ..affinity import ScoreForm
from .common import (Problem, clamp_scores, dropout_keep, edge_weights, exp_scores, lower, safe_log,
                     tile_linear, tile_log_weights)

__all__ = ["can_run", "run", "default_blocks", "RETURNS_LSE"]

RETURNS_LSE = True

_NEG_INF = -math.inf

#: Target number of score elements per tile (all batch entries together): 2 MiB in fp32.
TILE_ELEMENTS = 1 << 19


def can_run(query, key, value, affinity, graph, dropout_p: float = 0.0) -> tuple[bool, str]:
    if graph is not None and graph.block_requires_grad:
        return False, (
            "chunked cannot differentiate per-edge weights of an EdgeIndex graph "
            "(use backend='reference' or 'pyg', or detach the weights)"
        )
    return True, ""


def default_blocks(batch: int, n: int, m: int) -> tuple[int, int]:
    """Square tiles of side 2^k ~ sqrt(TILE_ELEMENTS / batch), clamped to [64, 1024] and the sizes.

    Measured on a 2-core CPU: 512 x 512 for one head and 256 x 256 for eight heads were the fastest
    of the shapes tried (benchmarks/core.py and benchmarks/nonlocal.py).
    """
    side = max(64, min(1024, 2 ** int(math.log2(max(1.0, math.sqrt(TILE_ELEMENTS / max(1, batch)))))))
    return min(n, side), min(m, side)


def _tile_plan(p: Problem, bn: int, bm: int, device: torch.device) -> Optional[list[list[bool]]]:
    """Which tile pairs may hold edges (one vectorised test per call), or None to try them all."""
    if p.graph is None or not checking_values():
        return None  # traced code takes no data-dependent branch: every tile is computed
    rows = [(i, min(p.n, i + bn)) for i in range(0, p.n, bn)]
    cols = [(j, min(p.m, j + bm)) for j in range(0, p.m, bm)]
    pairs = p.graph.tile_pairs(rows, cols, device)
    return None if pairs is None else pairs.tolist()


def _tile(p: Problem, i0: int, i1: int, j0: int, j1: int, device: torch.device):
    """(linear scores, validity mask, log-weights) of one tile; (None, None, None) when it has no edge."""
    mask, logw = tile_log_weights(p.graph, p.bias, i0, i1, j0, j1, device, p.value.dtype)
    if mask is not None and checking_values() and not bool(mask.any()):
        return None, None, None
    lin = tile_linear(p.form, i0, i1, j0, j1)
    if lin.shape[:-2] != p.lead:  # batch dims that only value or the graph has: scores per batch entry
        lin = lin.expand(*p.lead, *lin.shape[-2:]).contiguous()
    return lin, mask, logw


def _keep(meta: dict, lead, i0, i1, j0, j1, device, dtype) -> Optional[Tensor]:
    """This tile's dropout multipliers (regenerated identically in backward), or None."""
    p = meta["dropout_p"]
    if p <= 0:
        return None
    tile = i0 * meta["problem"].m + j0
    return dropout_keep((*lead, i1 - i0, j1 - j0), p, meta["seed"], tile, device, dtype)


def _bind(p: Problem, fq, fk, row, col, bias, value) -> Problem:
    """The problem with its tensors replaced by the Function's own inputs (or saved tensors).

    Under torch.func transforms a Function's forward and backward receive unwrapped tensors, not the
    ones the problem was lowered with; the tiles must read exactly the tensors they are given."""
    f = p.form
    form = ScoreForm(fq, fk, row, col, f.kernel, f.norm, f.clamp)
    return Problem(form, value, bias, p.graph, p.lead, p.n, p.m, p.e)


class _ChunkedAggregate(torch.autograd.Function):
    """The tiled forward (online softmax) and the tile-recomputing backward of the canonical form.

    Written for torch.func: ``setup_context`` is separate from ``forward``, and forward and backward
    are vmap-compatible (accumulators are combined out of place and gradients concatenated per tile,
    never written into a buffer created inside the function; in-place updates touch only tiles
    computed from the inputs), so the vmap rule is generated (``generate_vmap_rule``) and
    ``torch.func.vmap``, ``grad``, ``vjp`` and ``jacrev`` work. Returns (out, stat) with stat per
    query: the log-sum-exp (C = sum f), 0 or -inf (C = 1: the query has a neighbour or not; constant,
    not differentiable) or the normaliser C_i (count). The log-sum-exp and the count are differentiable:
    the backward takes their gradient too.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(fq, fk, row, col, bias, value, meta):
        p = _bind(meta["problem"], fq, fk, row, col, bias, value)
        bn, bm = meta["blocks"]
        kernel, norm = p.form.kernel, p.form.norm
        device, dtype = value.device, value.dtype
        lead, n, m, e = p.lead, p.n, p.m, p.e
        outs, stats = [], []  # per query tile; out = cat(outs), stat = cat(stats)
        plan = _tile_plan(p, bn, bm, device)
        for ti, i0 in enumerate(range(0, n, bn)):
            i1 = min(n, i0 + bn)
            tn = i1 - i0
            acc = torch.zeros(*lead, tn, e, dtype=dtype, device=device)
            den = torch.zeros(*lead, tn, dtype=dtype, device=device)
            mx = torch.full((*lead, tn), _NEG_INF, dtype=dtype, device=device) if kernel == "exp" else None
            for tj, j0 in enumerate(range(0, m, bm)):
                if plan is not None and not plan[ti][tj]:
                    continue  # block-sparse graph: no edge can be in this tile
                j1 = min(m, j0 + bm)
                lin, mask, logw = _tile(p, i0, i1, j0, j1, device)
                if lin is None:
                    continue  # block-sparse graph: no edge in this tile
                v = value[..., j0:j1, :]
                keep = _keep(meta, lead, i0, i1, j0, j1, device, dtype)
                if kernel == "exp":
                    s = exp_scores(clamp_scores(p.form, lin, inplace=True), mask, logw)  # fresh: updated in place
                    new = torch.maximum(mx, s.amax(-1))
                    # rows can only be all -inf when the graph removes edges
                    restricted = mask is not None or logw is not None
                    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new)) if restricted else new
                    w = s.sub_(safe[..., None]).exp_()
                    alpha = torch.exp(mx - safe)
                    # accumulators combine out of place (vmap: a batched tile never writes into them)
                    den = den * alpha + w.sum(-1)
                    acc = acc * alpha[..., None] + (w if keep is None else w * keep) @ v
                    mx = new
                else:
                    g = torch.relu(lin) if kernel == "relu" else lin
                    ew = edge_weights(mask, logw, dtype)
                    gw = g if ew is None else g * ew
                    acc = acc + (gw if keep is None else gw * keep) @ v
                    # C_i sums the weights of all tm keys, also when they broadcast over keys (width 1)
                    if ew is None:
                        den = den + (j1 - j0)
                    else:
                        den = den + (ew.sum(-1) * (j1 - j0 if ew.shape[-1] == 1 else 1)).expand_as(den)
            if kernel == "exp":
                safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
                if norm == "sum":
                    outs.append(acc / torch.where(den > 0, den, torch.ones_like(den))[..., None])
                    stats.append(torch.where(den > 0, safe + torch.log(den), torch.full_like(den, _NEG_INF)))
                else:
                    outs.append(acc * torch.exp(safe)[..., None])
                    # log C = 0, or -inf where the query has no neighbour
                    stats.append(torch.where(torch.isfinite(mx), torch.zeros_like(mx), mx))
            else:
                outs.append(acc / torch.where(den > 0, den, torch.ones_like(den))[..., None])
                stats.append(den)
        return torch.cat(outs, -2), torch.cat(stats, -1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        fq, fk, row, col, bias, value, meta = inputs
        out, stat = output
        ctx.meta = meta
        if meta["problem"].form.norm == "none":
            ctx.mark_non_differentiable(stat)  # 0 or -inf: a constant
        ctx.save_for_backward(fq, fk, row, col, bias, value, out, stat)

    @staticmethod
    def backward(ctx, dout, dstat):
        fq, fk, row, col, bias, value, out, stat = ctx.saved_tensors
        return tile_backward(ctx.meta, ctx.needs_input_grad[:6], fq, fk, row, col, bias, value, out, stat,
                             dout, dstat) + (None,)


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


def tile_backward(meta: dict, needs, fq, fk, row, col, bias, value, out, stat, dout,
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
    p = _bind(meta["problem"], fq, fk, row, col, bias, value)
    bn, bm = meta["blocks"]
    kernel, norm = p.form.kernel, p.form.norm
    need_q, need_k, need_r, need_c, need_b, need_v = needs
    device, dtype = value.device, value.dtype
    lead, n, m = p.lead, p.n, p.m
    dout = dout.to(dtype)
    rows = [(i, min(n, i + bn)) for i in range(0, n, bn)]
    cols = [(j, min(m, j + bm)) for j in range(0, m, bm)]
    dq, dk, dr, dc, dv, db = {}, {}, {}, {}, {}, {}  # tile index (db: (row, col) block) -> gradient
    need_lin = need_q or need_k or need_r or need_c
    b_rows = need_b and bias.shape[-2] != 1  # the float mask has a row per query (else it broadcasts)
    b_cols = need_b and bias.shape[-1] != 1

    plan = _tile_plan(p, bn, bm, device)
    for ti, (i0, i1) in enumerate(rows):
        do = dout[..., i0:i1, :]
        st = stat[..., i0:i1]
        # D_i = dO_i . O_i (softmax and count normalisations).
        dsum = (do * out[..., i0:i1, :]).sum(-1) if norm != "none" else None
        if dstat is not None and norm != "none":
            ds_ = dstat[..., i0:i1].to(dtype)
            dsum = dsum - (ds_ if norm == "sum" else ds_ * st)
        if kernel == "exp":
            base = torch.where(torch.isfinite(st), st, torch.zeros_like(st))
        else:
            inv = torch.where(st > 0, 1.0 / torch.where(st > 0, st, torch.ones_like(st)), torch.zeros_like(st))
        for tj, (j0, j1) in enumerate(cols):
            if plan is not None and not plan[ti][tj]:
                continue
            lin, mask, logw = _tile(p, i0, i1, j0, j1, device)
            if lin is None:
                continue
            v = value[..., j0:j1, :]
            dp = do @ v.transpose(-1, -2)
            keep = _keep(meta, lead, i0, i1, j0, j1, device, dtype)
            if keep is not None:
                dp = dp * keep  # the loss sees the kept messages only
            if kernel == "exp":
                flat = None if p.form.clamp is None else (lin + p.form.clamp) >= 0  # capped: no gradient
                s = exp_scores(clamp_scores(p.form, lin), mask, logw)
                if norm == "none":
                    prob = torch.exp(s)  # C = 1: the raw kernel value
                    dlin = prob * dp
                else:
                    prob = s.sub_(base[..., None]).exp_()  # exp(s) / C from the saved log-sum-exp
                    dlin = (dp - dsum[..., None]).mul_(prob)
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
                target = (*bias.shape[:-2], i1 - i0 if b_rows else 1, j1 - j0 if b_cols else 1)
                _add(db, key, dlogw.sum_to_size(target))

    def reduce(parts: dict, spans, dim: int, like: Optional[Tensor], need: bool) -> Optional[Tensor]:
        if not need:
            return None
        return _assemble(parts, spans, dim, like).sum_to_size(like.shape)

    grad_b = None
    if need_b:  # the float mask's blocks, (N|1) x (M|1) of them, zeros where no tile contributed
        r_spans = rows if b_rows else [(0, 1)]
        c_spans = cols if b_cols else [(0, 1)]
        block = lambda ri, cj, r, c: db[(ri, cj)] if (ri, cj) in db else bias.new_zeros(*bias.shape[:-2], r, c)  # noqa
        grad_b = torch.cat([torch.cat([block(ri, cj, a1 - a0, c1 - c0) for cj, (c0, c1) in enumerate(c_spans)], -1)
                            for ri, (a0, a1) in enumerate(r_spans)], -2)
    return (reduce(dq, rows, -2, fq, need_q), reduce(dk, cols, -2, fk, need_k), reduce(dr, rows, -1, row, need_r),
            reduce(dc, cols, -1, col, need_c), grad_b, reduce(dv, cols, -2, value, need_v))


def run(query: Tensor, key: Tensor, value: Tensor, affinity, graph, *, dropout_p: float = 0.0, seed: int = 0,
        block_n: Optional[int] = None, block_m: Optional[int] = None, return_lse: bool = False):
    for name, val in (("block_n", block_n), ("block_m", block_m)):
        if val is not None and (not isinstance(val, int) or val < 1):
            raise ValueError(f"chunked option {name} must be a positive int, got {val!r}")
    p = lower(query, key, value, affinity, graph)
    batch = math.prod(p.lead)
    bn, bm = default_blocks(batch, p.n, p.m)
    bn, bm = block_n or bn, block_m or bm
    f = p.form
    meta = {"problem": p, "blocks": (bn, bm), "dropout_p": dropout_p, "seed": seed}
    out, stat = _ChunkedAggregate.apply(f.query, f.key, f.row, f.col, p.bias, p.value, meta)
    if not return_lse:
        return out.to(query.dtype)
    if f.norm == "count":
        lse = safe_log(stat)
    else:
        lse = stat if f.lse_row is None else stat + f.lse_row
    return out.to(query.dtype), lse.expand(*p.lead, p.n)
