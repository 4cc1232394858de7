"""``nlgraph bench attention``: the core op on attention vs torch's fastest attention paths.

Rows (float32, CPU; every peer in its fastest form, named in the row):
* ``core``: ``nlgraph.aggregate`` (Softmax, complete graph) with ``backend="auto"`` (which takes the
  ``sdpa`` backend) and with ``backend="chunked"`` forced, vs ``scaled_dot_product_attention`` on
  4-D (1, H, N, d) input with each kernel forced in turn (``flash-cpu``, and ``math`` while its
  N x N scores fit in 256 MiB), the fastest named; forward and forward+backward; N in {1024, 4096,
  16384} (``--sizes``), d in {64, 512} (``--dims``), 1 and 8 heads. Ours gets the same 4-D tensors.
* ``mha`` (with the N = 1024 rows, i.e. when --sizes is not given or includes 1024):
  ``attention.MultiheadAttention`` vs ``torch.nn.MultiheadAttention`` with the same weights
  (E = 256, 8 heads, batch 2, N = 1024, ``need_weights=False``), forward+backward; torch's module with
  each SDPA kernel forced in turn.
* ``nonlocal`` (with the N = 1024 rows): ``NonLocal2d`` embedded_gaussian (512 channels, inter 256,
  keys max-pooled) vs the same block written directly on SDPA (the same convolutions, 4-D contiguous
  tokens, SDPA, W and BN), forward+backward, 32x32 and 64x64 maps.
* ``masked``: a bool key-padding mask (B, 1, 1, M) and a float (N, M) mask, vs SDPA with the same
  mask; ``gaussian``: the normalised Gaussian vs SDPA on q/b, k/b with the equivalent float mask
  -|k/b|^2 / 2 (for forward+backward the peer's mask is a constant, so the peer skips the bias's
  gradient that ours computes: a lower bound on the peer's cost, row "peer: constant mask"); and a
  forward+backward row whose peer computes the same gradients ("peer: same gradients"): the bias as a
  mask that requires grad (SDPA's math path) or as one more feature, [q/b, 1] . [k/b, c] zero-padded
  to a multiple of 8 (its fused kernel: ``flash-cpu+augmented``), the faster named. N = the second
  --sizes (4096 by default; the only one when one is given), d = 64, 8 heads.
* ``flex`` (with the N = 1024 rows): compiled FlexAttention (``torch.compile(flex_attention)``, CPU,
  inference only), where it compiles, vs ours, forward, N = 1024, d = 64, 8 heads.

Ratios are ours / peer (< 1: ours faster): of the medians (``ours/peer``) and of the fastest runs
(``min/min``, the steadier one on a machine shared with other jobs). Peak memory is the measured
peak-RSS rise in a fresh subprocess per case (``--no-memory`` skips it). Modest runs:
``--threads 1 --sizes 1024 4096``.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F

from nlgraph.bench import harness

MODULE = "nlgraph.bench.attention"
MATH_MAX = 1 << 26  # scores of the math peer path: 256 MiB in float32


def _inputs(b: int, h: int, n: int, d: int, grad: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen).requires_grad_(grad) for _ in range(3)]


def _run(fn, grad: bool):
    if not grad:
        with torch.no_grad():
            return fn()
    y = fn()
    y.backward(torch.ones_like(y))
    return y


def _mask(case: dict, b: int, h: int, n: int):
    gen = torch.Generator().manual_seed(7)
    if case["mask"] == "padding":
        m = torch.rand(b, 1, 1, n, generator=gen) > 0.2
        m[..., 0] = True
        return m
    return torch.randn(n, n, generator=gen)


def gaussian_same_grads(q, k, v, bw: float, path: Optional[str]):
    """The normalised Gaussian on SDPA with the key bias c = -|k/b|^2/2 differentiated too (the peer of
    the "same gradients" row): as a float mask that requires grad (``path="math"``: SDPA's math path,
    the only kernel that takes one) or as one more feature, [q/b, 1] . [k/b, c] = q/b . k/b + c,
    zero-padded to a multiple of 8 with the values alike (the fused kernel; any other ``path``)."""
    qb, kb = q / bw, k / bw
    col = -0.5 * (kb * kb).sum(-1)
    if path == "math":
        with harness.sdpa_forced(path):
            return F.scaled_dot_product_attention(qb, kb, v, attn_mask=col[..., None, :], scale=1.0)
    d = q.shape[-1]
    pad = -(d + 1) % 8
    qa = F.pad(torch.cat([qb, qb.new_ones(*qb.shape[:-1], 1)], -1), (0, pad))
    ka = F.pad(torch.cat([kb, col[..., None]], -1), (0, pad))
    va = F.pad(v, (0, d + 1 + pad - v.shape[-1]))
    with harness.sdpa_forced("flash-cpu"):
        return F.scaled_dot_product_attention(qa, ka, va, scale=1.0)[..., :v.shape[-1]]


def _core_step(case: dict):
    import nlgraph
    from nlgraph import affinity as A
    from nlgraph import graph as G

    grad = case["mode"] == "fwd+bwd"
    b, h, n, d = case.get("batch", 1), case["heads"], case["n"], case["d"]
    q, k, v = _inputs(b, h, n, d, grad)
    path = case.get("path")
    kind = case["kind"]
    mask = _mask(case, b, h, n) if kind == "masked" else None
    if case["impl"] == "sdpa":
        if kind == "gaussian" and case.get("grads") == "same":
            def peer():
                return gaussian_same_grads(q, k, v, 4.0, path)
        elif kind == "gaussian":
            bw = 4.0

            def peer():
                kb = k / bw
                col = -0.5 * (kb * kb).sum(-1)[..., None, :].detach()  # the equivalent float mask, constant
                with harness.sdpa_forced(path):
                    return F.scaled_dot_product_attention(q / bw, kb, v, attn_mask=col, scale=1.0)
        else:
            def peer():
                with harness.sdpa_forced(path):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return lambda: _run(peer, grad)
    if case["impl"] == "flex-compiled":
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda: _run(lambda: compiled(q, k, v), grad)
    aff = A.Gaussian(4.0) if kind == "gaussian" else A.Softmax()
    graph = None if mask is None else G.Mask(mask)
    backend = "chunked" if case["impl"] == "chunked" else "auto"
    return lambda: _run(lambda: nlgraph.aggregate(q, k, v, aff, graph, backend=backend), grad)


class _SDPANonLocal(torch.nn.Module):
    """An embedded-gaussian non-local block written directly on SDPA (the peer), sharing a block's weights."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        blk = self.block
        bsz, c, hh, ww = x.shape
        theta = blk.theta(x).flatten(2).transpose(1, 2)
        phi = blk.pool(blk.phi(x)).flatten(2).transpose(1, 2)
        g = blk.pool(blk.g(x)).flatten(2).transpose(1, 2)
        q, k, v = (t[:, None].contiguous() for t in (theta, phi, g))  # 4-D, unit feature stride: fused kernel
        y = F.scaled_dot_product_attention(q, k, v, scale=blk.affinity().scale)[:, 0]
        y = y.transpose(1, 2).reshape(bsz, blk.inter_channels, hh, ww)
        return blk.W(y) + x


