"""``nlgraph bench nonlocal``: NonLocal2d (each mode) vs a materialising block; our MHA vs torch's.

Rows:
* ``NonLocal2d`` (512 channels, inter 256, sub_sample=True as the paper's default, batch 1, float32)
  forward+backward, against the same block computed the way public implementations do: the full
  (N x M) pairwise matrix materialised (for concatenation the N x M matrix of ReLU(a_i + b_j),
  already cheaper than concatenating features per pair). Feature maps 32x32, 64x64, 128x128.
* ``attention.MultiheadAttention`` vs ``torch.nn.MultiheadAttention`` (embed 256, 8 heads, batch 1)
  forward+backward at N in {1024, 4096}, weights copied with ``mha_to_torch``.

Time ratio = ours / peer (< 1: ours faster); memory = measured peak RSS rise per case, subprocess.
"""

from __future__ import annotations

import sys

import torch

from benchmarks import harness

MODULE = "benchmarks.nonlocal"
CHANNELS = 512


def materialised_nonlocal(block, x):
    """The block as public implementations compute it: the N x M pairwise matrix in memory."""
    q, k, v = block.embed(x)
    if block.mode in ("gaussian", "embedded_gaussian"):
        f = torch.softmax((q @ k.transpose(1, 2)) * block.affinity().scale, dim=-1)
    elif block.mode == "dot_product":
        f = q @ k.transpose(1, 2) / k.shape[1]
    else:
        w = block.concat_project
        d = q.shape[-1]
        f = torch.relu((q @ w[:d])[:, :, None] + (k @ w[d:])[:, None, :]) / k.shape[1]
    y = (f @ v).transpose(1, 2).reshape(x.shape[0], block.inter_channels, *x.shape[2:])
    return block.W(y) + x


def _setup(case: dict):
    torch.manual_seed(0)
    if case["kind"] == "nonlocal":
        from nlgraph import NonLocal2d

        block = NonLocal2d(CHANNELS, mode=case["mode"])
        with torch.no_grad():  # a trained-looking block (W / BN non-zero)
            for p in block.parameters():
                p.normal_(0, 0.02)
        x = torch.randn(1, CHANNELS, case["size"], case["size"], requires_grad=True)
        fn = block if case["impl"] == "nlgraph" else (lambda t: materialised_nonlocal(block, t))
        return lambda: fn(x).sum().backward()
    from attention import MultiheadAttention
    from nlgraph.adapters import mha_to_torch

    ours = MultiheadAttention(256, 8, batch_first=True)
    mod = ours if case["impl"] == "nlgraph" else mha_to_torch(ours)
    x = torch.randn(1, case["n"], 256, requires_grad=True)
    return lambda: mod(x, x, x, need_weights=False)[0].sum().backward()


def time_case(case: dict, repeats: int) -> float:
    return harness.time_call(_setup(case), repeats=repeats)


def memory_case(case: dict) -> None:
    warm = dict(case, size=8) if case["kind"] == "nonlocal" else dict(case, n=64)
    _setup(warm)()
    harness.report_peak(_setup(case))


def plan(quick: bool) -> list[dict]:
    pairs = []
    for size in ([32] if quick else [32, 64, 128]):
        for mode in ("gaussian", "embedded_gaussian", "dot_product", "concatenation"):
            pairs.append(dict(kind="nonlocal", mode=mode, size=size, ours="nlgraph", peer="materialised"))
    for n in ([1024] if quick else [1024, 4096]):
        pairs.append(dict(kind="mha", n=n, ours="nlgraph", peer="torch.nn.MHA"))
    return pairs


def describe(p: dict) -> str:
    if p["kind"] == "nonlocal":
        return f"NonLocal2d {p['mode']} {p['size']}x{p['size']}x{CHANNELS} fwd+bwd"
    return f"MultiheadAttention N={p['n']} E=256 H=8 fwd+bwd"


def main(argv=None) -> int:
    return harness.pairs_main(argv, "nonlocal", __doc__, MODULE, plan, time_case, memory_case, describe,
                              "nlgraph bench nonlocal (float32, batch 1, median time in s, peak RSS rise in MiB)")


if __name__ == "__main__":
    sys.exit(main())
