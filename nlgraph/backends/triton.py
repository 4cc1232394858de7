"""The ``triton`` backend: a fused flash-style forward kernel; backward by tile recomputation.

One kernel serves every exp-kernel affinity of the canonical form (``Softmax``; ``Gaussian`` with
C = sum f or C = 1, with or without a flat top) on the complete graph, with ``ExcludeSelf`` (by
index), with dense bool / float masks (SDPA semantics; read through broadcast strides, so a
(B, 1, 1, M) padding mask is never expanded to (B, H, N, M)) and with a local window computed
from the nodes' grid coordinates, whole key blocks outside it skipped by a precomputed tile plan:

    s_ij = q'_i . k'_j + r_i + c_j          (the row/column-bias form of nlgraph.affinity)

Each program owns a block of queries and a block of value channels, walks the keys block by block
with an online (running-max) softmax, and never materialises N x M. The feature dimension d and the
value dimension e are tiled inside the kernel (BLOCK_D / BLOCK_E chunks), so head dims of 1024 and
more work (a non-local block's inter-channels). Accumulation is fp32 for fp16/bf16/fp32 inputs. The
kernel saves the log-sum-exp per query; the backward pass recomputes tiles from it with the
chunked backend's tile loop (``chunked.tile_backward``), in PyTorch ops on the same device.

Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` Triton's interpreter runs it on the CPU (how the
test suite checks it on machines without a GPU; there bf16 dot operands are upcast to fp32, since
the interpreter's bf16 ``tl.dot`` is wrong). Automatic dispatch takes it for CUDA tensors only.
Not yet in this backend (they run on other backends): criss-cross, k-NN and edge-list graphs, edge
weights, Triton backward kernels, dropout.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from .._optional import missing, optional
from ..affinity import Gaussian, Softmax
from ..graph import ExcludeSelf, Intersection, LocalWindow, Mask
from .chunked import default_blocks, tile_backward
from .common import Problem

__all__ = ["can_run", "prefer", "run"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def can_run(query, key, value, affinity, graph) -> tuple[bool, str]:
    # the device test comes first: triton is imported only where it can run (and Triton binds its
    # interpreter mode at import, so a CPU process must not import it before TRITON_INTERPRET is set)
    if query.device.type != "cuda" and not _interpreting():
        return False, f"triton runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), got {query.device}"
    if optional("triton") is None:
        return False, missing("triton")
    if query.dtype not in _DTYPES:
        return False, f"triton kernels take float16, bfloat16 or float32, got {query.dtype}"
    if type(affinity) not in (Softmax, Gaussian):
        return False, f"the triton kernel fuses exp-kernel affinities (Softmax, Gaussian), not {affinity!r}"
    members = [] if graph is None else (graph.graphs if isinstance(graph, Intersection) else [graph])
    if not all(isinstance(g, (ExcludeSelf, Mask, LocalWindow)) for g in members) or sum(
            isinstance(g, LocalWindow) for g in members) > 1:
        return False, (f"the triton kernel handles the complete graph, ExcludeSelf, dense masks and one local "
                       f"window so far, not {graph!r}")
    return True, ""


def prefer(query, key, value, affinity, graph) -> bool:
    return query.device.type == "cuda"


_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(Q, K, V, R, C, O, L, MK, BI, CO, PL,
            sqb, sqn, sqd, skb, skm, skd, svb, svm, sve, srb, srn, scb, scm, sob, son, soe, slb, sln,
            smb1, smb2, smn, smm, sbb1, sbb2, sbn, sbm,
            N, M, D, E, B2, clamp, rad0, rad1, rad2, n_kblocks,
            HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, HAS_CLAMP: tl.constexpr, EXCL_SELF: tl.constexpr,
            HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, WIN_DIMS: tl.constexpr, HAS_PLAN: tl.constexpr,
            NORM_SUM: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
        pid_n = tl.program_id(0)
        b = tl.program_id(1)
        pid_e = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < N
        e_ok = offs_e < E
        m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_N], tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
        if HAS_ROW:
            row = tl.load(R + b * srb + offs_n * srn, mask=n_ok, other=0.0).to(tl.float32)
        for j0 in range(0, M, BLOCK_M):
          take = True
          if HAS_PLAN:  # block-sparse graph: skip key blocks the plan rules out
              take = tl.load(PL + pid_n * n_kblocks + j0 // BLOCK_M) != 0
          if take:
            offs_m = j0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            s = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for d0 in range(0, D, BLOCK_D):  # the feature dimension, tiled
                dd = d0 + offs_d
                d_ok = dd < D
                q = tl.load(Q + b * sqb + offs_n[:, None] * sqn + dd[None, :] * sqd,
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                k = tl.load(K + b * skb + offs_m[:, None] * skm + dd[None, :] * skd,
                            mask=m_ok[:, None] & d_ok[None, :], other=0.0)
                if DOT_FP32:
                    q = q.to(tl.float32)
                    k = k.to(tl.float32)
                s += tl.dot(q, tl.trans(k), out_dtype=tl.float32)
            if HAS_ROW:
                s += row[:, None]
            if HAS_COL:
                s += tl.load(C + b * scb + offs_m * scm, mask=m_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_CLAMP:
                s = tl.minimum(s + clamp, 0.0)
            valid = n_ok[:, None] & m_ok[None, :]
            if EXCL_SELF:
                valid = valid & (offs_n[:, None] != offs_m[None, :])
            if WIN_DIMS > 0:  # local window from the nodes' grid coordinates (int32, node order)
                for ax in tl.static_range(WIN_DIMS):
                    rad = rad0 if ax == 0 else (rad1 if ax == 1 else rad2)
                    cq = tl.load(CO + offs_n * WIN_DIMS + ax, mask=n_ok, other=0)
                    ck = tl.load(CO + offs_m * WIN_DIMS + ax, mask=m_ok, other=0)
                    diff = cq[:, None] - ck[None, :]
                    valid = valid & (diff <= rad) & (diff >= -rad)
            # dense masks are read through two batch strides (e.g. a (B, 1, 1, M) padding mask under
            # (B, H) leading dims) and per-row/column strides that may be 0 (broadcast)
            b1 = b // B2
            b2 = b % B2
            if HAS_MASK:
                mk = tl.load(MK + b1 * smb1 + b2 * smb2 + offs_n[:, None] * smn + offs_m[None, :] * smm,
                             mask=valid, other=0)
                valid = valid & (mk != 0)
            if HAS_BIAS:
                s += tl.load(BI + b1 * sbb1 + b2 * sbb2 + offs_n[:, None] * sbn + offs_m[None, :] * sbm,
                             mask=valid, other=0.0).to(tl.float32)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * svb + offs_m[:, None] * svm + offs_e[None, :] * sve,
                        mask=m_ok[:, None] & e_ok[None, :], other=0.0)
            if DOT_FP32:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), out_dtype=tl.float32)
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
            m_i = m_new
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        if NORM_SUM:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            stat = tl.where(l_i > 0, m_safe + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        else:
            out = acc * tl.exp(m_safe)[:, None]
            stat = m_safe
        tl.store(O + b * sob + offs_n[:, None] * son + offs_e[None, :] * soe, out, mask=n_ok[:, None] & e_ok[None, :])
        if pid_e == 0:
            tl.store(L + b * slb + offs_n * sln, stat, mask=n_ok)

    _KERNEL = fwd
    return fwd


def _strides4(t: Optional[Tensor]) -> tuple[int, int, int, int]:
    """(batch-1, batch-2, row, column) strides of a (B1, B2, N|1, M|1) view; size-1 dims get stride 0."""
    if t is None:
        return (0, 0, 0, 0)
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(4))


def _as4(t: Tensor, lead: tuple[int, ...]) -> Tensor:
    """View a (..., N|1, M|1) mask against the leading dims as (B1, B2, N|1, M|1): B2 = the last leading dim.

    Leading dims are only materialised when they cannot be merged into one stride."""
    lead = lead or (1,)
    t = t.reshape((1,) * (len(lead) + 2 - t.dim()) + tuple(t.shape))
    t = t.expand(*lead, *t.shape[-2:])
    return t.reshape(-1, lead[-1], *t.shape[-2:])


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, math.ceil(math.log2(max(1, x))))))


class _TritonAggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fq, fk, row, col, bias, value, meta):
        import triton

        p = meta["problem"]
        b, n, m, d, e = fq.shape[0], p.n, p.m, fq.shape[-1], p.e
        out = torch.empty(b, n, e, dtype=torch.float32, device=fq.device)
        stat = torch.empty(b, n, dtype=torch.float32, device=fq.device)
        bn, bm = meta["kernel_blocks"]
        bd, be = _pow2(d, 16, 64), _pow2(e, 16, 64)
        dummy = out  # unused pointer for absent row/col terms
        r = row if row is not None else dummy
        c = col if col is not None else dummy
        grid = (triton.cdiv(n, bn), b, triton.cdiv(e, be))
        mask4, bias4 = meta["mask4"], bias.reshape(meta["bias4_shape"]) if bias is not None else None
        coords, plan = meta["coords"], meta["plan"]
        radius = tuple(meta["radius"]) + (0,) * (3 - len(meta["radius"]))
        _kernel()[grid](
            fq, fk, value, r, c, out, stat,
            mask4 if mask4 is not None else out, bias4 if bias4 is not None else out,
            coords if coords is not None else out, plan if plan is not None else out,
            fq.stride(0), fq.stride(1), fq.stride(2), fk.stride(0), fk.stride(1), fk.stride(2),
            value.stride(0), value.stride(1), value.stride(2),
            r.stride(0) if row is not None else 0, r.stride(1) if row is not None else 0,
            c.stride(0) if col is not None else 0, c.stride(1) if col is not None else 0,
            out.stride(0), out.stride(1), out.stride(2), stat.stride(0), stat.stride(1),
            *(_strides4(mask4)), *(_strides4(bias4)),
            n, m, d, e, meta["b2"], float(p.form.clamp or 0.0), *radius, triton.cdiv(m, bm),
            HAS_ROW=row is not None, HAS_COL=col is not None, HAS_CLAMP=p.form.clamp is not None,
            EXCL_SELF=meta["exclude_self"], HAS_MASK=mask4 is not None, HAS_BIAS=bias4 is not None,
            WIN_DIMS=0 if coords is None else coords.shape[1], HAS_PLAN=plan is not None,
            NORM_SUM=p.form.norm == "sum",
            # Triton's CPU interpreter computes bf16 dot products wrongly (numpy has no bf16): upcast there
            DOT_FP32=_interpreting() and fq.dtype == torch.bfloat16,
            BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, BLOCK_E=be)
        out = out.to(value.dtype)
        ctx.meta = meta
        ctx.save_for_backward(fq, fk, row, col, bias, value, out, stat)  # the log-sum-exp stays fp32
        return out

    @staticmethod
    def backward(ctx, dout):
        fq, fk, row, col, bias, value, out, stat = ctx.saved_tensors
        p = ctx.meta["problem"]
        cast = lambda t: None if t is None else t.to(torch.float32)  # noqa: E731  (recompute tiles in fp32)
        q32, k32, r32, c32, v32 = cast(fq), cast(fk), cast(row), cast(col), cast(value)
        p32 = replace(p, form=replace(p.form, query=q32, key=k32, row=r32, col=c32), value=v32)
        meta = dict(ctx.meta, problem=p32, blocks=default_blocks(fq.shape[0], p.n, p.m), dropout_p=0.0)
        grads = tile_backward(meta, ctx.needs_input_grad[:6], q32, k32, r32, c32, bias, v32, cast(out), stat,
                              dout.to(torch.float32))
        like = (fq, fk, row, col, bias, value)
        return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, like)) + (None,)


def run(query: Tensor, key: Tensor, value: Tensor, affinity, graph, *, block_n: Optional[int] = None,
        block_m: Optional[int] = None) -> Tensor:
    """Lower to the canonical form, flatten the batch, run the kernel (backward: tile recomputation)."""
    for name, val in (("block_n", block_n), ("block_m", block_m)):
        if val is not None and (not isinstance(val, int) or val < 16 or val & (val - 1)):
            raise ValueError(f"triton option {name} must be a power of two >= 16, got {val!r}")
    lead = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
    bsz = math.prod(lead)
    n, m, e = query.shape[-2], key.shape[-2], value.shape[-1]
    # the canonical form in the input dtype (fp16/bf16 feed tl.dot; it accumulates in fp32)
    form = affinity.form(query, key)
    flat = lambda t, shape: None if t is None else t.expand(*lead, *shape).reshape(bsz, *shape).contiguous()  # noqa
    fq = flat(form.query, (n, form.query.shape[-1]))
    fk = flat(form.key, (m, form.key.shape[-1]))
    row = flat(form.row, (n,))
    col = flat(form.col, (m,))
    v = flat(value, (m, e))
    flat_form = replace(form, query=fq, key=fk, row=row, col=col)
    members = [] if graph is None else (graph.graphs if isinstance(graph, Intersection) else [graph])
    exclude_self = any(isinstance(g, ExcludeSelf) for g in members)
    mask = None
    for g in members:
        if isinstance(g, Mask) and g.mask.dtype == torch.bool:
            mask = g.mask if mask is None else mask & g.mask
    mask4 = None if mask is None else _as4(mask.to(torch.int8), lead)
    bias = graph.dense_bias() if graph is not None else None
    bias4 = None if bias is None else _as4(bias.to(fq.dtype if fq.dtype != torch.float64 else torch.float32), lead)
    window = next((g for g in members if isinstance(g, LocalWindow)), None)
    bn, bm = block_n or 64, block_m or 64
    coords = plan = None
    if window is not None:
        coords = window.coords(fq.device).contiguous()
        rows = [(i, min(n, i + bn)) for i in range(0, n, bn)]
        cols = [(j, min(m, j + bm)) for j in range(0, m, bm)]
        plan = window.tile_pairs(rows, cols, fq.device).to(torch.int8).contiguous()
    # the tile-recomputing backward sees the same graph and bias in the flattened (B, N, M) layout
    flat_graph = None
    if graph is not None:
        parts = ([ExcludeSelf()] if exclude_self else []) + ([window] if window is not None else []) + (
            [Mask(mask4.reshape(-1, *mask4.shape[-2:]).bool())] if mask4 is not None else [])
        flat_graph = None if not parts else parts[0] if len(parts) == 1 else Intersection(parts)
    bias_flat = None if bias4 is None else bias4.reshape(-1, *bias4.shape[-2:])
    problem = Problem(flat_form, v, bias_flat, flat_graph, (bsz,), n, m, e)
    meta = {"problem": problem, "kernel_blocks": (bn, bm), "mask4": mask4, "coords": coords, "plan": plan,
            "radius": () if window is None else window.radius,
            "bias4_shape": None if bias4 is None else tuple(bias4.shape), "b2": (lead or (1,))[-1],
            "exclude_self": exclude_self}
    out = _TritonAggregate.apply(fq, fk, row, col, bias_flat, v, meta)
    return out.reshape(*lead, n, e)