def _module_step(case: dict):
    torch.manual_seed(0)
    path = case.get("path")
    if case["kind"] == "nonlocal":
        from nlgraph import NonLocal2d

        block = NonLocal2d(512, mode="embedded_gaussian")
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0, 0.02)
        mod: torch.nn.Module = block if case["impl"] == "nlgraph" else _SDPANonLocal(block)
        x = torch.randn(1, 512, case["size"], case["size"], requires_grad=True)

        def nonlocal_step():
            with harness.sdpa_forced(path):
                mod(x).sum().backward()
        return nonlocal_step
    from attention import MultiheadAttention
    from nlgraph.adapters import mha_to_torch

    ours = MultiheadAttention(256, 8, batch_first=True)
    mod = ours if case["impl"] == "nlgraph" else mha_to_torch(ours)
    x = torch.randn(case.get("batch", 2), case["n"], 256, requires_grad=True)

    def mha_step():
        with harness.sdpa_forced(path):
            mod(x, x, x, need_weights=False)[0].sum().backward()
    return mha_step


def make_step(case: dict):
    if case["kind"] in ("mha", "nonlocal"):
        return _module_step(case)
    return _core_step(case)


def memory_case(case: dict) -> None:
    warm = dict(case, size=8) if case["kind"] == "nonlocal" else dict(case, n=64)
    make_step(warm)()
    harness.report_peak(make_step(case))


