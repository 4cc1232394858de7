"""``nlgraph bench graph``: the pyg backend vs the dense (chunked) path on sparse graphs.

Softmax attention, d = e = 32, batch 1, float32, forward+backward, over a local-window graph
(radius 3 on a square grid, 49 neighbours) and a k-NN graph (k = 16, random 2-D points), at
N = M in {4096, 65536}. The dense path is the chunked backend with the same graph: it scores
whole tiles and masks them per tile (it never builds an N x N mask), skipping empty tiles.
"""

from __future__ import annotations

import math
import sys

import torch

from benchmarks import harness

MODULE = "benchmarks.graph"


def _setup(case: dict):
    import nlgraph
    from nlgraph import graph as G

    n = case["n"]
    gen = torch.Generator().manual_seed(0)
    if case["graph"] == "window":
        side = int(math.isqrt(n))
        graph = G.LocalWindow((side, side), 3)
    else:
        graph = G.KNN.from_points(torch.rand(n, 2, generator=gen), k=16)
    q, k, v = (torch.randn(1, n, 32, generator=gen).requires_grad_(True) for _ in range(3))

    def step():
        y = nlgraph.aggregate(q, k, v, nlgraph.Softmax(), graph, backend=case["impl"])
        y.sum().backward()

    return step


def time_case(case: dict, repeats: int) -> float:
    return harness.time_call(_setup(case), repeats=repeats)


def memory_case(case: dict) -> None:
    _setup(dict(case, n=256))()
    harness.report_peak(_setup(case))


def plan(quick: bool) -> list[dict]:
    return [dict(graph=g, n=n, ours="pyg", peer="chunked") for n in ([4096] if quick else [4096, 65536])
            for g in ("window", "knn")]


def main(argv=None) -> int:
    return harness.pairs_main(argv, "graph", __doc__, MODULE, plan, time_case, memory_case,
                              lambda p: f"{p['graph']} N={p['n']} softmax d=32 fwd+bwd",
                              "nlgraph bench graph (float32, median time in s, peak RSS rise in MiB)")


if __name__ == "__main__":
    sys.exit(main())
