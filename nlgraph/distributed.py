"""The core op over a sequence sharded across processes, on ``torch.distributed`` itself.

Each rank holds a contiguous shard of the nodes: rows ``[q0, q1)`` of the queries and ``[k0, k1)`` of
the keys/values (dim -2, in rank order; shards may differ in size, one may be empty) and gets its
shard of ``y``. Graphs and affinities are the single-process ones, in *global* node indices: a
``Mask`` is the global (..., N, M) mask (each rank reads its rows), ``ExcludeSelf`` compares global
indices, a ``LocalWindow`` is the whole grid. The result is the single-process op's, forward and
backward: each rank's gradients w.r.t. its shards are its slice of the full gradients (parameters
shared by every rank, e.g. a trainable bias, receive per-rank partial sums: all-reduce them, as DDP does).

Which keys a rank needs comes from the graph (:meth:`nlgraph.graph.Graph.tile_pairs`), at the
granularity of one grid row for grid graphs (whole shards otherwise): on the complete graph every
rank needs every key; with a ``LocalWindow`` and shards of whole rows along the first grid axis a
rank needs only the ``radius`` rows on either side (the halo), so the bytes sent scale with the
radius, not with N.

Methods:
    ``"ring"``: when every rank needs every key block, the blocks travel around the ring with
        overlapped ``isend``/``irecv`` (the next block is in flight while the current one is
        aggregated); the partial results are combined exactly with :func:`nlgraph.merge` (log-sum-exp
        for softmax-normalised affinities, counts and sums otherwise). Memory O(local) in training
        too: the backward sends the blocks around the ring again, recomputes each block's part and
        returns each block's key/value gradient to its owner (ring attention's backward), so only
        this rank's shards, y and its lse are kept.
    ``"allgather"``: every rank receives all the keys it needs at once and runs one local op:
        simpler, one call, O(M) memory.
    Either way, when the graph is sparse across shards (a rank needs only some blocks, or only a
    halo of one), exactly the needed rows are sent point to point.

The transport is ``torch.distributed`` (gloo on CPU, NCCL on GPUs); nothing else. See the README
section "Scale-out" for launching with ``torchrun`` and how this relates to torch's
``context_parallel`` (which covers SDPA only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from .affinity import Affinity, Softmax
from .graph import Block, Graph

__all__ = ["aggregate", "all_reduce_sum", "global_sizes", "shard_sizes", "shard_slice", "ExchangeStats",
           "last_exchange"]

_METHODS = ("ring", "allgather")


@dataclass(frozen=True)
class ExchangeStats:
    """Bytes this rank sent in the last :func:`aggregate` forward (key and value rows)."""

    method: str
    bytes_sent: int
    blocks_sent: int


_LAST: dict[str, ExchangeStats] = {}


def last_exchange() -> Optional[ExchangeStats]:
    """What the last forward on this process sent (for benchmarks and traffic tests)."""
    return _LAST.get("last")


def shard_sizes(total: int, world_size: int) -> list[int]:
    """Sizes of ``world_size`` contiguous near-equal shards of ``total`` nodes (the first ones larger)."""
    if world_size < 1 or total < 0:
        raise ValueError(f"shard_sizes needs total >= 0 and world_size >= 1, got {total}, {world_size}")
    base, extra = divmod(total, world_size)
    return [base + (r < extra) for r in range(world_size)]


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.detach().clone().contiguous()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def all_reduce_sum(tensor: Tensor, group: Optional[Any] = None) -> Tensor:
    """Differentiable sum of ``tensor`` over the ranks of ``group`` (every rank gets the sum; the
    backward sums the ranks' gradients), e.g. global pooling or BatchNorm statistics over sharded
    tokens."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    return _AllReduceSum.apply(tensor, group)


def global_sizes(n: int, m: int, group: Optional[Any] = None) -> tuple[list[int], list[int]]:
    """Every rank's (query rows, key rows), in rank order (one small collective)."""
    table: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(table, (int(n), int(m)), group=group)
    return [t[0] for t in table], [t[1] for t in table]


def shard_slice(sizes: Sequence[int], rank: int) -> slice:
    """The global index range of ``rank``'s shard for the given per-rank ``sizes``."""
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


# ----------------------------------------------------------------------------------------------
# the graph seen by one rank: its query rows and the key segments it holds, in global indices
# ----------------------------------------------------------------------------------------------
class _ShardGraph(Graph):
    """Rows ``[q0, q0 + n)`` of ``graph`` and the key columns of ``segments`` (global starts, lengths),
    concatenated in that order. Everything is asked of the global graph, lazily, tile by tile."""

    def __init__(self, graph: Graph, q0: int, n: int, segments: Sequence[tuple[int, int]]):
        self.graph = graph
        self.q0, self.n = q0, n
        self.segments = [(s, ln) for s, ln in segments if ln > 0]
        self.m = sum(ln for _, ln in self.segments)
        self.is_complete = graph.is_complete

    def _pieces(self, j0: int, j1: int) -> list[tuple[int, int]]:
        """Global column ranges covering local columns [j0, j1)."""
        out, pos = [], 0
        for s, ln in self.segments:
            a, b = max(j0, pos), min(j1, pos + ln)
            if a < b:
                out.append((s + a - pos, s + b - pos))
            pos += ln
        return out

    def validate(self, n, m, device):
        if (n, m) != (self.n, self.m):
            raise ValueError(f"shard of {self.graph!r}: expected ({self.n}, {self.m}) nodes, got ({n}, {m})")

    def check_values(self, n, m):  # checked once on the global graph by nlgraph.distributed.aggregate
        pass

    def tensors(self):
        return self.graph.tensors()

    @property
    def lead_shape(self):
        return self.graph.lead_shape

    @property
    def block_requires_grad(self):
        return self.graph.block_requires_grad

    def tile_pairs(self, row_tiles, col_tiles, device):
        rows = [(self.q0 + a, self.q0 + b) for a, b in row_tiles]
        spans = [self._pieces(a, b) for a, b in col_tiles]
        flat = [p for ps in spans for p in ps]
        if not rows or not flat:
            return None
        pairs = self.graph.tile_pairs(rows, flat, device)
        if pairs is None:
            return None
        out, pos = [], 0
        for ps in spans:
            out.append(pairs[:, pos:pos + len(ps)].any(-1))
            pos += len(ps)
        return torch.stack(out, -1)

    def block(self, i0, i1, j0, j1, device) -> Block:
        pieces = self._pieces(j0, j1)
        parts = [self.graph.block(self.q0 + i0, self.q0 + i1, a, b, device) for a, b in pieces]
        if all(p is None for p in parts):
            return None
        if len(parts) == 1:
            return parts[0]
        lens = [b - a for a, b in pieces]
        dtype = torch.bool if all(p is None or p.dtype == torch.bool for p in parts) else next(
            p.dtype for p in parts if p is not None and p.dtype != torch.bool)
        lead = torch.broadcast_shapes(*[p.shape[:-2] for p in parts if p is not None])
        full = []
        for p, ln in zip(parts, lens, strict=True):
            if p is None:
                p = torch.ones(ln, dtype=dtype, device=device).expand(*lead, i1 - i0, ln)
            else:
                p = p.to(dtype).expand(*lead, i1 - i0, ln)
            full.append(p)
        return torch.cat(full, -1)

    def dense_bias(self):
        bias = self.graph.dense_bias()
        if bias is None:
            return None
        rows = bias if bias.shape[-2] == 1 else bias[..., self.q0:self.q0 + self.n, :]
        if bias.shape[-1] == 1:
            return rows
        cols = [rows[..., a:b] for a, b in self._pieces(0, self.m)]
        if not cols:
            return rows[..., :0]
        return cols[0] if len(cols) == 1 else torch.cat(cols, -1)

    def __repr__(self) -> str:
        return f"shard(rows {self.q0}:{self.q0 + self.n}, keys {self.segments}) of {self.graph!r}"


def _needed(graph: Optional[Graph], q0: int, n: int, k_starts: Sequence[int], k_sizes: Sequence[int],
            device: torch.device) -> list[tuple[int, int]]:
    """Per owner rank: the global key range [lo, hi) this rank's queries have edges into."""
    full = [(s, s + ln) for s, ln in zip(k_starts, k_sizes, strict=True)]
    if n == 0:
        return [(s, s) for s, _ in full]
    if graph is None or graph.is_complete:
        return full
    shape = getattr(graph, "shape", None)
    grain = math.prod(shape[1:]) if shape is not None and getattr(graph, "order", None) is None else None
    tiles, owner = [], []
    for r, (s, e) in enumerate(full):
        step = grain if grain else max(e - s, 1)
        for a in range(s, e, step):
            tiles.append((a, min(e, a + step)))
            owner.append(r)
    if not tiles:
        return full
    pairs = graph.tile_pairs([(q0, q0 + n)], tiles, device)
    if pairs is None:
        return full
    hit = pairs[0].tolist()
    out = [(s, s) for s, _ in full]
    for (a, b), r, h in zip(tiles, owner, hit, strict=True):
        if h:
            lo, hi = out[r]
            out[r] = (a, b) if lo == hi else (min(lo, a), max(hi, b))
    return out


# ----------------------------------------------------------------------------------------------
# transport: point-to-point pieces and ring steps, both differentiable
# ----------------------------------------------------------------------------------------------
def _wait(works) -> None:
    for w in works:
        w.wait()


class _Exchange(torch.autograd.Function):
    """Gather the key rows this rank needs from their owners; backward returns each piece's gradient
    to its owner, which adds what every requester sent back into its own shard's gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: dict) -> Tensor:
        me, group, tag = plan["rank"], plan["group"], plan["tag"]
        k0 = plan["k_starts"][me]
        works, recvs, sent = [], {}, 0
        for i, (lo, hi) in enumerate(plan["give"]):  # what rank i needs from me
            if i != me and hi > lo:
                piece = x[..., lo - k0:hi - k0, :].contiguous()
                sent += piece.numel() * piece.element_size()
                works.append(dist.isend(piece, dst=_global(group, i), group=group, tag=tag))
        for r, (lo, hi) in enumerate(plan["take"]):  # what I need from rank r
            if r != me and hi > lo:
                buf = x.new_empty(*x.shape[:-2], hi - lo, x.shape[-1])
                works.append(dist.irecv(buf, src=_global(group, r), group=group, tag=tag))
                recvs[r] = buf
        _wait(works)
        plan["sent"] += sent
        parts = []
        for r, (lo, hi) in enumerate(plan["take"]):
            if hi > lo:
                parts.append(x[..., lo - k0:hi - k0, :] if r == me else recvs[r])
        ctx.plan, ctx.shape = plan, x.shape
        if not parts:
            return x.new_empty(*x.shape[:-2], 0, x.shape[-1])
        return torch.cat(parts, -2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        plan = ctx.plan
        me, group, tag = plan["rank"], plan["group"], plan["tag"] + 1
        k0 = plan["k_starts"][me]
        out = grad.new_zeros(ctx.shape)
        works, pos, recvs = [], 0, []
        for r, (lo, hi) in enumerate(plan["take"]):
            if hi > lo:
                piece = grad[..., pos:pos + hi - lo, :]
                if r == me:
                    out[..., lo - k0:hi - k0, :] += piece
                else:
                    works.append(dist.isend(piece.contiguous(), dst=_global(group, r), group=group, tag=tag))
                pos += hi - lo
        for i, (lo, hi) in enumerate(plan["give"]):
            if i != me and hi > lo:
                buf = grad.new_empty(*ctx.shape[:-2], hi - lo, ctx.shape[-1])
                works.append(dist.irecv(buf, src=_global(group, i), group=group, tag=tag))
                recvs.append((lo, hi, buf))
        _wait(works)
        for lo, hi, buf in recvs:
            out[..., lo - k0:hi - k0, :] += buf
        return out, None


def _start_pass(x: Tensor, rows: int, plan: dict, tag: int) -> dict:
    """Post one ring step: ``x`` to the next rank, ``rows`` rows from the previous one (not waited)."""
    me, world, group = plan["rank"], plan["world"], plan["group"]
    buf = x.new_empty(*x.shape[:-2], rows, x.shape[-1])
    send = x.detach().contiguous()
    works = []
    if send.numel():  # both sides know every shard's size: empty blocks are not sent
        works.append(dist.isend(send, dst=_global(group, (me + 1) % world), group=group, tag=tag))
    if buf.numel():
        works.append(dist.irecv(buf, src=_global(group, (me - 1) % world), group=group, tag=tag))
    return {"works": works, "buf": buf, "send": send, "tag": tag,
            "bytes": send.numel() * send.element_size()}


def _global(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _grad_tensors(*objs: Any) -> list[Tensor]:
    """Tensors requiring grad held by affinities and graphs (a Concatenation's weight, a float mask
    bias, ...), found through their attributes, lists and nested graphs, each once."""
    found: dict[int, Tensor] = {}

    def visit(x: Any, depth: int) -> None:
        if isinstance(x, Tensor):
            if x.requires_grad:
                found.setdefault(id(x), x)
        elif depth < 4 and isinstance(x, (list, tuple)):
            for item in x:
                visit(item, depth + 1)
        elif depth < 4 and isinstance(x, (Affinity, Graph)):
            for item in vars(x).values():
                visit(item, depth + 1)

    for obj in objs:
        visit(obj, 0)
    return list(found.values())


class _RingAggregate(torch.autograd.Function):
    """The ring over dense key blocks with memory O(local) in training too (ring attention's
    backward): the forward keeps only this rank's shards, the merged y and its lse; the backward sends
    the key/value blocks around the ring once more, recomputes each block's part (y_s, lse_s) and
    back-propagates the merge's closed-form derivative through it:

    * C = sum_s C_s: ``y = sum_s w_s y_s`` with ``w_s = exp(lse_s - lse)``, so ``dy_s = w_s dy`` and
      ``dlse_s = w_s <dy, y_s - y>``;
    * C = 1: ``y = sum_s y_s``, ``dy_s = dy``.

    Each block's key/value gradient travels with it and reaches its owner after the last step.
    Gradients of tensors inside the affinity or graph (``params``) are this rank's contributions, as
    with autograd (sum them over ranks like any replicated parameter's)."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, run: Any, *params: Tensor) -> Tensor:
        local, plan, m_sizes, k_starts, same_kv, affinity, _ = run
        from .merge import merge

        me, world = plan["rank"], plan["world"]
        acc, sent = None, 0
        k_cur, v_cur = key, value
        for s in range(world):
            owner = (me - s) % world
            if s + 1 < world:  # the next block is in flight while this one is aggregated
                rows = m_sizes[(owner - 1) % world]
                pk = _start_pass(k_cur, rows, plan, 10 + 4 * s)
                pv = None if same_kv else _start_pass(v_cur, rows, plan, 12 + 4 * s)
            part = local(query, k_cur, v_cur, [(k_starts[owner], m_sizes[owner])], lse=True)
            acc = part if acc is None else merge([acc, part], affinity)
            if s + 1 < world:
                _wait(pk["works"])
                k_cur = pk["buf"]
                if pv is not None:
                    _wait(pv["works"])
                v_cur = k_cur if pv is None else pv["buf"]
                sent += pk["bytes"] + (0 if pv is None else pv["bytes"])
        assert acc is not None
        y, lse = acc
        ctx.run = run
        ctx.save_for_backward(query, key, value, y, lse)
        plan["sent"] = sent
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        local, plan, m_sizes, k_starts, same_kv, affinity, params = ctx.run
        query, key, value, y, lse = ctx.saved_tensors
        need_q = ctx.needs_input_grad[0]
        me, world = plan["rank"], plan["world"]
        summed = affinity.norm == "none"
        dq = torch.zeros_like(query)
        dparams = [torch.zeros_like(p) for p in params]
        k_cur, v_cur = key, value
        dk_cur, dv_cur = torch.zeros_like(key), torch.zeros_like(value)  # dv_cur unused when key is value
        finite = torch.isfinite(lse)
        lse_safe = torch.where(finite, lse, torch.zeros_like(lse))
        base = 1000
        for s in range(world):
            owner = (me - s) % world
            nxt = m_sizes[(owner - 1) % world]
            if s + 1 < world:  # post the next key/value block before the recomputation
                pk = _start_pass(k_cur, nxt, plan, base + 8 * s)
                pv = None if same_kv else _start_pass(v_cur, nxt, plan, base + 8 * s + 1)
            with torch.enable_grad():
                qd = query.detach().requires_grad_(need_q)
                kd = k_cur.detach().requires_grad_(True)
                vd = kd if same_kv else v_cur.detach().requires_grad_(True)
                y_s, lse_s = local(qd, kd, vd, [(k_starts[owner], m_sizes[owner])], lse=True)
                if summed:
                    outs, grads_out = [y_s], [dy]
                else:
                    w = torch.where(finite & torch.isfinite(lse_s), torch.exp(lse_s.detach() - lse_safe),
                                    torch.zeros_like(lse_safe))
                    dlse = w * (dy * (y_s.detach() - y)).sum(-1)
                    outs, grads_out = [y_s, lse_s], [w[..., None].to(dy.dtype) * dy, dlse.to(lse_s.dtype)]
                inputs = ([qd] if need_q else []) + [kd] + ([] if same_kv else [vd]) + params
                pairs = [(o, g) for o, g in zip(outs, grads_out, strict=True) if o.requires_grad]
                # (edge counts: lse_s = log |K_s| does not depend on the inputs)
                got = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                          allow_unused=True)
            got = list(got)
            if need_q:
                g = got.pop(0)
                if g is not None:
                    dq += g
            g = got.pop(0)
            if g is not None:
                dk_cur = dk_cur + g
            if not same_kv:
                g = got.pop(0)
                if g is not None:
                    dv_cur = dv_cur + g
            for acc, g in zip(dparams, got, strict=True):
                if g is not None:
                    acc += g
            # this block's gradients go on with it (after the last step: to its owner, rank me + 1)
            gk = _start_pass(dk_cur, nxt, plan, base + 8 * s + 2)
            gv = None if same_kv else _start_pass(dv_cur, nxt, plan, base + 8 * s + 3)
            for pending in (gk, gv) + ((pk, pv) if s + 1 < world else ()):
                if pending is not None:
                    _wait(pending["works"])
            dk_cur, dv_cur = gk["buf"], dv_cur if gv is None else gv["buf"]
            if s + 1 < world:
                k_cur = pk["buf"]
                v_cur = k_cur if pv is None else pv["buf"]
        dkey = dk_cur
        dvalue = None if same_kv else dv_cur
        return (dq if need_q else None, dkey, dvalue, None, *dparams)


# ----------------------------------------------------------------------------------------------
# the op
# ----------------------------------------------------------------------------------------------
def _signature(query: Tensor, key: Tensor, value: Tensor, affinity: Affinity, graph: Optional[Graph],
               method: str) -> dict[str, Any]:
    return {
        "query": tuple(query.shape[:-2]) + (query.shape[-1],),
        "key": tuple(key.shape[:-2]) + (key.shape[-1],),
        "value": tuple(value.shape[:-2]) + (value.shape[-1],),
        "dtype": str(query.dtype),
        "affinity": repr(affinity),
        "graph": repr(graph),
        "method": method,
    }


def aggregate(query: Tensor, key: Tensor, value: Tensor, affinity: Optional[Affinity] = None,
              graph: Optional[Graph] = None, *, group: Optional[Any] = None, method: str = "ring",
              backend: str = "auto", options: Optional[Mapping[str, Any]] = None) -> Tensor:
    """:func:`nlgraph.aggregate` over nodes sharded across the ranks of ``group``.

    Args:
        query: (..., n_r, d) this rank's contiguous shard of the queries (rank order along dim -2).
        key: (..., m_r, d) this rank's shard of the keys (``key is query`` allowed).
        value: (..., m_r, e) this rank's shard of the values.
        affinity: as :func:`nlgraph.aggregate` (default ``Softmax()``).
        graph: the *global* graph (global node indices; ``None`` = complete).
        group: a ``torch.distributed`` process group (default: the world).
        method: ``"ring"`` or ``"allgather"`` (module docstring).
        backend, options: passed to the local :func:`nlgraph.aggregate` calls.

    Returns:
        (..., n_r, e): this rank's rows of the single-process result.

    Every rank must call it with the same leading dims, feature widths, dtype, affinity and graph
    (checked: a ValueError on every rank, not a hang). Uses ``torch.distributed``'s own P2P ops; for
    a world of one it is the single-process op.
    """
    from . import core

    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., nodes, features), got {tuple(t.shape)}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value shards must have the same number of rows, got key "
                         f"{tuple(key.shape)} and value {tuple(value.shape)}")
    affinity = Softmax() if affinity is None else affinity
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("nlgraph.distributed.aggregate needs an initialised torch.distributed process "
                           "group (torch.distributed.init_process_group, or launch with torchrun)")
    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    sig = _signature(query, key, value, affinity, graph, method)
    table: list[Any] = [None] * world
    dist.all_gather_object(table, (query.shape[-2], key.shape[-2], sig), group=group)
    for r, (_, _, other) in enumerate(table):
        if other != sig:
            diff = ", ".join(f"{k} ({sig[k]} vs {other[k]})" for k in sig if sig[k] != other[k])
            raise ValueError(f"nlgraph.distributed.aggregate: rank {me} and rank {r} disagree on {diff}; "
                             f"every rank must pass shards of the same problem")
    n_sizes = [t[0] for t in table]
    m_sizes = [t[1] for t in table]
    q_starts = [sum(n_sizes[:r]) for r in range(world)]
    k_starts = [sum(m_sizes[:r]) for r in range(world)]
    n_total, m_total = sum(n_sizes), sum(m_sizes)
    q0, n = q_starts[me], n_sizes[me]
    if graph is not None:
        if not isinstance(graph, Graph):
            raise TypeError(f"graph must be None or an nlgraph.graph.Graph, got {type(graph).__name__}")
        graph.validate(n_total, m_total, query.device)
        from ._values import checking_values

        if checking_values():
            graph.check_values(n_total, m_total)
        if graph.is_complete:
            graph = None

    take = _needed(graph, q0, n, k_starts, m_sizes, query.device)
    needs: list[Any] = [None] * world
    dist.all_gather_object(needs, take, group=group)
    give = [needs[i][me] for i in range(world)]
    whole = [(k_starts[r], k_starts[r] + m_sizes[r]) for r in range(world)]
    # a rank without queries needs nothing but still relays the ring's blocks
    dense = all(needs[i] == whole or n_sizes[i] == 0 for i in range(world))
    plan: dict[str, Any] = {"rank": me, "world": world, "group": group, "k_starts": k_starts,
                            "take": take, "give": give, "tag": 0, "sent": 0}
    same_kv = key is value

    def local(q: Tensor, k: Tensor, v: Tensor, segments: list[tuple[int, int]], lse: bool):
        g = None if graph is None else _ShardGraph(graph, q0, n, segments)
        if not lse:
            return core.aggregate(q, k, v, affinity, g, backend=backend, options=options)
        return core.aggregate(q, k, v, affinity, g, backend=backend, options=options, return_lse=True)

    if method == "ring" and dense and world > 1:
        params = _grad_tensors(affinity, graph)
        run = (local, plan, m_sizes, k_starts, same_kv, affinity, params)
        y = _RingAggregate.apply(query, key, key if same_kv else value, run, *params)
        _LAST["last"] = ExchangeStats("ring", int(plan["sent"]), world - 1)
        return y

    plan_k = dict(plan, tag=2)
    k_all = _Exchange.apply(key, plan_k)
    plan_v = dict(plan, tag=4)
    v_all = k_all if same_kv else _Exchange.apply(value, plan_v)
    blocks = sum(1 for i, (lo, hi) in enumerate(give) if i != me and hi > lo)
    _LAST["last"] = ExchangeStats(method if dense else "p2p", int(plan_k["sent"] + plan_v["sent"]), blocks)
    segments = [(lo, hi - lo) for lo, hi in take]
    return local(query, k_all, v_all, segments, lse=False)
