"""Launching the ``triton`` backend's kernels: the typed launch record, the launch arguments, and the
autograd Functions (forward kernel; backward kernels as a Function of their own) with their vmap rules.

Triton itself is imported on the first launch (:func:`_kernels`): it binds its interpreter mode
(``TRITON_INTERPRET=1``) at import time.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import NamedTuple, Optional, Union, cast

import torch
from torch import Tensor

from ...graph import CrissCross, ExcludeSelf, Graph, Intersection, LocalWindow, Mask
from .._tiles import TileRun, tile_backward
from ..chunked import default_blocks
from ..common import Problem

__all__ = ["Launch"]


def _interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _kernels():
    """(forward, backward dK/dV/dcol, backward dQ/drow): imported on first use, so importing nlgraph
    never imports Triton (which binds its interpreter mode at import time)."""
    from . import kernels as k

    return k.fwd, k.bwd_kv, k.bwd_q


def _strides4(t: Optional[Tensor]) -> tuple[int, int, int, int]:
    """(batch-1, batch-2, row, column) strides of a (B1, B2, N|1, M|1) view; size-1 dims get stride 0."""
    if t is None:
        return (0, 0, 0, 0)
    s = [0 if t.shape[i] == 1 else t.stride(i) for i in range(4)]
    return s[0], s[1], s[2], s[3]


def _as4(t: Tensor, lead: tuple[int, ...]) -> Tensor:
    """View a (..., N|1, M|1) mask against the leading dims as (B1, B2, N|1, M|1): B2 = the last leading dim.

    Leading dims are only materialised when they cannot be merged into one stride."""
    lead = lead or (1,)
    t = t.reshape((1,) * (len(lead) + 2 - t.dim()) + tuple(t.shape))
    t = t.expand(*lead, *t.shape[-2:])
    return t.reshape(-1, lead[-1], *t.shape[-2:])


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, math.ceil(math.log2(max(1, x))))))


def _precision(dtype: torch.dtype) -> str:
    """fp32 dot products in IEEE fp32 unless torch itself allows TF32 matmuls (its default: it does not)."""
    if dtype == torch.float32 and not (_interpreting() or torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


class Launch(NamedTuple):
    """What the kernels read besides their tensor arguments: one typed record per call (folded for vmap).

    A named tuple, so torch.func's transforms see (and unwrap) the tensors in it as they do for the
    Functions' other arguments.

    Attributes:
        problem: the aggregation flattened to one batch dim (B, N, ...); its graph is the same edge set
            in the (B, N, M) layout, for the tile-recomputing backward of a float mask.
        blocks: (BLOCK_N, BLOCK_M) of the kernels.
        mask4: the bool masks combined, as an int8 (B1, B2, N|1, M|1) view (None: no mask).
        bias4_shape: the (B1, B2, N|1, M|1) shape of the float bias (None: no bias).
        b2: B2, the last leading dim (the masks' second batch stride).
        exclude_self: j != i is tested by index in the kernels.
        window: the local-window or criss-cross member, whose edges the kernels test from ``coords``
            (None: none).
        coords: (N, D) int32 grid coordinates of the window's nodes.
        plan: (row tiles, column tiles) int8 tile plan of the window (1 = the pair may hold edges).
        wparams: (D, 6) int32 per-axis window parameters (left, right reach, dilation, kernel size,
            shifted, extent) the kernels' window test reads (:func:`window_params`).
    """

    problem: Problem
    blocks: tuple[int, int]
    mask4: Optional[Tensor]
    bias4_shape: Optional[tuple[int, ...]]
    b2: int
    exclude_self: bool
    window: Optional[Graph]
    coords: Optional[Tensor]
    plan: Optional[Tensor]
    wparams: Optional[Tensor] = None

    def folded(self, batch: int) -> "Launch":
        """The launch for ``batch`` copies of the problem side by side in the batch dimension (vmap)."""
        p, mask4 = self.problem, self.mask4
        if mask4 is not None:  # the masks' first batch dim (b // B2) grows by the factor ``batch``
            mask4 = mask4.unsqueeze(0).expand(batch, *mask4.shape).reshape(batch * mask4.shape[0],
                                                                           *mask4.shape[1:])
        shape4 = self.bias4_shape
        return self._replace(mask4=mask4,
                             bias4_shape=None if shape4 is None else (batch * shape4[0], *shape4[1:]),
                             problem=replace(p, lead=(batch * p.lead[0],),
                                             graph=_flat_graph(self.exclude_self, self.window, mask4)))


def window_params(window: Union[LocalWindow, CrissCross], device: torch.device) -> Tensor:
    """(D, 6) int32: per axis (left reach, right reach, dilation, kernel size, shifted, extent), what
    the kernels' window test reads (the same predicate as ``LocalWindow._axis_edge``). A criss-cross
    graph is, per axis, a window of reach 0 (the same coordinate), the axes combined by OR."""
    if window.grid_pattern == "criss_cross":
        rows = [(0, 0, 1, 1, 0, extent) for extent in window.shape]
    else:
        win = cast(LocalWindow, window)  # grid_pattern "window": the LocalWindow attributes
        rows = [(lo, hi, t, k, int(win._shifted(a)), extent)
                for a, ((lo, hi), t, k, extent) in enumerate(zip(win.reach, win.dilation, win.kernel_size,
                                                                 win.shape, strict=True))]
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _shared_args(launch: Launch, fq: Tensor, fk: Tensor, value: Tensor, row: Optional[Tensor],
                 col: Optional[Tensor], bias: Optional[Tensor],
                 dummy: Tensor) -> tuple[list, list, list, dict]:
    """Launch arguments every kernel takes: (pointers Q K V R C MK BI CO PL, their strides, the mask/bias
    strides and sizes, constexprs); ``dummy`` stands in for absent tensors."""
    p = launch.problem
    mask4 = launch.mask4
    bias4 = bias.reshape(launch.bias4_shape) if bias is not None and launch.bias4_shape is not None else None
    coords, plan, wparams = launch.coords, launch.plan, launch.wparams
    ptrs = [fq, fk, value, row if row is not None else dummy, col if col is not None else dummy,
            mask4 if mask4 is not None else dummy, bias4 if bias4 is not None else dummy,
            coords if coords is not None else dummy, plan if plan is not None else dummy]
    strides = [fq.stride(0), fq.stride(1), fq.stride(2), fk.stride(0), fk.stride(1), fk.stride(2),
               value.stride(0), value.stride(1), value.stride(2),
               row.stride(0) if row is not None else 0, row.stride(1) if row is not None else 0,
               col.stride(0) if col is not None else 0, col.stride(1) if col is not None else 0]
    bn, bm = launch.blocks
    sizes = [*_strides4(mask4), *_strides4(bias4), p.n, p.m, fq.shape[-1], p.e, launch.b2,
             float(p.form.clamp or 0.0), float(p.form.floor or 0.0),
             wparams if wparams is not None else dummy, -(-p.m // bm)]
    flags = dict(HAS_ROW=row is not None, HAS_COL=col is not None, HAS_CLAMP=p.form.clamp is not None,
                 HAS_FLOOR=p.form.floor is not None,
                 EXCL_SELF=launch.exclude_self, HAS_MASK=mask4 is not None, HAS_BIAS=bias4 is not None,
                 WIN_DIMS=0 if coords is None else coords.shape[1],
                 WIN_ANY=launch.window is not None and launch.window.grid_pattern == "criss_cross",
                 HAS_PLAN=plan is not None,
                 NORM_SUM=p.form.norm == "sum",
                 # Triton's CPU interpreter computes bf16 dot products wrongly (numpy has no bf16):
                 # upcast there
                 DOT_FP32=_interpreting() and fq.dtype == torch.bfloat16, PREC=_precision(fq.dtype),
                 BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=_pow2(fq.shape[-1], 16, 64), BLOCK_E=_pow2(p.e, 16, 64))
    return ptrs, strides, sizes, flags


def _flat_graph(exclude_self: bool, window: Optional[Graph],
                mask4: Optional[Tensor]) -> Optional[Graph]:
    """The graph in the flattened (B, N, M) layout, for the tile-recomputing backward of a float mask."""
    parts = ([ExcludeSelf()] if exclude_self else []) + ([window] if window is not None else []) + (
        [Mask(mask4.reshape(-1, *mask4.shape[-2:]).bool())] if mask4 is not None else [])
    return None if not parts else parts[0] if len(parts) == 1 else Intersection(parts)


def _fold(batch: int, in_dims, tensors) -> list[Optional[Tensor]]:
    """vmap support: fold the vmapped dimension into the kernels' batch, (V, B, ...) -> (V * B, ...).

    Every tensor the kernels take leads with the batch B; an input that is not vmapped is repeated."""
    out: list[Optional[Tensor]] = []
    for t, dim in zip(tensors, in_dims, strict=True):
        if t is None:
            out.append(None)
            continue
        t = t.movedim(dim, 0) if dim is not None else t.expand(batch, *t.shape)
        out.append(t.reshape(batch * t.shape[1], *t.shape[2:]))
    return out


def _unfold(batch: int, tensors) -> tuple:
    return tuple(None if t is None else t.reshape(batch, t.shape[0] // batch, *t.shape[1:]) for t in tensors)


class _TritonAggregate(torch.autograd.Function):
    """Forward kernel; backward through :class:`_TritonBackward` (FlashAttention-2 style: score tiles
    recomputed from the saved log-sum-exp; one kernel per key block for dK / dV / dcol, one per query
    block for dQ / drow).

    torch.func: ``setup_context`` is separate from ``forward``; the vmap rule folds the vmapped
    dimension into the kernels' batch (one launch), and the backward is a Function with the same
    rule, so ``vmap``, ``grad``, ``vjp`` and ``jacrev`` run the kernels. Returns (out, log-sum-exp).
    """

    @staticmethod
    def forward(fq, fk, row, col, bias, value, launch: Launch):
        import triton

        fwd, _, _ = _kernels()
        p = launch.problem
        b, n = fq.shape[0], p.n
        out = torch.empty(b, n, p.e, dtype=torch.float32, device=fq.device)
        stat = torch.empty(b, n, dtype=torch.float32, device=fq.device)
        ptrs, strides, sizes, flags = _shared_args(launch, fq, fk, value, row, col, bias, out)
        grid = (triton.cdiv(n, flags["BLOCK_N"]), b, triton.cdiv(p.e, flags["BLOCK_E"]))
        fwd[grid](*ptrs, out, stat, *strides, out.stride(0), out.stride(1), out.stride(2),
                  stat.stride(0), stat.stride(1), *sizes, **flags)
        return out.to(value.dtype), stat  # the log-sum-exp stays fp32

    @staticmethod
    def setup_context(ctx, inputs, output):
        fq, fk, row, col, bias, value, launch = inputs
        out, stat = output
        ctx.launch = launch
        if launch.problem.form.norm != "sum":
            ctx.mark_non_differentiable(stat)  # C = 1: 0 or -inf, a constant
        ctx.save_for_backward(fq, fk, row, col, bias, value, out, stat)

    @staticmethod
    def vmap(info, in_dims, fq, fk, row, col, bias, value, launch):
        folded = _fold(info.batch_size, in_dims[:6], (fq, fk, row, col, bias, value))
        out, stat = _TritonAggregate.apply(*folded, launch.folded(info.batch_size))
        return _unfold(info.batch_size, (out, stat)), (0, 0)

    @staticmethod
    def backward(ctx, dout, dstat):
        fq, fk, row, col, bias, value, out, stat = ctx.saved_tensors
        if dstat is None or ctx.launch.problem.form.norm != "sum":
            dstat = torch.zeros_like(stat)
        grads = _TritonBackward.apply(fq, fk, row, col, bias, value, out, stat, dout, dstat, ctx.launch,
                                      tuple(ctx.needs_input_grad[:6]))
        return tuple(grads) + (None,)


class _TritonBackward(torch.autograd.Function):
    """The backward kernels as a Function of their own, so that torch.func can vmap them (jacrev).

    Returns the gradients of (fq, fk, row, col, bias, value), None where not needed. Not
    differentiable again (the kernels have no double backward)."""

    @staticmethod
    def forward(fq, fk, row, col, bias, value, out, stat, dout, dstat, launch: Launch, needs):
        import triton

        _, bwd_kv, bwd_q = _kernels()
        need_q, need_k, need_r, need_c, need_b, need_v = needs
        p = launch.problem
        b, n, m, d, e = fq.shape[0], p.n, p.m, fq.shape[-1], p.e
        dout = dout.to(value.dtype)
        # D_i = dO_i . O_i - dlse_i (softmax normalisation); unused for C = 1
        delta = ((dout.float() * out.float()).sum(-1) - dstat.float() if p.form.norm == "sum"
                 else torch.zeros(b, n, dtype=torch.float32, device=fq.device)).contiguous()
        f32 = lambda *s, need=True: torch.empty(*s, dtype=torch.float32, device=fq.device) if need else delta  # noqa
        dq, dk, dv = f32(b, n, d, need=need_q), f32(b, m, d, need=need_k), f32(b, m, e, need=need_v)
        dr, dc = f32(b, n, need=need_r), f32(b, m, need=need_c)
        ptrs, strides, sizes, flags = _shared_args(launch, fq, fk, value, row, col, bias, delta)
        bn, bm, bd, be = flags["BLOCK_N"], flags["BLOCK_M"], flags["BLOCK_D"], flags["BLOCK_E"]
        dstrides = [dout.stride(0), dout.stride(1), dout.stride(2)]
        common = (*ptrs, dout, stat, delta)
        n_d = triton.cdiv(d, bd) if need_k else 0
        n_e = triton.cdiv(e, be) if need_v else 0
        n_c = 1 if need_c else 0
        if max(n_d, n_e, n_c):
            bwd_kv[(triton.cdiv(m, bm), b, max(n_d, n_e, n_c))](
                *common, dk, dv, dc, *strides, *dstrides, *sizes, n_d, n_e, n_c, **flags)
        n_q = triton.cdiv(d, bd) if need_q else 0
        n_r = 1 if need_r else 0
        if max(n_q, n_r):
            bwd_q[(triton.cdiv(n, bn), b, max(n_q, n_r))](
                *common, dq, dr, *strides, *dstrides, *sizes, n_q, n_r, **flags)
        db = None
        if need_b:  # a float mask's gradient is itself N x M: the PyTorch tile loop computes it
            cast = lambda t: None if t is None else t.to(torch.float32)  # noqa: E731
            q32, k32, r32, c32, v32 = cast(fq), cast(fk), cast(row), cast(col), cast(value)
            # the tile loop binds the fp32 tensors itself
            tiles = TileRun(p, default_blocks(b, n, m, complete=p.graph is None))
            only_bias = (False, False, False, False, True, False)
            db = tile_backward(tiles, only_bias, q32, k32, r32, c32, bias, v32, cast(out), stat,
                               dout.to(torch.float32), dstat.to(torch.float32))[4]
        grads = (dq if need_q else None, dk if need_k else None, dr if need_r else None,
                 dc if need_c else None, db, dv if need_v else None)
        like = (fq, fk, row, col, bias, value)
        return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, like, strict=True))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, fq, fk, row, col, bias, value, out, stat, dout, dstat, launch, needs):
        folded = _fold(info.batch_size, in_dims[:10], (fq, fk, row, col, bias, value, out, stat, dout, dstat))
        grads = _TritonBackward.apply(*folded, launch.folded(info.batch_size), needs)
        return _unfold(info.batch_size, grads), tuple(None if g is None else 0 for g in grads)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("the triton backend's backward kernels are not differentiable again (no double "
                           "backward); use backend='chunked' or 'reference' for higher-order gradients")


