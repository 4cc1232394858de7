"""The ``triton`` backend: fused flash-style forward and backward kernels.

One kernel serves every exp-kernel affinity of the canonical form (``Softmax``; ``Gaussian`` with
C = sum f or C = 1, with or without a flat top) on the complete graph, with ``ExcludeSelf`` (by
index), with dense bool / float masks (SDPA semantics; read through broadcast strides, so a
(B, 1, 1, M) padding mask is never expanded to (B, H, N, M)) and with a local window computed
from the nodes' grid coordinates (every ``LocalWindow`` option -- kernel size, dilation, causal axes,
NATTEN's ``"shift"`` border -- but the relative position bias, which would be a dense N x M bias --
and CCNet's ``CrissCross``: the same row or column),
whole key blocks outside it skipped by a precomputed tile plan:

    s_ij = q'_i . k'_j + r_i + c_j          (the row/column-bias form of nlgraph.affinity)

Each program owns a block of queries and a block of value channels, walks the keys block by block
with an online (running-max) softmax, and never materialises N x M. The feature dimension d and the
value dimension e are tiled inside the kernel (BLOCK_D / BLOCK_E chunks), so head dims of 1024 and
more work (a non-local block's inter-channels). Accumulation is fp32 for fp16/bf16/fp32 inputs (fp32
dot products in IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32`` is set).

Backward is FlashAttention-2 style: the forward saves the log-sum-exp per query (C = 1: nothing is
needed), the backward recomputes score tiles from it. One kernel per key block accumulates dV = P^T dO
and dK = dS^T Q' (one value / feature chunk per program) and the column-bias gradient; one kernel
per query block accumulates dQ = dS K' and the row-bias gradient, with dS = P (dO V^T - dO.O) (C = 1:
P dO V^T) and zero where the flat top caps the score. Only a float mask's own gradient (an N x M
tensor anyway) is left to the PyTorch tile loop (:func:`nlgraph.backends._tiles.tile_backward`).

With ``return_lse`` the saved log-sum-exp is returned as well (plus the normalised Gaussian's
dropped row term; C = 1 stores 0 or -inf, whether a query has a neighbour); its gradient enters the
backward kernels through D_i = dO_i . O_i - dlse_i (d lse_i / d s_ij = P_ij), no kernel change.

torch.func (vmap, grad, vjp, jacrev) runs the same kernels: the vmapped dimension is folded into
the kernels' batch. Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` Triton's interpreter runs it on
the CPU (how the test suite checks it on machines without a GPU; there bf16 dot operands are upcast to
fp32, since the interpreter's bf16 ``tl.dot`` is wrong). Automatic dispatch takes it for CUDA tensors only.
Not in this backend (they run on other backends): k-NN and edge-list graphs, edge weights, dropout,
and single batches of 2^31 elements or more. Criss-cross runs in it when forced; automatic dispatch
sends it to ``grid`` (see :func:`prefer`).

The package keeps three rooms: this module is the glue the dispatch registers (``can_run``,
``prefer``, ``run``: which cases the kernels take and how a case is laid out for them),
:mod:`~nlgraph.backends.triton.launch` the typed launch record, the launches and their autograd
Functions, and :mod:`~nlgraph.backends.triton.kernels` the Triton kernels themselves. Triton is
imported on the first launch only, so ``import nlgraph`` works without it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from ..._optional import missing, optional
from ...affinity import Gaussian, Softmax
from .._tiles import spans
from ..common import Problem
from .launch import Launch, _as4, _flat_graph, _interpreting, _TritonAggregate, window_params

__all__ = ["can_run", "prefer", "run", "RETURNS_LSE"]

RETURNS_LSE = True

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _members(graph) -> tuple:
    return () if graph is None else graph.members()


def _is_window(g) -> bool:
    """A window or criss-cross graph on the grid (the kernels test its edges from the nodes'
    coordinates)."""
    return g.grid_pattern in ("window", "criss_cross")


def can_run(query, key, value, affinity, graph) -> tuple[bool, str]:
    # the device test comes first: triton is imported only where it can run (and Triton binds its
    # interpreter mode at import, so a CPU process must not import it before TRITON_INTERPRET is set)
    if query.device.type != "cuda" and not _interpreting():
        return False, (f"triton runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), got "
                       f"{query.device}")
    if optional("triton") is None:
        return False, missing("triton")
    if query.dtype not in _DTYPES:
        return False, f"triton kernels take float16, bfloat16 or float32, got {query.dtype}"
    if type(affinity) not in (Softmax, Gaussian):
        return False, (f"the triton kernel fuses exp-kernel affinities (Softmax, Gaussian), not "
                       f"{affinity!r}")
    members = _members(graph)
    if not all(g.excludes_self or g.attn_mask is not None or _is_window(g) for g in members) or sum(
            _is_window(g) for g in members) > 1:
        return False, (f"the triton kernel handles the complete graph, ExcludeSelf, dense masks and one "
                       f"local window or criss-cross graph so far, not {graph!r}")
    for g in members:
        if _is_window(g) and getattr(g, "rpb", None) is not None:
            return False, (f"the triton kernel's window takes every option but a relative position bias "
                           f"(it would be a dense N x M float bias); {g!r} runs on grid, chunked or pyg")
    n, m, d, e = query.shape[-2], key.shape[-2], query.shape[-1], value.shape[-1]
    dense = any(g.attn_mask is not None for g in members)
    per_batch = max(n * d, m * d, m * e, n * e, n * m if dense else 0)
    if per_batch >= 2**31:  # in-batch offsets are 32-bit in the kernels
        return False, (f"the triton kernels index one batch element with 32-bit offsets; N={n}, M={m}, "
                       f"d={d}, e={e} needs {per_batch} elements")
    return True, ""


def prefer(query, key, value, affinity, graph) -> bool:
    """On CUDA, but not criss-cross: its tile plan keeps every key tile that shares a column with the
    query tile (about H of the N / BLOCK_M), so the kernel does O(N^2 d) work where the grid backend's
    row and column products do O(N (H + W) d); forced (``backend="triton"``) it runs."""
    if any(g.grid_pattern == "criss_cross" for g in _members(graph)):
        return False
    return query.device.type == "cuda"



def run(query: Tensor, key: Tensor, value: Tensor, affinity, graph, *, block_n: Optional[int] = None,
        block_m: Optional[int] = None, return_lse: bool = False):
    """Lower to the canonical form, flatten the batch, run the kernel (backward: tile recomputation)."""
    for name, val in (("block_n", block_n), ("block_m", block_m)):
        if val is not None and (not isinstance(val, int) or val < 16 or val & (val - 1)):
            raise ValueError(f"triton option {name} must be a power of two >= 16, got {val!r}")
    lead = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
    bsz = math.prod(lead)
    n, m, e = query.shape[-2], key.shape[-2], value.shape[-1]
    # the canonical form in the input dtype (fp16/bf16 feed tl.dot; it accumulates in fp32)
    form = affinity.form(query, key)

    def flat(t: Tensor, shape: tuple[int, ...]) -> Tensor:
        return t.expand(*lead, *shape).reshape(bsz, *shape).contiguous()

    # Softmax's and Gaussian's forms have features q', k' (can_run admits no other affinity)
    assert form.query is not None and form.key is not None
    fq = flat(form.query, (n, form.query.shape[-1]))
    fk = flat(form.key, (m, form.key.shape[-1]))
    row = None if form.row is None else flat(form.row, (n,))
    col = None if form.col is None else flat(form.col, (m,))
    v = flat(value, (m, e))
    flat_form = replace(form, query=fq, key=fk, row=row, col=col)
    members = _members(graph)
    exclude_self = any(g.excludes_self for g in members)
    mask = None
    for g in members:
        if g.attn_mask is not None and g.attn_mask.dtype == torch.bool:
            mask = g.attn_mask if mask is None else mask & g.attn_mask
    mask4 = None if mask is None else _as4(mask.to(torch.int8), lead)
    bias = graph.dense_bias() if graph is not None else None
    bias_dtype = fq.dtype if fq.dtype != torch.float64 else torch.float32
    bias4 = None if bias is None else _as4(bias.to(bias_dtype), lead)
    window = next((g for g in members if _is_window(g)), None)
    bn, bm = block_n or 64, block_m or 64
    coords = plan = wparams = None
    if window is not None:
        coords = window.coords(fq.device).contiguous()
        wparams = window_params(window, fq.device)
        pairs = window.tile_pairs(spans(n, bn), spans(m, bm), fq.device)
        plan = None if pairs is None else pairs.to(torch.int8).contiguous()
    # the tile-recomputing backward sees the same graph and bias in the flattened (B, N, M) layout
    flat_graph = None if graph is None else _flat_graph(exclude_self, window, mask4)
    bias_flat = None if bias4 is None else bias4.reshape(-1, *bias4.shape[-2:])
    problem = Problem(flat_form, v, bias_flat, flat_graph, (bsz,), n, m, e)
    launch = Launch(problem, (bn, bm), mask4, None if bias4 is None else tuple(bias4.shape),
                    (lead or (1,))[-1], exclude_self, window, coords, plan, wparams)
    out, stat = _TritonAggregate.apply(fq, fk, row, col, bias_flat, v, launch)
    if not return_lse:
        return out.reshape(*lead, n, e)
    lse = stat.reshape(*lead, n)
    if form.lse_row is not None:
        lse = lse + form.lse_row.float()
    return out.reshape(*lead, n, e), lse

