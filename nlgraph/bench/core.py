"""``nlgraph bench core``: the core op's chunked backend vs SDPA's fastest kernel; exact algebra.

Rows:
* ``chunked`` vs ``torch.nn.functional.scaled_dot_product_attention`` (softmax, complete graph),
  N = M in {1024, 4096, 16384}, d = e in {64, 512}, forward and forward+backward, float32, one
  head. SDPA gets 4-D input (1, 1, N, d): with 3-D input it takes its unfused math path on CPU.
  Every SDPA kernel of the device is forced in turn (``sdpa_kernel``: flash and math on CPU; flash,
  efficient, cuDNN and math on CUDA), those that run the case are timed, and the row compares
  against the fastest, named ``sdpa[flash-cpu]`` etc.; the JSON records every path's time and the
  operators the profiler saw in one call (``peer_kernels``).
* ``algebra`` vs the materialised product ``(q k^T) v / M`` in torch (what public non-local
  implementations compute for the dot-product mode; there is no fused torch kernel for it) at
  the largest N (4096 with ``--quick``), d = 64.

Time ratios are ours / peer (< 1 means ours is faster); peak memory is the measured rise of peak
RSS in a fresh subprocess per case.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from nlgraph.bench import harness

MODULE = "nlgraph.bench.core"


def _inputs(n: int, d: int, grad: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, n, d, generator=gen).requires_grad_(grad) for _ in range(3))
    return q, k, v


def _impl(case: dict):
    import nlgraph

    name = case["impl"]
    if name == "sdpa":
        path = case.get("path")

        def sdpa(q, k, v):  # 4-D (batch, heads, N, d): SDPA's fused CPU kernel needs the heads dim
            with harness.sdpa_forced(path):
                return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return sdpa
    if name == "materialised":
        return lambda q, k, v: (q @ k.transpose(-1, -2)) @ v / k.shape[-2]
    aff = nlgraph.Softmax() if case["affinity"] == "softmax" else nlgraph.DotProduct()
    return lambda q, k, v: nlgraph.aggregate(q, k, v, aff, backend=name)


def _step(impl, q, k, v, mode: str):
    if mode == "fwd":
        with torch.no_grad():
            return impl(q, k, v)
    y = impl(q, k, v)
    y.backward(torch.ones_like(y))
    return y


def make_step(case: dict):
    q, k, v = _inputs(case["n"], case["d"], case["mode"] == "fwd+bwd")
    impl = _impl(case)
    return lambda: _step(impl, q, k, v, case["mode"])


def memory_case(case: dict) -> None:
    impl = _impl(case)
    grad = case["mode"] == "fwd+bwd"
    _step(impl, *_inputs(64, case["d"], grad), case["mode"])  # warm-up: lazy imports, thread pools
    q, k, v = _inputs(case["n"], case["d"], grad)
    harness.report_peak(lambda: _step(impl, q, k, v, case["mode"]))


def plan(quick: bool, sizes=None, dims=None) -> list[dict]:
    sizes = sizes or ([1024, 4096] if quick else [1024, 4096, 16384])
    dims = dims or ([64] if quick else [64, 512])
    pairs = []
    for n in sizes:
        for d in dims:
            for mode in ("fwd", "fwd+bwd"):
                pairs.append(dict(n=n, d=d, mode=mode, affinity="softmax", ours="chunked", peer="sdpa"))
    n_alg = 4096 if quick else max(sizes)
    for mode in ("fwd", "fwd+bwd"):
        pairs.append(dict(n=n_alg, d=64, mode=mode, affinity="dot", ours="algebra", peer="materialised"))
    return pairs


def peer_paths(pair: dict):
    """SDPA: each kernel of the device, forced in turn (the fastest that runs the case is the row's peer)."""
    if pair["peer"] != "sdpa":
        return None
    return harness.sdpa_paths("cpu")


def main(argv=None) -> int:
    return harness.pairs_main(
        argv, "core", __doc__, MODULE, plan, make_step, memory_case,
        lambda p: f"{p['affinity']} {p['ours']} N={p['n']} d={p['d']} {p['mode']}",
        "nlgraph bench core (float32, batch 1, median time in s, peak RSS rise in MiB)",
        peer_paths=peer_paths, kernel_pattern="scaled_dot_product")


if __name__ == "__main__":
    sys.exit(main())
