"""``nlgraph bench nonlocal``: NonLocal2d (each mode) vs the fastest torch computation; our MHA vs torch's.

Rows:
* ``NonLocal2d`` (512 channels, inter 256, sub_sample=True as the paper's default, batch 1, float32)
  forward+backward, against the same block (same weights, same embed / W / BN) with its aggregation
  computed by the peer's fastest path: for the softmax modes (gaussian, embedded_gaussian) that is
  ``scaled_dot_product_attention`` with the block's logit scale on contiguous 4-D input, every SDPA
  kernel forced in turn and the fastest taken (``sdpa[flash-cpu]``; for the gaussian mode, whose
  values are narrower than its 512-channel queries, also flash with the values zero-padded,
  ``sdpa[flash-cpu+pad]``); dot product and concatenation have no
  fused torch kernel, so the peer is the (N x M) pairwise matrix materialised as public
  implementations compute it (for concatenation the N x M matrix of ReLU(a_i + b_j), already
  cheaper than concatenating features per pair). Feature maps 32x32, 64x64, 128x128.
* ``attention.MultiheadAttention`` vs ``torch.nn.MultiheadAttention`` (embed 256, 8 heads, batch 1,
  ``need_weights=False``: torch then runs SDPA on (B, H, L, E/H) views) forward+backward at
  N in {1024, 4096}, weights copied with ``mha_to_torch``; torch's module with each SDPA kernel
  forced in turn, the fastest named (``torch.nn.MHA[flash-cpu]``).

The JSON records each path's time and the profiled SDPA operators of one call of each side.
Time ratio = ours / peer (< 1: ours faster); memory = measured peak RSS rise per case, subprocess.
"""

from __future__ import annotations

import sys

import torch

from nlgraph.bench import harness

MODULE = "nlgraph.bench.nonlocal"
CHANNELS = 512


def peer_nonlocal(block, x, path=None):
    """The block computed by the peer: SDPA (softmax modes; ``path`` forces its kernel) or the N x M
    pairwise matrix in memory (dot product, concatenation), then the same W / BN and residual."""
    import torch.nn.functional as F

    q, k, v = block.embed(x)
    if block.mode in ("gaussian", "embedded_gaussian"):
        # 4-D (batch, heads, N, d) and contiguous rows: the fused kernels need both (the tokens are
        # transposed views of the feature maps); flash also needs v as wide as q, so the "+pad"
        # path zero-pads v (gaussian mode: d = 512 raw channels, e = 256) and drops the padding
        e = v.shape[-1]
        pad = path is not None and path.endswith("+pad")
        if pad:
            v = F.pad(v, (0, q.shape[-1] - e))
        q, k, v = (t[:, None].contiguous() for t in (q, k, v))
        with harness.sdpa_forced(path.removesuffix("+pad") if pad else path):
            y = F.scaled_dot_product_attention(q, k, v, scale=block.affinity().scale)[:, 0, :, :e]
    else:
        if block.mode == "dot_product":
            f = q @ k.transpose(1, 2) / k.shape[1]
        else:
            w = block.concat_project
            d = q.shape[-1]
            f = torch.relu((q @ w[:d])[:, :, None] + (k @ w[d:])[:, None, :]) / k.shape[1]
        y = f @ v
    y = y.transpose(1, 2).reshape(x.shape[0], block.inter_channels, *x.shape[2:])
    return block.W(y) + x


def make_step(case: dict):
    torch.manual_seed(0)
    path = case.get("path")
    if case["kind"] == "nonlocal":
        from nlgraph import NonLocal2d

        block = NonLocal2d(CHANNELS, mode=case["mode"])
        with torch.no_grad():  # a trained-looking block (W / BN non-zero)
            for p in block.parameters():
                p.normal_(0, 0.02)
        x = torch.randn(1, CHANNELS, case["size"], case["size"], requires_grad=True)
        fn = block if case["impl"] == "nlgraph" else (lambda t: peer_nonlocal(block, t, path))
        return lambda: fn(x).sum().backward()
    from attention import MultiheadAttention
    from nlgraph.adapters import mha_to_torch

    ours = MultiheadAttention(256, 8, batch_first=True)
    mod = ours if case["impl"] == "nlgraph" else mha_to_torch(ours)
    x = torch.randn(1, case["n"], 256, requires_grad=True)

    def step():
        with harness.sdpa_forced(path):
            mod(x, x, x, need_weights=False)[0].sum().backward()
    return step


def memory_case(case: dict) -> None:
    warm = dict(case, size=8) if case["kind"] == "nonlocal" else dict(case, n=64)
    make_step(warm)()
    harness.report_peak(make_step(case))


def peer_paths(pair: dict):
    """Softmax modes and MHA: each SDPA kernel forced in turn; the materialised peers have one path."""
    if pair["kind"] == "mha" or pair["mode"] == "embedded_gaussian":
        return harness.sdpa_paths("cpu")
    if pair["mode"] == "gaussian":  # q, k: the raw 512 channels, v: 256 (flash needs equal widths)
        return ["flash-cpu", "flash-cpu+pad", "math"]
    return None


def plan(quick: bool, sizes=None, dims=None) -> list[dict]:
    pairs = []
    for size in sizes or ([32] if quick else [32, 64, 128]):
        for mode in ("gaussian", "embedded_gaussian", "dot_product", "concatenation"):
            peer = "sdpa" if mode in ("gaussian", "embedded_gaussian") else "materialised"
            pairs.append(dict(kind="nonlocal", mode=mode, size=size, ours="nlgraph", peer=peer))
    for n in ([1024] if quick else [1024, 4096]):
        pairs.append(dict(kind="mha", n=n, ours="nlgraph", peer="torch.nn.MHA"))
    return pairs


def describe(p: dict) -> str:
    if p["kind"] == "nonlocal":
        return f"NonLocal2d {p['mode']} {p['size']}x{p['size']}x{CHANNELS} fwd+bwd"
    return f"MultiheadAttention N={p['n']} E=256 H=8 fwd+bwd"


def main(argv=None) -> int:
    title = "nlgraph bench nonlocal (float32, batch 1, median time in s, peak RSS rise in MiB)"
    return harness.pairs_main(argv, "nonlocal", __doc__, MODULE, plan, make_step, memory_case, describe,
                              title, peer_paths=peer_paths, kernel_pattern="scaled_dot_product")


if __name__ == "__main__":
    sys.exit(main())