def peer_paths(pair: dict):
    if pair["peer"] in ("flex-compiled",):
        return None
    if pair["kind"] == "nonlocal":
        return ["flash-cpu", "math"]
    if pair.get("grads") == "same":  # the Gaussian with the bias's gradient: features, or a mask with grad
        n = pair["n"]
        return ["flash-cpu+augmented"] + (["math"] if pair["heads"] * n * n <= MATH_MAX else [])
    n = pair.get("n", 1024)
    heads = pair.get("heads", 8) * pair.get("batch", 1)
    return ["flash-cpu"] + (["math"] if heads * n * n <= MATH_MAX else [])


def plan(quick: bool, sizes=None, dims=None) -> list[dict]:
    sizes = sizes or ([1024] if quick else [1024, 4096, 16384])
    dims = dims or ([64] if quick else [64, 512])
    pairs = []
    for n in sizes:
        for d in dims:
            for heads in (1, 8):
                for mode in ("fwd", "fwd+bwd"):
                    for ours in ("auto", "chunked"):
                        pairs.append(dict(kind="core", n=n, d=d, heads=heads, mode=mode, ours=ours,
                                          peer="sdpa"))
    if 1024 in sizes:  # the module rows have fixed sizes: run with the N = 1024 rows (or by default)
        pairs.append(dict(kind="mha", n=1024, batch=2, ours="nlgraph", peer="torch.nn.MHA"))
        for size in ([32] if quick else [32, 64]):
            pairs.append(dict(kind="nonlocal", size=size, ours="nlgraph", peer="sdpa-block"))
    n = sizes[min(1, len(sizes) - 1)] if not quick else sizes[0]
    for mode in ("fwd", "fwd+bwd"):
        for mask in ("padding", "float"):
            pairs.append(dict(kind="masked", mask=mask, n=n, d=64, heads=8, mode=mode, ours="auto",
                              peer="sdpa"))
        pairs.append(dict(kind="gaussian", n=n, d=64, heads=8, mode=mode, ours="auto", peer="sdpa"))
    pairs.append(dict(kind="gaussian", n=n, d=64, heads=8, mode="fwd+bwd", ours="auto", peer="sdpa",
                      grads="same"))
    if _flex_available() and 1024 in sizes:
        pairs.append(dict(kind="flex", n=sizes[0], d=64, heads=8, mode="fwd", ours="auto",
                          peer="flex-compiled"))
    return pairs


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def describe(p: dict) -> str:
    kind = p["kind"]
    if kind == "mha":
        return f"MultiheadAttention B={p['batch']} N={p['n']} E=256 H=8 fwd+bwd"
    if kind == "nonlocal":
        return f"NonLocal2d embedded_gaussian {p['size']}x{p['size']}x512 fwd+bwd"
    what = {"core": "softmax", "masked": f"{p.get('mask')} mask", "gaussian": "Gaussian",
            "flex": "softmax"}[kind]
    peer = ""
    if kind == "gaussian" and p["mode"] == "fwd+bwd":
        peer = " (peer: same gradients)" if p.get("grads") == "same" else " (peer: constant mask)"
    return f"{what} {p['ours']} H={p['heads']} N={p['n']} d={p['d']} {p['mode']}{peer}"


COLUMNS = [("name", "case"), ("peer", "peer"), ("ours_s", "ours s"), ("peer_s", "peer s"),
           ("ratio", "ours/peer"), ("ratio_min", "min/min"), ("ours_peak_mib", "ours MiB"),
           ("peer_peak_mib", "peer MiB")]


def main(argv=None) -> int:
    return harness.pairs_main(argv, "attention", __doc__, MODULE, plan, make_step, memory_case, describe,
                              "nlgraph bench attention (float32, median time in s, peak RSS rise in MiB)",
                              peer_paths=peer_paths, kernel_pattern="scaled_dot_product", columns=COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
