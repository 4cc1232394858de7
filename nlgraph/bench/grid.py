"""``nlgraph bench grid``: grid graphs (criss-cross, 2-D windows) vs the peers, batch 1, float32.

Sections (``SECTIONS``; each is a function ``plan(quick, sizes) -> pairs`` plus its rows in
``make_step``; a new section, e.g. non-local means, is one entry there and one branch in
``make_step``):

* ``criss-cross``: CCNet's criss-cross attention (query/key width C / 8, value width C, scale 1)
  forward+backward on 64x64 (C = 256) and 97x97 (C = 512) maps, against an einsum criss-cross
  module written here as mmcv's ``CrissCrossAttention`` computes it (column and row energies by
  einsum, the self term of the column part at -inf, one softmax over the concatenation, two einsum
  products); both take the same (B, C, H, W) maps and give (B, C, H, W). Ours is
  ``nlgraph.aggregate(..., CrissCross((H, W)))`` on their token views, dispatch choosing the backend
  (named in the row). Backend-choice rows (not peers): grid vs pyg and grid vs chunked at 64x64.
* ``window``: 2-D window attention, ``LocalWindow((S, S), r)`` (clipped at the borders), 4 heads of
  width d, S in {64, 128}, r in {3, 6}, d in {32, 64}: forward against FlexAttention compiled for the
  CPU (``torch.compile(flex_attention)`` with the window as a block mask, ``create_block_mask``
  outside the timing), forward+backward against ``scaled_dot_product_attention`` with the window
  as a dense bool mask (every kernel forced in turn, the fastest named; S = 64 only: the mask is
  N^2); grid against the chunked backend forward and forward+backward (a backend choice, the
  measurement behind grid's ``prefer``), for the shifted windows too (S = 64), and on a 1-D
  sequence of 16384 tokens, r = 3 (the peak-memory row: O(N window), not O(N^2)).
  Where NATTEN installs (``pip install natten``; on a machine without its compiled library it runs
  on CPU through FlexAttention, forward only, uncompiled: its compiled Flex backend is CUDA-only),
  a forward row against ``natten.functional.na2d`` with NATTEN's own window (``kernel_size = 2 r +
  1``, every query keeping the full window: ours ``LocalWindow(..., border="shift")``), inputs in
  its heads-last layout (B, S, S, heads, d) made outside the timing; S = 64 only (its CPU path
  materialises the N^2 scores).

Time ratio = ours / peer (< 1: ours faster); memory = measured peak RSS rise per case, in a
subprocess (the harness). ``--sizes`` picks the window map sides (default 64 128).
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import torch

from nlgraph.bench import harness

MODULE = "nlgraph.bench.grid"


# ------------------------------------------------------------------------------------------ peers


def einsum_criss_cross(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Criss-cross attention as mmcv's CrissCrossAttention computes it, on (B, d, H, W) / (B, C, H, W)."""
    h = q.shape[2]
    energy_h = torch.einsum("bchw,bciw->bwhi", q, k)  # same column: (B, W, H, H')
    energy_h = energy_h + torch.diag(torch.full((h,), -math.inf, dtype=q.dtype, device=q.device))
    energy_w = torch.einsum("bchw,bchj->bhwj", q, k)  # same row: (B, H, W, W')
    att = torch.softmax(torch.cat([energy_h.permute(0, 2, 1, 3), energy_w], dim=-1), dim=-1)
    out = torch.einsum("bhwi,bciw->bchw", att[..., :h], v)
    return out + torch.einsum("bhwj,bchj->bchw", att[..., h:], v)


