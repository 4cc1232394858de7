"""``nlgraph bench core``: the core op's chunked backend vs SDPA and the reference; exact algebra.

Rows:
* ``chunked`` vs ``torch.nn.functional.scaled_dot_product_attention`` (softmax, complete graph),
  N = M in {1024, 4096, 16384}, d = e in {64, 512}, forward and forward+backward, float32.
* ``chunked`` vs the ``reference`` backend (materialises N x M) on the same cases (memory).
* ``algebra`` vs brute force (``chunked``) for the dot-product affinity at N = 16384.

Time ratios are ours / peer (< 1 means ours is faster); peak memory is the measured rise of peak
RSS in a fresh subprocess per case.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks import harness

MODULE = "benchmarks.core"


def _inputs(n: int, d: int, grad: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, d, generator=gen).requires_grad_(grad) for _ in range(3)]


def _impl(name: str, affinity: str):
    import nlgraph

    aff = nlgraph.Softmax() if affinity == "softmax" else nlgraph.DotProduct()
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    return lambda q, k, v: nlgraph.aggregate(q, k, v, aff, backend=name)


def _step(impl, q, k, v, mode: str):
    if mode == "fwd":
        with torch.no_grad():
            return impl(q, k, v)
    y = impl(q, k, v)
    y.backward(torch.ones_like(y))
    return y


def run_case(case: dict, repeats: int):
    q, k, v = _inputs(case["n"], case["d"], case["mode"] == "fwd+bwd")
    impl = _impl(case["impl"], case["affinity"])
    return harness.time_call(lambda: _step(impl, q, k, v, case["mode"]), repeats=repeats)


def memory_case(case: dict) -> None:
    impl = _impl(case["impl"], case["affinity"])
    grad = case["mode"] == "fwd+bwd"
    _step(impl, *_inputs(64, case["d"], grad), case["mode"])  # warm-up: lazy imports, thread pools
    q, k, v = _inputs(case["n"], case["d"], grad)
    harness.report_peak(lambda: _step(impl, q, k, v, case["mode"]))


def plan(quick: bool) -> list[dict]:
    sizes = [1024, 4096] if quick else [1024, 4096, 16384]
    dims = [64] if quick else [64, 512]
    pairs = []
    for n in sizes:
        for d in dims:
            for mode in ("fwd", "fwd+bwd"):
                for peer in ("sdpa", "reference"):
                    pairs.append(dict(n=n, d=d, mode=mode, affinity="softmax", ours="chunked", peer=peer))
    n_alg = 4096 if quick else 16384
    for mode in ("fwd", "fwd+bwd"):
        pairs.append(dict(n=n_alg, d=64, mode=mode, affinity="dot", ours="algebra", peer="chunked"))
    return pairs


def main(argv=None) -> int:
    return harness.pairs_main(
        argv, "core", __doc__, MODULE, plan, run_case, memory_case,
        lambda p: f"{p['affinity']} {p['ours']} N={p['n']} d={p['d']} {p['mode']}",
        "nlgraph bench core (float32, batch 1, median time in s, peak RSS rise in MiB)")


if __name__ == "__main__":
    sys.exit(main())
