"""The ``grid`` backend: grid graphs (``LocalWindow``, ``CrissCross``) computed on the grid itself.

Nodes are pixels / voxels of a row-major grid, so a query's keys sit at fixed offsets (or in its own
row and column) and no tile, mask or edge list is needed:

* ``LocalWindow`` (1-D/2-D/3-D, every option: kernel size odd or even, dilation, causal axes, the
  ``"clip"`` and ``"shift"`` border rules, the relative position bias ``rpb``) is computed
  shift-major, the way scikit-image's fast non-local means and NATTEN's reference do it: one pass
  per window slot, vectorised over all nodes at once. Slot u of every query is the key at offset u,
  a shifted view of the padded key map (no copy); the padding's column bias is -inf, so keys past
  the border drop out without a mask. A ``"shift"`` axis (NATTEN's window, which keeps k keys at the
  borders by moving its start) has the 2 k - 1 offsets its windows can hold as slots, each with a
  -inf log-weight for the queries whose window does not hold it (the interior's window is the
  centred one; only the border queries reach further). The slots' dot products q'_i . k'_{i+u} on
  the last axis are the diagonals of one batched product per outer slot (blocks of ``ROW_BLOCK``
  queries times the padded key rows they reach), so they run at matrix-product speed. An online
  (running-max) softmax merges the slots, in groups of ``SLOT_GROUP`` that share one rescale, so the
  forward keeps O(N (d + e) + SLOT_GROUP N + N (min(W, ROW_BLOCK) + pad)) state and never holds N x
  window scores; the backward recomputes each slot's scores from the saved log-sum-exp and adds the
  key-side gradients into views of padded buffers. The bias enters as the slot's table entry (per
  offset and leading dim, e.g. head) and its gradient is gathered the same way.
* ``CrissCross`` (CCNet) is two batched matrix products per pass: the row part (B, H, W, W) and the
  column part (B, W, H, H) with the query itself removed from the column part (counted once), merged
  exactly by a joint log-sum-exp. That is O(N (H + W) d) work, CCNet's cost (tiles and edge lists
  pay O(N^2 d) or gathers); the normalised weights (N (H + W) per batch entry, the same as the einsum
  formulation's attention map) are saved for the backward.

Every exp-kernel affinity of the canonical form (``Softmax``; ``Gaussian`` with C = sum f or C = 1,
with or without a flat top): s_ij = q'_i . k'_j + r_i + c_j, f = exp(s) (flat top: exp(min(s + o,
0))). Count-normalised affinities (DotProduct, Concatenation), dropout, a permuted node order and
intersections with other graphs go to the other backends (``can_run`` says which). Accumulation is
fp32 for fp16/bf16 inputs and the input dtype otherwise. The autograd Functions use
``setup_context`` and trace under torch.compile; float64 gradcheck passes (tests/test_grid.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..graph import LocalWindow
from .common import call, finite_or_zero, floor_scores, lower

__all__ = ["can_run", "prefer", "run", "window_slots", "MAX_WINDOW_WORK", "MAX_WINDOW_WORK_INFERENCE"]

_NEG_INF = -math.inf

#: Automatic dispatch takes ``grid`` for criss-cross graphs always and for local windows whose work
#: per query, the offset slots it visits (:func:`window_slots`: the keys of a clipped window, (2 k -
#: 1)^D for a shifted one) times the widths d + e, is at most this when a gradient is wanted. Measured
#: with ``nlgraph bench grid`` (2-core CPU, 2 threads, forward+backward, 4 heads of width d = e,
#: 64^2 and 128^2 maps, benchmarks/results/grid-cpu.json): grid took 0.27-0.58x chunked's time up to
#: 169 slots x 64 (radius 6 at d = 32; shifted kernel 7 at d = 32: 0.90x), 0.97-1.63x at 169 x 128
#: (radius 6 or shifted kernel 7 at d = 64) and 2.4-3.6x at 625 slots (shifted kernel 13).
#: Criss-cross: grid 0.02x pyg's and 0.06x chunked's time at 64x64, C = 256.
MAX_WINDOW_WORK = 12000

#: The same without gradients (inference), where the forward reads each slot once: grid took 0.13-0.57x
#: chunked's time up to 169 slots x 128 (radius 6 at d = 64; shifted kernel 7 at d = 64: 0.93x) and
#: 1.5-1.9x at 625 x 64 (shifted kernel 13).
MAX_WINDOW_WORK_INFERENCE = 24000

#: Slots whose scores the forward holds at once (SLOT_GROUP x N scores): the running max and the
#: accumulator are rescaled once per group instead of once per slot.
SLOT_GROUP = 8

#: Queries per block of the last axis in the forward's batched score products: each block's product
#: holds (ROW_BLOCK + padding) scores per query, of which only the window's slots are read, so small
#: blocks waste the least, and keep the products at N (ROW_BLOCK + padding) entries however long the
#: last axis is (a 1-D sequence too). Measured: two runs of ``nlgraph bench grid`` on the same idle
#: 2-core VM, 2 threads, the first with ROW_BLOCK = 256 (whole rows of the 64^2 / 128^2 maps), the
#: second with 16: the eight windows' forward took 0.33-0.87x the time, the 1-D sequence of 16384
#: tokens 0.45x (0.0307 s -> 0.0137 s).
ROW_BLOCK = 16

#: The grid patterns (:attr:`nlgraph.graph.Graph.grid_pattern`) this backend computes.
_PATTERNS = ("window", "criss_cross")


def can_run(query, key, value, affinity, graph) -> tuple[bool, str]:
    if graph is None or graph.grid_pattern not in _PATTERNS:
        return False, f"grid computes LocalWindow and CrissCross graphs (alone), not {graph!r}"
    if graph.order is not None:
        return False, "grid needs the row-major node order (order=None); use chunked for a permuted order"
    if affinity.kernel != "exp":
        return False, (f"grid computes exp-kernel affinities (Softmax, Gaussian), not {affinity!r} "
                       f"(its kernel is {affinity.kernel!r})")
    return True, ""


def _slot_counts(graph: LocalWindow) -> list[int]:
    """Per axis, the offset slots the grid backend visits (those of :meth:`LocalWindow.slot_reach`)."""
    return [lo + hi + 1 for lo, hi in (graph.slot_reach(a) for a in range(len(graph.shape)))]


def window_slots(graph: LocalWindow) -> int:
    """The offset slots the grid backend visits for a window (its cost): the keys per query of a clipped
    window; on a shifted axis the 2 k - 1 offsets either side, each -inf for the queries whose shifted
    window does not hold it."""
    if getattr(graph, "grid_pattern", None) != "window":
        raise TypeError(f"window_slots(graph) takes a LocalWindow, got {graph!r}")
    return math.prod(_slot_counts(graph))


def prefer(query, key, value, affinity, graph) -> bool:
    """Criss-cross always; windows whose offset slots times (d + e) are at most MAX_WINDOW_WORK when a
    gradient is wanted, MAX_WINDOW_WORK_INFERENCE without (measured: the constants)."""
    if graph.grid_pattern == "criss_cross":
        return True
    tensors = (query, key, value, graph.rpb)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    work = window_slots(graph) * (query.shape[-1] + value.shape[-1])
    return work <= (MAX_WINDOW_WORK if training else MAX_WINDOW_WORK_INFERENCE)


# ------------------------------------------------------------------------------------------------
# local windows: shift-major over the window's slots
# ------------------------------------------------------------------------------------------------


class _Plan:
    """The window's offset slots per axis, on one device: the padding that turns each slot into a view
    of the key side, the queries each slot serves (a -inf log-weight for the others, on shifted axes)
    and each slot's bias-table index."""

    def __init__(self, graph: LocalWindow, device: torch.device):
        self.shape = graph.shape
        d = len(self.shape)
        reach = [graph.slot_reach(a) for a in range(d)]
        # zero padding of the key side: slot u reads the view starting at u * dilation
        self.pads = [(lo * t, hi * t) for (lo, hi), t in zip(reach, graph.dilation, strict=True)]
        self.dilation = graph.dilation
        self.slots = _slot_counts(graph)
        # per axis, each slot's bias-table entry: its offset (in dilation steps) + k - 1, the same for
        # every query that has the slot's key (host-side ints: no sync, traceable)
        self.rel_const = [[u - lo + k - 1 for u in range(n)]
                          for (lo, _), k, n in zip(reach, graph.kernel_size, self.slots, strict=True)]
        # per shifted axis, (slots, extent): 0 where the query's window holds the slot's offset, -inf
        # where not (a shifted window is a subset of the 2 k - 1 offsets either side, different near the
        # borders); None on the other axes, where the -inf padding of the key bias does the clipping
        self.masks: list[Optional[Tensor]] = []
        for a in range(d):
            mask = None
            if graph._shifted(a):
                ok = graph.axis_slots(a, device, offsets=True)[1]
                mask = torch.zeros(ok.shape, device=device).masked_fill(~ok, _NEG_INF)
            self.masks.append(mask)
        self.table = tuple(2 * k - 1 for k in graph.kernel_size)

    def pad(self, x: Tensor, channels: bool, value: float = 0.0) -> Tensor:
        """Pad a (B, *shape[, c]) key-side map with ``value``."""
        if not any(p != (0, 0) for p in self.pads):
            return x
        spec = [0, 0] if channels else []
        for lo_hi in reversed(self.pads):
            spec.extend(lo_hi)
        return F.pad(x, spec, value=value)

    def key_bias(self, col: Optional[Tensor], like: Tensor) -> Tensor:
        """The column bias padded with -inf: a slot reading past the border scores -inf there (the
        keys that do not exist), so no slot needs a mask for them. Zeros stand in for an absent column
        bias."""
        base = col if col is not None else like.new_zeros(like.shape[:-1])
        return self.pad(base, False, value=_NEG_INF)

    def crop(self, x: Tensor) -> Tensor:
        """The (B, *shape[, c]) grid inside a padded map (a view)."""
        for a, (lo, _) in enumerate(self.pads):
            x = x.narrow(1 + a, lo, self.shape[a])
        return x

    def take(self, x: Tensor, axis: int, u: int) -> Tensor:
        """The key-side map seen by slot u along ``axis`` (a view)."""
        return x.narrow(1 + axis, u * self.dilation[axis], self.shape[axis])

    def walk(self, tensors: list[Optional[Tensor]], axis: int = 0, slot: tuple[int, ...] = (),
             stop: Optional[int] = None) -> Iterator[tuple[tuple[int, ...], list[Optional[Tensor]]]]:
        """Every slot (u_0, ..., u_{D-1}) with the key-side maps it reads (outer axes' reads shared);
        with ``stop``, the slots of the axes before it (the maps still whole along the others)."""
        if axis == (len(self.shape) if stop is None else stop):
            yield slot, tensors
            return
        for u in range(self.slots[axis]):
            yield from self.walk([None if t is None else self.take(t, axis, u) for t in tensors], axis + 1,
                                 slot + (u,), stop)

    def scored_walk(self, fq: Tensor, kp: Tensor, tensors: list[Optional[Tensor]]):
        """:meth:`walk` over ``tensors`` with each slot's q'.k' from the padded key map ``kp``: per outer
        slot, batched products of blocks of ``ROW_BLOCK`` queries along the last axis with the keys
        they can reach, fq (..., blk, d) @ keys (..., blk + pad, d)^T, whose diagonals are the last
        axis' slots' dot products (matrix-product speed instead of one reduction pass per slot; the
        blocks keep the products at N (blk + pad) entries however long the last axis is). The keys
        are laid out (..., d, W + pad) once, so the products read views of them without a copy."""
        last = len(self.shape) - 1
        t = self.dilation[last]
        w = self.shape[last]
        pad = sum(self.pads[last])
        blk = min(w, ROW_BLOCK)
        nb = -(-w // blk)
        fqb = fq
        kt = kp.transpose(-1, -2)
        if nb > 1:  # the queries in nb blocks of blk (zero rows at the end, their scores dropped)
            fqb = F.pad(fq, (0, 0, 0, nb * blk - w)).unflatten(-2, (nb, blk))
            kt = F.pad(kt, (0, nb * blk - w))
        kt = kt.contiguous()
        walked: list[Optional[Tensor]] = [kt, *tensors]
        for outer, ts in self.walk(walked, stop=last):
            keys = ts[0]
            assert keys is not None  # the walk's first map is the (padded, transposed) key map
            if nb == 1:
                prod = fq @ keys
            else:  # block i reads key rows [i blk, i blk + blk + pad): overlapping windows (a view)
                prod = fqb @ keys.unfold(-1, blk + pad, blk).movedim(-2, -3)  # (..., nb, d, blk + pad)
            for u in range(self.slots[last]):
                dot = prod.diagonal(offset=u * t, dim1=-2, dim2=-1)
                if nb > 1:
                    dot = dot.flatten(-2).narrow(-1, 0, w)
                yield outer + (u,), dot, [None if x is None else self.take(x, last, u) for x in ts[1:]]

    def _axis_view(self, t: Tensor, axis: int) -> Tensor:
        view = [1] * len(self.shape)
        view[axis] = self.shape[axis]
        return t.reshape(view)

    def bias(self, rpb: Optional[Tensor], slot: tuple[int, ...]) -> Optional[Tensor]:
        """The slot's additive log-weight, (B, *shape) broadcastable: its bias-table entry from rpb
        (B, *table) (one per slot: the offset is the slot's) plus, on shifted axes, -inf for the queries
        whose window does not hold the slot's offset. None when neither applies."""
        out = rpb
        if out is not None:
            for a, entry in enumerate(self.table_entry(slot)):
                out = out.narrow(1 + a, entry, 1)
        for a, u in enumerate(slot):
            mask = self.masks[a]
            if mask is not None:
                m = self._axis_view(mask[u], a)
                out = m if out is None else out + m
        return out

    def table_entry(self, slot: tuple[int, ...]) -> tuple[int, ...]:
        """The slot's bias-table entry (one per slot: the slot is one offset)."""
        return tuple(self.rel_const[a][u] for a, u in enumerate(slot))


@dataclass(frozen=True)
class _GridRun:
    """What the grid Functions read besides their tensors: the kernel's flat top and normalisation, and
    for a window its slot plan (None for criss-cross)."""

    clamp: Optional[float]
    norm: str
    plan: Optional[_Plan] = None
    floor: Optional[float] = None  # the kernel's cut-off (ScoreForm.floor)


def _slot_scores(fq: Tensor, kt: Optional[Tensor], row: Optional[Tensor], colt: Tensor,
                 bias: Optional[Tensor], clamp: Optional[float],
                 dot: Optional[Tensor] = None,
                 floor: Optional[float] = None) -> tuple[Tensor, Optional[Tensor]]:
    """One slot's scores s = min(q'.k' + r + c + o, 0) + bias (c = -inf where the slot has no key: the
    padding of :meth:`_Plan.key_bias`; -inf below ``-floor`` before the bias: the cut-off) and the
    capped positions (flat top: no gradient through q', k', r, c there). ``dot``: q'.k' when already
    known."""
    if dot is None:
        assert kt is not None  # the slot's keys, when its dot products are not given
        dot = torch.linalg.vecdot(fq, kt)
    s = dot
    if row is not None:
        s = s + row
    s = s + colt
    capped = None
    if clamp is not None:
        s = s + clamp
        capped = s >= 0
        s = s.clamp_max(0.0)
    if floor is not None:
        s = floor_scores(s, floor)
    if bias is not None:
        s = s + bias
    return s, capped


class _WindowAggregate(torch.autograd.Function):
    """Shift-major forward (online softmax over the window's slots) and slot-recomputing backward.

    Inputs are maps (B, *shape[, c]); returns (out (B, *shape, e), stat (B, *shape)): the log-sum-exp
    per query (C = sum f) or the running max (C = 1), not differentiable."""

    @staticmethod
    def forward(fq, fk, row, col, rpb, value, run: _GridRun):
        plan, clamp, norm = run.plan, run.clamp, run.norm
        assert plan is not None  # a window run carries its plan
        kp, vp = plan.pad(fk, True), plan.pad(value, True)
        cp = plan.key_bias(col, fk)
        lead = fq.shape[:-1]
        mx = torch.full(lead, _NEG_INF, dtype=fq.dtype, device=fq.device)
        den = torch.zeros(lead, dtype=fq.dtype, device=fq.device)
        acc = torch.zeros(*lead, value.shape[-1], dtype=fq.dtype, device=fq.device)
        group: list[tuple[Tensor, Tensor]] = []

        def merge(mx, den, acc):
            """Fold a group of slots into the running state: one rescale per group, not per slot."""
            new = mx
            for s, _ in group:
                new = torch.maximum(new, s)
            safe = finite_or_zero(new)
            alpha = torch.exp(mx - safe)
            den, acc = den.mul_(alpha), acc.mul_(alpha[..., None])
            for s, vt in group:
                w = s.sub_(safe).exp_()
                den.add_(w)
                acc.addcmul_(w[..., None], vt)
            group.clear()
            return new, den, acc

        for slot, dot, (vt, ct) in plan.scored_walk(fq, kp, [vp, cp]):
            bias = plan.bias(rpb, slot)
            group.append((_slot_scores(fq, None, row, ct, bias, clamp, dot, run.floor)[0], vt))
            if len(group) == SLOT_GROUP:
                mx, den, acc = merge(mx, den, acc)
        if group:
            mx, den, acc = merge(mx, den, acc)
        safe = finite_or_zero(mx)
        if norm == "sum":
            out = acc / torch.where(den > 0, den, torch.ones_like(den))[..., None]
            stat = torch.where(den > 0, safe + torch.log(den), torch.full_like(den, _NEG_INF))
        else:
            out = acc * torch.exp(safe)[..., None]
            stat = safe
        return out, stat

    @staticmethod
    def setup_context(ctx, inputs, output):
        fq, fk, row, col, rpb, value, run = inputs
        out, stat = output
        ctx.run = run
        ctx.mark_non_differentiable(stat)
        ctx.save_for_backward(fq, fk, row, col, rpb, value, out, stat)

    @staticmethod
    def backward(ctx, dout, _dstat):
        fq, fk, row, col, rpb, value, out, stat = ctx.saved_tensors
        plan, clamp, norm = ctx.run.plan, ctx.run.clamp, ctx.run.norm
        need_q, need_k, need_r, need_c, need_b, need_v = ctx.needs_input_grad[:6]
        b = fq.shape[0]
        n = math.prod(plan.shape)
        dout = dout.to(value.dtype)
        kp, vp = plan.pad(fk, True), plan.pad(value, True)
        cp = plan.key_bias(col, fk)
        dsum = (dout * out).sum(-1) if norm == "sum" else None
        base = finite_or_zero(stat)
        dq = torch.zeros_like(fq) if need_q else None
        dr = torch.zeros_like(row) if need_r else None
        db = rpb.new_zeros(b, *plan.table) if need_b else None
        # every slot reads a view of the padded key side: its key-side gradients add into views of
        # zero-padded buffers, cropped at the end
        dk = plan.pad(fk.new_zeros(fk.shape), True) if need_k else None
        dv = plan.pad(value.new_zeros(value.shape), True) if need_v else None
        dc = plan.pad(col.new_zeros(col.shape), False) if need_c else None
        for slot, (kt, vt, ct, dkt, dvt, dct) in plan.walk([kp, vp, cp, dk, dv, dc]):
            s, capped = _slot_scores(fq, kt, row, ct, plan.bias(rpb, slot), clamp, floor=ctx.run.floor)
            if norm == "sum":
                p = torch.exp(s - base)  # f / C from the saved log-sum-exp; 0 where the slot has no key
                ds = p * (torch.linalg.vecdot(dout, vt) - dsum)
            else:
                p = torch.exp(s)
                ds = p * torch.linalg.vecdot(dout, vt)
            if need_b:  # every query's edge in this slot reads the slot's one table entry
                db[(slice(None),) + plan.table_entry(slot)].add_(ds.reshape(b, n).sum(1))
            dlin = ds if capped is None else ds.masked_fill(capped, 0.0)
            if need_q:
                dq.addcmul_(dlin[..., None], kt)
            if need_v:
                dvt.addcmul_(p[..., None], dout)
            if need_k:
                dkt.addcmul_(dlin[..., None], fq)
            if need_c:
                dct.add_(dlin)
            if need_r:
                dr.add_(dlin)
        # crop the padding (it only ever received zeros from keys that do not exist)
        crop = lambda t: None if t is None else plan.crop(t)  # noqa: E731
        dk, dv, dc = crop(dk), crop(dv), crop(dc)
        shape = plan.shape
        reshaped = lambda t, s: None if t is None else t.reshape(s)  # noqa: E731
        return (dq, reshaped(dk, fk.shape), dr, reshaped(dc, None if col is None else col.shape),
                reshaped(db, None if rpb is None else rpb.shape), reshaped(dv, (b, *shape, -1)), None)


# ------------------------------------------------------------------------------------------------
# criss-cross: row and column parts as batched matrix products, one joint log-sum-exp
# ------------------------------------------------------------------------------------------------


def _cc_lin(qr: Tensor, kr: Tensor, qc: Tensor, kc: Tensor, row: Optional[Tensor], col: Optional[Tensor],
            clamp: Optional[float], floor: Optional[float] = None
            ) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Row scores (B, H, W, W') and column scores (B, W, H, H') from the row-major (B, H, W, d) and
    column-major (B, W, H, d) features, (flat top) their capped positions, and (cut-off) -inf below
    ``-floor``."""
    sr = qr @ kr.transpose(-1, -2)
    sc = qc @ kc.transpose(-1, -2)
    if row is not None:
        sr = sr + row[..., None]
        sc = sc + row.transpose(1, 2)[..., None]
    if col is not None:
        sr = sr + col[:, :, None, :]
        sc = sc + col.transpose(1, 2)[:, :, None, :]
    cr = cc = None
    if clamp is not None:
        sr, sc = sr + clamp, sc + clamp
        cr, cc = sr >= 0, sc >= 0
        sr, sc = sr.clamp_max(0.0), sc.clamp_max(0.0)
    if floor is not None:
        sr, sc = floor_scores(sr, floor), floor_scores(sc, floor)
    return sr, sc, cr, cc


def _both(t: Tensor) -> tuple[Tensor, Tensor]:
    """A (B, H, W, c) map in row-major and column-major (B, W, H, c) contiguous layouts: the batched
    products then read plain matrices (a strided operand makes CPU bmm copy it matrix by matrix)."""
    return t.contiguous(), t.transpose(1, 2).contiguous()


class _CrissCrossAggregate(torch.autograd.Function):
    """Forward: row and column score blocks, a joint log-sum-exp, two value products. Saves the
    normalised weights (N (H + W) per batch entry) for the backward's four products per part."""

    @staticmethod
    def forward(fq, fk, row, col, value, run: _GridRun):
        clamp, norm = run.clamp, run.norm
        (qr, qc), (kr, kc) = _both(fq), _both(fk)
        sr, sc, _, _ = _cc_lin(qr, kr, qc, kc, row, col, clamp, run.floor)
        # the column part without the query itself (h' = h): it is counted once, in the row part
        sc.diagonal(dim1=-2, dim2=-1).fill_(_NEG_INF)
        if norm == "sum":
            m = torch.maximum(sr.amax(-1), sc.amax(-1).transpose(1, 2))  # (B, H, W); finite (self in the row)
            if run.floor is not None:  # ... unless the cut-off drops the query's every key
                m = finite_or_zero(m)
            pr = sr.sub_(m[..., None]).exp_()
            pc = sc.sub_(m.transpose(1, 2)[..., None]).exp_()
            den = pr.sum(-1) + pc.sum(-1).transpose(1, 2)
            if run.floor is not None:
                den = torch.where(den > 0, den, torch.ones_like(den))
            pr = pr.div_(den[..., None])
            pc = pc.div_(den.transpose(1, 2)[..., None])
        else:
            pr, pc = sr.exp_(), sc.exp_()
        vr, vc = _both(value)
        out = (pr @ vr).add_((pc @ vc).transpose(1, 2))
        return out, pr, pc

    @staticmethod
    def setup_context(ctx, inputs, output):
        fq, fk, row, col, value, run = inputs
        out, pr, pc = output
        ctx.run = run
        ctx.mark_non_differentiable(pr, pc)
        ctx.save_for_backward(fq, fk, row, col, value, out, pr, pc)

    @staticmethod
    def backward(ctx, dout, _dpr, _dpc):
        fq, fk, row, col, value, out, pr, pc = ctx.saved_tensors
        clamp, norm = ctx.run.clamp, ctx.run.norm
        need_q, need_k, need_r, need_c, need_v = ctx.needs_input_grad[:5]
        dor, doc = _both(dout.to(value.dtype))
        dv = None
        if need_v:
            dv = (pr.transpose(-1, -2) @ dor).add_((pc.transpose(-1, -2) @ doc).transpose(1, 2))
        dq = dk = dr = dc = None
        if need_q or need_k or need_r or need_c:
            vr, vc = _both(value)
            dsr = dor @ vr.transpose(-1, -2)
            dsc = doc @ vc.transpose(-1, -2)
            if norm == "sum":
                dsum = (dor * out).sum(-1)
                dsr = dsr.sub_(dsum[..., None])
                dsc = dsc.sub_(dsum.transpose(1, 2)[..., None])
            dsr, dsc = dsr.mul_(pr), dsc.mul_(pc)
            (qr, qc), (kr, kc) = _both(fq), _both(fk)
            if clamp is not None:  # the flat top passes no gradient to the scores it caps
                _, _, cr, cc = _cc_lin(qr, kr, qc, kc, row, col, clamp)
                dsr, dsc = dsr.masked_fill_(cr, 0.0), dsc.masked_fill_(cc, 0.0)
            if need_q:
                dq = (dsr @ kr).add_((dsc @ kc).transpose(1, 2))
            if need_k:
                dk = (dsr.transpose(-1, -2) @ qr).add_((dsc.transpose(-1, -2) @ qc).transpose(1, 2))
            if need_r:
                dr = dsr.sum(-1) + dsc.sum(-1).transpose(1, 2)
            if need_c:
                dc = dsr.sum(-2) + dsc.sum(-2).transpose(1, 2)
        return dq, dk, dr, dc, dv, None


# ------------------------------------------------------------------------------------------------


def run(query: Tensor, key: Tensor, value: Tensor, affinity, graph) -> Tensor:
    p = lower(query, key, value, affinity, graph, dense_bias=False)
    lead, n, e = p.lead, p.n, p.e
    bsz = math.prod(lead)
    shape = graph.shape

    def grid(t: Optional[Tensor], channels: bool) -> Optional[Tensor]:
        """(lead..., N[, c]) -> (B, *shape[, c]); a view where the layout allows (no copy)."""
        if t is None:
            return None
        tail = (n, t.shape[-1]) if channels else (n,)
        t = t.expand(*lead, *tail)
        return t.reshape(bsz, *shape, *tail[1:])

    f = p.form
    fq, fk = grid(f.query, True), grid(f.key, True)
    row, col = grid(f.row, False), grid(f.col, False)
    v = grid(p.value, True)
    if graph.grid_pattern == "criss_cross":
        out = call(_CrissCrossAggregate, fq, fk, row, col, v, _GridRun(f.clamp, f.norm, floor=f.floor))[0]
    else:
        rpb = graph.rpb
        if rpb is not None:
            dims = len(shape)
            table = tuple(rpb.shape[rpb.dim() - dims:])
            rpb = rpb.to(p.value.dtype).expand(*lead, *table).reshape(bsz, *table)
        run = _GridRun(f.clamp, f.norm, _Plan(graph, query.device), f.floor)
        out = call(_WindowAggregate, fq, fk, row, col, rpb, v, run)[0]
    return out.reshape(*lead, n, e).to(query.dtype)