def _window_mask_mod(side: int, radius: int):
    def mask_mod(b, h, qi, ki):
        return ((qi // side - ki // side).abs() <= radius) & ((qi % side - ki % side).abs() <= radius)
    return mask_mod


# ------------------------------------------------------------------------------------------ cases


def _cc_step(case: dict) -> Callable[[], object]:
    import nlgraph
    from nlgraph import graph as G

    hw, c = case["hw"], case["channels"]
    d = c // 8
    gen = torch.Generator().manual_seed(0)
    q = (0.3 * torch.randn(1, d, hw, hw, generator=gen)).requires_grad_(True)
    k = (0.3 * torch.randn(1, d, hw, hw, generator=gen)).requires_grad_(True)
    v = torch.randn(1, c, hw, hw, generator=gen).requires_grad_(True)
    dy = torch.randn(1, c, hw, hw, generator=gen)
    impl = case["impl"]
    if impl == "einsum":
        fn = lambda: einsum_criss_cross(q, k, v)  # noqa: E731
    else:
        tokens = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731

        def fn():
            y = nlgraph.aggregate(tokens(q), tokens(k), tokens(v), nlgraph.Softmax(scale=1.0),
                                  G.CrissCross((hw, hw)), backend=impl)
            return y.transpose(1, 2).reshape(1, c, hw, hw)

    def step():
        fn().backward(dy)
        for t in (q, k, v):
            t.grad = None

    return step


def _window_step(case: dict) -> Callable[[], object]:
    import nlgraph
    from nlgraph import graph as G

    side, r, d, heads = case["side"], case["radius"], case["d"], case["heads"]
    ndim = case.get("ndim", 2)
    n = side ** ndim
    gen = torch.Generator().manual_seed(0)
    train = case["mode"] == "fwd+bwd"
    q, k, v = (torch.randn(1, heads, n, d, generator=gen).requires_grad_(train) for _ in range(3))
    dy = torch.randn(1, heads, n, d, generator=gen)
    impl, path = case["impl"], case.get("path")
    border = case.get("border", "clip")
    if impl == "natten":
        from natten.functional import na2d

        def heads_last(t: torch.Tensor) -> torch.Tensor:
            return t.detach().view(1, heads, side, side, d).permute(0, 2, 3, 1, 4).contiguous()

        qn, kn, vn = heads_last(q), heads_last(k), heads_last(v)
        fn = lambda: na2d(qn, kn, vn, kernel_size=2 * r + 1, torch_compile=path == "compiled")  # noqa: E731
    elif impl == "flex[compiled]":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(_window_mask_mod(side, r), None, None, n, n, device="cpu")
        flex = torch.compile(flex_attention, dynamic=False)
        fn = lambda: flex(q, k, v, block_mask=block_mask)  # noqa: E731
    elif impl == "sdpa":
        import torch.nn.functional as F

        mask = G.LocalWindow((side, side), r).dense(n, n)[None, None]

        def fn():
            with harness.sdpa_forced(path):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        graph = _window_graph(side, r, border, ndim)
        fn = lambda: nlgraph.aggregate(q, k, v, nlgraph.Softmax(), graph, backend=impl)  # noqa: E731

    if not train:
        def forward_step():
            with torch.no_grad():
                return fn()
        return forward_step

    def step():
        fn().backward(dy)
        for t in (q, k, v):
            t.grad = None

    return step


def _window_graph(side: int, radius: int, border: str, ndim: int = 2):
    from nlgraph import graph as G

    if border == "shift":  # NATTEN's window: 2 r + 1 keys per axis for every query
        return G.LocalWindow((side,) * ndim, kernel_size=2 * radius + 1, border="shift")
    return G.LocalWindow((side,) * ndim, radius)


def natten_available() -> bool:
    """Whether ``natten`` imports (it is not a dependency: the NATTEN rows appear where it installs)."""
    try:
        import natten.functional  # noqa: F401
    except ImportError:
        return False
    return True


def _auto(kind: str, **kw) -> str:
    """The backend automatic dispatch picks for a case (named in the row)."""
    import nlgraph
    from nlgraph import graph as G

    if kind == "criss-cross":
        hw, c = kw["hw"], kw["channels"]
        q, v = torch.zeros(1, hw * hw, c // 8), torch.zeros(1, hw * hw, c)
        return nlgraph.select_backend(q, q, v, nlgraph.Softmax(scale=1.0), G.CrissCross((hw, hw)))[0]
    ndim = kw.get("ndim", 2)
    q = torch.zeros(1, kw["heads"], kw["side"] ** ndim, kw["d"], requires_grad=kw["mode"] == "fwd+bwd")
    graph = _window_graph(kw["side"], kw["radius"], kw.get("border", "clip"), ndim)
    return nlgraph.select_backend(q, q, q, nlgraph.Softmax(), graph)[0]


def plan_criss_cross(quick: bool, sizes=None) -> list[dict]:
    shapes = [(32, 128)] if quick else [(64, 256), (97, 512)]
    pairs = []
    for hw, c in shapes:
        ours = _auto("criss-cross", hw=hw, channels=c)
        pairs.append(dict(section="criss-cross", hw=hw, channels=c, ours=ours, peer="einsum"))
    hw, c = shapes[0]
    for other in ("pyg", "chunked"):  # the backend choice behind grid's prefer (not peers)
        pairs.append(dict(section="criss-cross", hw=hw, channels=c, ours="grid", peer=other))
    return pairs


def plan_window(quick: bool, sizes=None) -> list[dict]:
    sides = sizes or ([32] if quick else [64, 128])
    radii, dims = ([3], [32]) if quick else ([3, 6], [32, 64])
    natten = natten_available()
    pairs = []
    for side in sides:
        for r in radii:
            for d in dims:
                base = dict(section="window", side=side, radius=r, d=d, heads=4)
                fwd, train = dict(base, mode="fwd"), dict(base, mode="fwd+bwd")
                pairs.append(dict(fwd, ours=_auto("window", **fwd), peer="flex[compiled]"))
                if side <= 64:  # the dense mask is N^2
                    pairs.append(dict(train, ours=_auto("window", **train), peer="sdpa"))
                # the backend choice behind grid's prefer (not peers), with and without gradients
                pairs += [dict(train, ours="grid", peer="chunked"), dict(fwd, ours="grid", peer="chunked")]
                if side > 64:
                    continue
                shift = dict(base, border="shift")
                if natten:  # its CPU path materialises the N^2 scores
                    pairs.append(dict(shift, mode="fwd", ours=_auto("window", **shift, mode="fwd"),
                                      peer="natten"))
                pairs += [dict(shift, mode=m, ours="grid", peer="chunked") for m in ("fwd", "fwd+bwd")]
    if not quick:  # a long 1-D sequence: the grid backend's scores stay O(N window) (peak memory)
        seq = dict(section="window", ndim=1, side=16384, radius=3, d=32, heads=4)
        for m in ("fwd", "fwd+bwd"):
            pairs.append(dict(seq, mode=m, ours="grid", peer="chunked"))
    if not natten:
        print("  window: no NATTEN rows, natten is not installed (pip install natten)", file=sys.stderr)
    return pairs


#: name -> plan(quick, sizes) of the section's pairs; make_step dispatches on the pair's "section"
SECTIONS: dict[str, Callable[..., list[dict]]] = {
    "criss-cross": plan_criss_cross,
    "window": plan_window,
}
STEPS: dict[str, Callable[[dict], Callable[[], object]]] = {
    "criss-cross": _cc_step,
    "window": _window_step,
}


def make_step(case: dict) -> Callable[[], object]:
    return STEPS[case["section"]](case)


def plan(quick: bool, sizes=None, dims=None) -> list[dict]:
    return [p for section in SECTIONS.values() for p in section(quick, sizes=sizes)]


def peer_paths(pair: dict):
    if pair["peer"] == "natten":  # the compiled path is tried and left out (named) where it cannot run
        return ["compiled", "eager"]
    return harness.sdpa_paths("cpu") if pair["peer"] == "sdpa" else None


def describe(p: dict) -> str:
    if p["section"] == "criss-cross":
        return f"criss-cross {p['hw']}x{p['hw']} C={p['channels']} fwd+bwd"
    border = " shift" if p.get("border") == "shift" else ""
    if p.get("ndim", 2) == 1:
        return f"window 1-D N={p['side']} r={p['radius']} d={p['d']} h={p['heads']} {p['mode']}"
    return f"window{border} {p['side']}^2 r={p['radius']} d={p['d']} h={p['heads']} {p['mode']}"


def memory_case(case: dict) -> None:
    step = make_step(case)
    step()  # compile / warm up outside the measured call
    harness.report_peak(step)


def main(argv=None) -> int:
    return harness.pairs_main(argv, "grid", __doc__, MODULE, plan, make_step, memory_case, describe,
                              "nlgraph bench grid (float32, batch 1, median time in s, peak RSS rise in MiB)",
                              peer_paths=peer_paths, kernel_pattern="scaled_dot_product",
                              columns=harness.COLUMNS[:1] + [("ours", "ours")] + harness.COLUMNS[1:])


if __name__ == "__main__":
    sys.exit(main())
