"""The ``chunked`` backend: pure PyTorch, tiled over queries and keys, never N x M.

Forward walks key tiles for each query tile with an online (running-max) softmax, as
FlashAttention does, or, where a bound on the scores allows it (the complete graph, eager, CPU;
:func:`fixed_shift_bound`), with the first key tile's row maxima kept as the shift (no per-tile
rescaling); backward recomputes each tile's scores from the saved log-sum-exp (or the
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

from .._shapes import broadcast_shapes
from .._values import known_norm, untransformed
from ._exp_jit import exp_shifted_
from ._tiles import (
    TileRun,
    bind,
    release_buffer,
    score_buffer,
    scratch,
    tile_backward,
    tile_dropout,
    tile_plan,
    tile_scores,
)
from .common import (
    Problem,
    call,
    clamp_scores,
    edge_weights,
    exp_scores,
    finite_or_zero,
    lower,
    rows,
    safe_log,
)

__all__ = ["can_run", "run", "default_blocks", "RETURNS_LSE"]

RETURNS_LSE = True

_NEG_INF = -math.inf

#: Target number of score elements per tile (all batch entries together): 2 MiB in fp32.
TILE_ELEMENTS = 1 << 19
#: Keys per tall tile (see :func:`default_blocks`).
TALL_KEYS = 256


def can_run(query, key, value, affinity, graph, dropout_p: float = 0.0) -> tuple[bool, str]:
    if graph is not None and graph.block_requires_grad:
        return False, (
            "chunked cannot differentiate per-edge weights of an EdgeIndex graph "
            "(use backend='reference' or 'pyg', or detach the weights)"
        )
    return True, ""


def default_blocks(batch: int, n: int, m: int, complete: bool = False) -> tuple[int, int]:
    """Square tiles of side 2^k ~ sqrt(TILE_ELEMENTS / batch), clamped to [64, 1024] and the sizes;
    on the complete graph (``complete``) with fewer than eight batch entries, tall tiles instead:
    TALL_KEYS keys and TILE_ELEMENTS / (batch x TALL_KEYS) queries (at most 2048), keys widened to
    keep the tile's size where the queries are fewer (at most 1024).

    Measured on a 2-core CPU: 512 x 512 for one head and 256 x 256 for eight heads were the fastest
    square shapes (benchmarks/core.py and benchmarks/nonlocal.py). Forced ``chunked``'s softmax
    against SDPA, in turns (one / two threads): one head, N = 4096, d = 64, 2048 x 256 1.07 / 1.23-1.29x
    forward and 1.05 / 1.03x forward+backward against 512 x 512's 1.14 / 1.40x and 1.14 / 1.19x; N =
    1024 1024 x 256 1.21 / 1.41x and 1.14 / 1.20x against 1.26 / 1.51x and 1.20 / 1.30x; two heads, N
    = 2048 (two threads) 1.26x forward against 1.43x. At eight heads the square tiles stayed as fast
    or faster. A block-sparse graph keeps square tiles: tall ones would skip fewer empty tiles.
    """
    if complete and batch * TALL_KEYS * TALL_KEYS < TILE_ELEMENTS:
        bn = min(n, 2048, TILE_ELEMENTS // (batch * TALL_KEYS))
        return bn, min(m, max(TALL_KEYS, min(1024, TILE_ELEMENTS // (batch * max(1, bn)))))
    side = max(64, min(1024, 2 ** int(math.log2(max(1.0, math.sqrt(TILE_ELEMENTS / max(1, batch)))))))
    return min(n, side), min(m, side)


#: The fixed shift's largest allowed gap: a query tile keeps its first key tile's row maxima as the
#: shift for all its key tiles when no later score can exceed them by more than this (see
#: :func:`fixed_shift_bound`); weights then stay <= e^60 (the exp kernel's clamp at 88 is never reached).
FIXED_SHIFT_GAP = 60.0


def fixed_shift_bound(p: Problem, bm: int) -> Optional[tuple[Tensor, float]]:
    """(an upper bound of every score of each query, float64 (..., N); the largest gap allowed above
    the shift) for the fixed-shift softmax, or None where it does not apply.

    The online softmax rescales its accumulators whenever a key tile raises a row's running maximum
    (a max pass, an exp of the old-minus-new maxima and two rescales per tile). A query tile can
    instead keep the row maxima m_i of its first key tile as the shift throughout when no later score
    exceeds them by more than T: every weight exp(s_ij - m_i) is then at most e^T, the denominator
    >= 1 (the row's true maximum is >= m_i) and each weight below 2^-126 that flushes to 0 is below
    2^-126 of it, as in the online softmax; the log-sum-exp is m_i + log of the denominator.

    The bound B_i >= s_ij for all j is Cauchy-Schwarz on the form, |q'_i| max_j |k'_j| + r_i +
    max_j c_j, plus the scores' float rounding ((d + 4) u of the terms' magnitudes, and the norms'
    own), then the flat top; summed in float64. T is 60 or less, so that M e^T max|v| (a message's
    size) stays below a quarter of the dtype's largest value (max|v| from the call's value scan).

    Applies to exp kernels with C = sum f (the caller: complete graph, no bias or cut-off), eager
    (not traced, no torch.func transform: the tiles update in place), on the CPU (each query tile
    reads its gap on the host) and where there is more than one key tile. Measured 4-9% off forced
    ``chunked``'s forward at N = 1024..4096 (one and eight heads, one and two threads).
    """
    f = p.form
    if (f.query is None or f.key is None or f.kernel != "exp" or f.norm != "sum" or p.m <= bm
            or p.value.device.type != "cpu" or not untransformed()):
        return None  # traced code branches on no value; a batched tile is not updated in place
    u = torch.finfo(p.value.dtype).eps / 2
    d = f.query.shape[-1]
    # norms in the form's dtype (each within (d + 2) u of the exact), widened for the sums below
    qn = torch.linalg.vector_norm(f.query.detach(), dim=-1).double()
    kn = torch.linalg.vector_norm(f.key.detach(), dim=-1).amax(-1, keepdim=True).double()
    top = qn * kn * (1 + 2 * (d + 2) * u)
    mag = top  # the terms' magnitudes (every update below is out of place)
    if f.row is not None:
        r = f.row.detach().double()
        top, mag = top + r, mag + r.abs()
    if f.col is not None:
        c = f.col.detach().double()
        top, mag = top + c.amax(-1, keepdim=True), mag + c.abs().amax(-1, keepdim=True)
    bound = top + (d + 4) * u * mag
    if f.clamp is not None:
        bound = (bound + f.clamp + u * (bound.abs() + abs(f.clamp))).clamp_max(0.0)
    vmax = known_norm(p.value)  # the call's value scan: |V|_F >= max |v|
    if vmax is None:
        lo, hi = torch.aminmax(p.value.detach()) if p.value.numel() else (0.0, 0.0)
        vmax = max(abs(float(lo)), abs(float(hi)))
    gap = min(FIXED_SHIFT_GAP,
              math.log(torch.finfo(p.value.dtype).max / 4) - math.log(max(1.0, p.m * vmax)))
    return bound, gap


def keeps_shift(fixed_bound: tuple[Tensor, float], i0: int, i1: int, top: Tensor) -> bool:
    """Whether query tile [i0, i1) keeps its first key tile's row maxima ``top`` as the shift: every
    later score is at most the allowed gap above them (see :func:`fixed_shift_bound`)."""
    bound, gap = fixed_bound
    return bool((bound[..., i0:i1] - top).amax() <= gap)


def _add_message(acc: Tensor, kw: Tensor, v: Tensor, buf: Optional[Tensor]) -> Optional[Tensor]:
    """``acc += kw @ v`` in place (eager): one GEMM accumulating into ``acc`` where the batch shapes
    agree, else the product through the scratch buffer ``buf`` and an add (the buffer returned, to
    be passed again for the next tile)."""
    lead = acc.shape[:-2]
    if kw.shape[:-2] == lead and v.shape[:-2] == lead:
        tn, e = acc.shape[-2:]
        acc.view(-1, tn, e).baddbmm_(kw.reshape(-1, tn, kw.shape[-1]), v.reshape(-1, *v.shape[-2:]))
        return buf
    shape = (*broadcast_shapes(kw.shape[:-2], v.shape[:-2]), *acc.shape[-2:])
    if buf is None or tuple(buf.shape) != shape:
        release_buffer(buf, "msg")
        buf = scratch(shape, acc.dtype, acc.device, "msg")
    acc.add_(torch.matmul(kw, v, out=buf))
    return buf


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
    def forward(fq, fk, row, col, bias, value, run: TileRun):
        p = bind(run.problem, fq, fk, row, col, bias, value)
        bn, bm = run.blocks
        kernel, norm = p.form.kernel, p.form.norm
        device, dtype = value.device, value.dtype
        lead, n, m, e = p.lead, p.n, p.m, p.e
        outs, stats = [], []  # per query tile; out = cat(outs), stat = cat(stats)
        plan = tile_plan(p, bn, bm, device)
        # rows can only be all -inf when the graph removes edges (or the cut-off does)
        restricted = p.graph is not None or p.bias is not None or p.form.floor is not None
        buf = score_buffer(p, bn, bm) if kernel == "exp" else None  # every tile's scores, in turn
        msg_buf: Optional[Tensor] = None
        # eager CPU softmax over several key tiles: a query tile may keep its first tile's maxima
        fixed_bound = fixed_shift_bound(p, bm) if not restricted else None
        for ti, i0 in enumerate(range(0, n, bn)):
            i1 = min(n, i0 + bn)
            tn = i1 - i0
            # The accumulators start at the first key tile with an edge (None until then): no zero
            # fill, and no rescaling of the first tile by the running max's exp(-inf - max) = 0.
            acc: Optional[Tensor] = None
            den: Optional[Tensor] = None
            # the running max of the exp kernels (the linear kernels keep none)
            mx: Optional[Tensor] = None
            fixed = False  # the shift stays mx (this query tile's first key tile's maxima)
            for tj, j0 in enumerate(range(0, m, bm)):
                if plan is not None and not plan[ti][tj]:
                    continue  # block-sparse graph: no edge can be in this tile
                j1 = min(m, j0 + bm)
                lin, mask, logw = tile_scores(p, i0, i1, j0, j1, device, buf)
                if lin is None:
                    continue  # block-sparse graph: no edge in this tile
                v = rows(value, j0, j1)
                keep = tile_dropout(run, lead, i0, i1, j0, j1, device, dtype)
                if kernel == "exp":
                    # fresh: updated in place
                    s = exp_scores(clamp_scores(p.form, lin, inplace=True), mask, logw)
                    if fixed and mx is not None:  # the shift stays the first tile's maxima
                        new = safe = mx
                    else:
                        top = s.amax(-1)
                        new = top if mx is None else torch.maximum(mx, top)
                        safe = finite_or_zero(new) if restricted else new
                    w = s if exp_shifted_(s, safe) else s.sub_(safe[..., None]).exp_()
                    kw = w if keep is None else w * keep
                    if acc is None or den is None or mx is None:  # the first tile: nothing to rescale
                        den, acc = w.sum(-1), kw @ v
                        fixed = fixed_bound is not None and j1 < m and keeps_shift(fixed_bound, i0, i1, top)
                    elif fixed:  # no rescale: accumulate in place (eager, see fixed_shift_bound)
                        msg_buf = _add_message(acc, kw, v, msg_buf)
                        den.add_(w.sum(-1))
                    elif buf is not None:
                        # eager: the accumulators (this call's own) rescale in place, and the message
                        # accumulates in one GEMM (or through a scratch buffer: no fresh (tn, e) tensors)
                        alpha = torch.exp(mx - safe)
                        msg_buf = _add_message(acc.mul_(alpha[..., None]), kw, v, msg_buf)
                        den.mul_(alpha).add_(w.sum(-1))
                    else:
                        alpha = torch.exp(mx - safe)
                        # accumulators combine out of place (vmap: a batched tile never writes into them)
                        den = den * alpha + w.sum(-1)
                        acc = acc * alpha[..., None] + kw @ v
                    mx = new
                else:
                    g = torch.relu(lin) if kernel == "relu" else lin
                    ew = edge_weights(mask, logw, dtype)
                    gw = g if ew is None else g * ew
                    msg = (gw if keep is None else gw * keep) @ v
                    # C_i sums the weights of all tm keys, also when they broadcast over keys (width 1)
                    cnt = (torch.full((*lead, tn), float(j1 - j0), dtype=dtype, device=device) if ew is None
                           else (ew.sum(-1) * (j1 - j0 if ew.shape[-1] == 1 else 1)).expand(*lead, tn))
                    acc = msg if acc is None else acc + msg
                    den = cnt if den is None else den + cnt
            if acc is None or den is None:  # no key tile had an edge: no neighbour, y = 0
                acc = torch.zeros(*lead, tn, e, dtype=dtype, device=device)
                den = torch.zeros(*lead, tn, dtype=dtype, device=device)
                if kernel == "exp":
                    mx = torch.full((*lead, tn), _NEG_INF, dtype=dtype, device=device)
            if mx is not None:  # the exp kernels
                if norm == "sum" and not restricted:  # the row max contributes exp(0) = 1: den >= 1
                    outs.append(acc / den[..., None])
                    stats.append(mx + torch.log(den))
                elif norm == "sum":
                    safe = finite_or_zero(mx)
                    outs.append(acc / torch.where(den > 0, den, torch.ones_like(den))[..., None])
                    stats.append(torch.where(den > 0, safe + torch.log(den), torch.full_like(den, _NEG_INF)))
                else:
                    outs.append(acc * torch.exp(finite_or_zero(mx))[..., None])
                    # log C = 0, or -inf where the query has no neighbour
                    stats.append(torch.where(torch.isfinite(mx), torch.zeros_like(mx), mx))
            else:
                outs.append(acc / torch.where(den > 0, den, torch.ones_like(den))[..., None])
                stats.append(den)
        release_buffer(buf)
        release_buffer(msg_buf, "msg")
        if len(outs) == 1:  # one query tile: its own (fresh) tensors, no copy
            return outs[0], stats[0].contiguous()  # (a count may be an expanded view)
        return torch.cat(outs, -2), torch.cat(stats, -1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        fq, fk, row, col, bias, value, run = inputs
        out, stat = output
        ctx.run = run
        if run.problem.form.norm == "none":
            ctx.mark_non_differentiable(stat)  # 0 or -inf: a constant
        ctx.save_for_backward(fq, fk, row, col, bias, value, out, stat)

    @staticmethod
    def backward(ctx, dout, dstat):
        fq, fk, row, col, bias, value, out, stat = ctx.saved_tensors
        return tile_backward(ctx.run, ctx.needs_input_grad[:6], fq, fk, row, col, bias, value, out, stat,
                             dout, dstat) + (None,)




def run(query: Tensor, key: Tensor, value: Tensor, affinity, graph, *, dropout_p: float = 0.0, seed: int = 0,
        block_n: Optional[int] = None, block_m: Optional[int] = None, return_lse: bool = False):
    for name, val in (("block_n", block_n), ("block_m", block_m)):
        if val is not None and (not isinstance(val, int) or val < 1):
            raise ValueError(f"chunked option {name} must be a positive int, got {val!r}")
    p = lower(query, key, value, affinity, graph)
    batch = math.prod(p.lead)
    bn, bm = default_blocks(batch, p.n, p.m, complete=p.graph is None)
    bn, bm = block_n or bn, block_m or bm
    f = p.form
    tiles = TileRun(p, (bn, bm), dropout_p, seed)
    out, stat = call(_ChunkedAggregate, f.query, f.key, f.row, f.col, p.bias, p.value, tiles)
    if not return_lse:
        return out.to(query.dtype)
    if f.norm == "count":
        lse = safe_log(stat)
    else:
        lse = stat if f.lse_row is None else stat + f.lse_row
    return out.to(query.dtype), lse.expand(*p.lead, p.n)

