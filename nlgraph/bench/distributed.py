"""``nlgraph bench distributed``: the core op sharded over spawned gloo ranks on this machine.

For each world size (default 1, 2 and 4) and case, every rank holds an equal shard of N tokens and
runs :func:`nlgraph.distributed.aggregate` forward and forward+backward; the table reports the
slowest rank's median time, each rank's measured peak RSS rise during one forward+backward (the
largest over ranks), the bytes one rank sent in the forward (largest over ranks) and the per-rank
traffic and memory the model in the README predicts. On a 2-core machine the ranks share two cores:
this is a correctness-and-traffic benchmark, not a speed-up claim (world 1 is the single-process op
for reference). Cases: the complete graph (softmax, ``ring`` and ``allgather``) and a 2-D
``LocalWindow`` of radius 1 and 4 on a square grid split into whole rows (only halo rows travel).
``--sizes`` sets N (a square number for the window cases), ``--dims`` d (= e).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from datetime import timedelta

import torch

from nlgraph.bench import harness

CASES = ("complete ring", "complete allgather", "window r=1", "window r=4")


def _case(name: str, side: int):
    from nlgraph import graph as G

    if name.startswith("complete"):
        return None, name.split()[1]
    return G.LocalWindow((side, side), int(name.split("=")[1])), "ring"


HEADS = 4


def _model(name: str, world: int, n: int, d: int, side: int, bytes_per: int) -> tuple[float, float]:
    """Predicted (bytes the busiest rank sends in the forward, key/value bytes it holds), as the
    README's model: a key row and a value row of d elements per head."""
    m_r = math.ceil(n / world)
    kv_row = 2 * d * HEADS * bytes_per
    if world == 1:
        return 0.0, m_r * kv_row
    if name == "complete ring":
        return (world - 1) * m_r * kv_row, 2 * m_r * kv_row  # no_grad forward: current + in-flight block
    if name == "complete allgather":
        return (world - 1) * m_r * kv_row, n * kv_row
    halo = min(int(name.split("=")[1]), side) * side  # radius rows of the grid
    neighbours = min(2, world - 1)  # an interior rank sends its halo up and down
    return neighbours * halo * kv_row, (m_r + neighbours * halo) * kv_row


def _rank(rank: int, world: int, tmp: str, n: int, d: int, repeats: int, threads: int) -> None:
    import torch.distributed as dist

    from nlgraph import distributed as nd

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=10))
    torch.set_num_threads(threads)
    side = math.isqrt(n)
    rows = nd.shard_sizes(side, world)
    sizes = [r * side for r in rows] if side * side == n else nd.shard_sizes(n, world)
    sl = nd.shard_slice(sizes, rank)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, d, generator=gen)[..., sl, :].contiguous() for _ in range(3))
    out = {}
    for name in CASES:
        graph, method = _case(name, side)
        if graph is not None and side * side != n:
            continue
        meth = method

        def fwd(graph=graph, meth=meth):
            with torch.no_grad():
                return nd.aggregate(q, k, v, None, graph, method=meth)

        leaves = tuple(t.clone().requires_grad_(True) for t in (q, k, v))

        def fwd_bwd(graph=graph, meth=meth, inputs=leaves):
            nd.aggregate(*inputs, None, graph, method=meth).sum().backward()

        fwd()
        sent = 0
        if world > 1:
            stats = nd.last_exchange()
            if stats is None:
                raise RuntimeError("nlgraph.distributed recorded no exchange for a sharded forward")
            sent = stats.bytes_sent
        t_f = harness.time_call(lambda: (dist.barrier(), fwd()), repeats=repeats)
        t_fb = harness.time_call(lambda: (dist.barrier(), fwd_bwd()), repeats=repeats)
        dist.barrier()
        harness.reset_peak_rss()
        before = harness.current_rss_bytes()
        fwd_bwd()
        peak = max(0, harness.peak_rss_bytes() - before) / 2**20
        out[name] = {"fwd_s": t_f, "fwd_bwd_s": t_fb, "peak_mib": peak, "bytes_sent": sent}
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as fh:
        json.dump(out, fh)
    dist.destroy_process_group()


def run_world(world: int, n: int, d: int, repeats: int, threads: int) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(world, tmp, n, d, repeats, threads), nprocs=world, join=True,
                           start_method="spawn")
        per_rank = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as fh:
                per_rank.append(json.load(fh))
    rows = []
    side = math.isqrt(n)
    for name in per_rank[0]:
        res = [p[name] for p in per_rank]
        sent_model, mem_model = _model(name, world, n, d, side, 4)
        rows.append({
            "name": f"{name}, world {world}", "case": name, "world": world, "n": n, "d": d,
            "fwd_s": max(x["fwd_s"] for x in res), "fwd_bwd_s": max(x["fwd_bwd_s"] for x in res),
            "peak_mib": max(x["peak_mib"] for x in res), "bytes_sent": max(x["bytes_sent"] for x in res),
            "model_bytes_sent": sent_model, "model_kv_mib": mem_model / 2**20,
        })
    return rows


COLUMNS = [("name", "case"), ("fwd_s", "fwd s"), ("fwd_bwd_s", "fwd+bwd s"), ("peak_mib", "peak MiB/rank"),
           ("bytes_sent", "bytes sent/rank"), ("model_bytes_sent", "model bytes"),
           ("model_kv_mib", "model k/v MiB")]


def main(argv=None) -> int:
    ap = harness.standard_parser("nlgraph bench distributed", __doc__)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="world sizes (default 1 2 4)")
    args = ap.parse_args(argv)
    if any(w < 1 for w in args.worlds) or args.repeats < 1:
        ap.error("--worlds and --repeats must be >= 1")
    n = (args.sizes or [1024 if args.quick else 4096])[0]
    d = (args.dims or [64])[0]
    threads = args.threads or 1
    rows = []
    for world in args.worlds:
        rows.extend(run_world(world, n, d, args.repeats, threads))
        print(f"world {world} done", file=sys.stderr, flush=True)
    harness.print_table(f"nlgraph.distributed.aggregate, N={n}, d=e={d}, 4 heads, float32, gloo, "
                        f"{threads} thread(s) per rank", rows, COLUMNS)
    if args.json:
        harness.write_json(args.json, "distributed", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
