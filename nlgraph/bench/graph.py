"""``nlgraph bench graph``: attention over sparse graphs, nlgraph (automatic dispatch) vs the peers.

Softmax attention, d = e = 32, batch 1, float32, forward+backward, over a local-window graph
(radius 3 on a square grid, 49 neighbours) and a k-NN graph (k = 16, random 2-D points), at
N = M in {4096, 65536}. Ours is ``nlgraph.aggregate`` with ``backend="auto"`` (windows go to the
chunked backend, which masks per tile and skips tiles without edges; k-NN graphs to the pyg
backend); the row's ``ours`` column names the backend dispatch chose. Peers, each at its fastest:

* ``pyg[softmax+scatter]``: the op as a PyTorch Geometric user writes it, per edge
  (``torch_geometric.utils.softmax`` over the scores of each target, ``torch_geometric.utils.scatter``
  of the weighted values), no MessagePassing layer around it.
* ``sdpa[...]``: ``scaled_dot_product_attention`` with the graph as a dense (N x N) bool mask, 4-D
  input, every kernel forced in turn, the fastest named (N = 4096 only: at N = 65536 the mask alone
  is 4 GiB).

The last rows are a backend choice, not a peer comparison: the pyg backend vs the chunked backend
on the same graph (the measurement behind dispatch's preferences in ``nlgraph/backends/pyg.py``).
"""

from __future__ import annotations

import math
import sys

import torch

from nlgraph.bench import harness

MODULE = "nlgraph.bench.graph"


def _graph(case: dict, gen):
    from nlgraph import graph as G

    n = case["n"]
    if case["graph"] == "window":
        side = int(math.isqrt(n))
        return G.LocalWindow((side, side), 3)
    return G.KNN.from_points(torch.rand(n, 2, generator=gen), k=16)


def make_step(case: dict):
    import nlgraph

    n = case["n"]
    gen = torch.Generator().manual_seed(0)
    graph = _graph(case, gen)
    q, k, v = (torch.randn(1, n, 32, generator=gen).requires_grad_(True) for _ in range(3))
    impl, path = case["impl"], case.get("path")
    if impl == "sdpa":
        import torch.nn.functional as F

        mask = graph.dense(n, n).to(torch.bool)[None, None]

        def run():
            with harness.sdpa_forced(path):
                out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=mask)
                return out[:, 0]
    elif impl == "pyg[softmax+scatter]":
        from torch_geometric.utils import scatter, softmax

        ei, _ = graph.edges(n, n, q.device)
        src, dst = ei[0], ei[1]
        scale = 1.0 / math.sqrt(q.shape[-1])

        def run():
            s = (q[0].index_select(0, dst) * k[0].index_select(0, src)).sum(-1) * scale
            alpha = softmax(s, dst, num_nodes=n)
            msg = alpha[:, None] * v[0].index_select(0, src)
            return scatter(msg, dst, dim=0, dim_size=n, reduce="sum")[None]
    else:
        def run():
            return nlgraph.aggregate(q, k, v, nlgraph.Softmax(), graph, backend=impl)

    def step():
        run().sum().backward()

    return step


def memory_case(case: dict) -> None:
    make_step(dict(case, n=256))()
    harness.report_peak(make_step(case))


def _auto_backend(graph_kind: str, n: int) -> str:
    import nlgraph

    gen = torch.Generator().manual_seed(0)
    q = torch.zeros(1, n, 32)
    return nlgraph.select_backend(q, q, q, nlgraph.Softmax(), _graph(dict(graph=graph_kind, n=n), gen))[0]


def plan(quick: bool, sizes=None, dims=None) -> list[dict]:
    pairs = []
    sizes = sizes or ([4096] if quick else [4096, 65536])
    for n in sizes:
        for g in ("window", "knn"):
            ours = _auto_backend(g, n)
            pairs.append(dict(graph=g, n=n, ours=ours, peer="pyg[softmax+scatter]"))
            if n <= 4096:  # the dense mask: N^2 bools
                pairs.append(dict(graph=g, n=n, ours=ours, peer="sdpa"))
    for n in sizes:  # the backend choice behind dispatch (not a peer comparison)
        for g in ("window", "knn"):
            pairs.append(dict(graph=g, n=n, ours="pyg", peer="chunked"))
    return pairs


def peer_paths(pair: dict):
    return harness.sdpa_paths("cpu") if pair["peer"] == "sdpa" else None


def describe(p: dict) -> str:
    return f"{p['graph']} N={p['n']} softmax d=32 fwd+bwd"


def main(argv=None) -> int:
    return harness.pairs_main(argv, "graph", __doc__, MODULE, plan, make_step, memory_case, describe,
                              "nlgraph bench graph (float32, median time in s, peak RSS rise in MiB)",
                              peer_paths=peer_paths, kernel_pattern="scaled_dot_product",
                              columns=harness.COLUMNS[:1] + [("ours", "ours")] + harness.COLUMNS[1:])


if __name__ == "__main__":
    sys.exit(main())
