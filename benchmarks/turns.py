"""In-turns timings behind the CHANGELOG's and docstrings' smaller measurements (``nlgraph bench`` holds
the tables). Run from the repository root, e.g. ``OMP_NUM_THREADS=1 python benchmarks/turns.py crf
9d06982 21``:

* ``crf REV [LABELS]``: the cold 512x512 astronaut pipeline (unary, both kernels, 5 iterations) with
  this tree's ``crf.densecrf``, the one at git revision REV (loaded from ``git show``) and pydensecrf,
  in turns, medians of 5 stages each; prints max |dQ| between the two of ours.
* ``exp``: the compiled shifted exp against torch's ``sub_`` + ``exp_`` per tile size (the minimum
  of 5 x 3000 calls).
* ``smalln [N]``: forced ``chunked`` against automatic dispatch on (1, N, 8) softmax attention.
* ``filters [VALUES]``: one lattice filter's products (splat, a blur, slice, the whole filter) of
  VALUES columns on the photo's two lattices (run it in worktrees to compare lattices).
* ``volume``: the volume bench's cold pipeline by stage, ours and pydensecrf alternating (3 rounds).
* ``photo [LABELS] [ROUNDS]``: the same for the cold 512x512 astronaut pipeline (2 labels, 11 rounds),
  with the median over rounds of ours / pydensecrf.
* ``stream [LABELS]``: our pipeline per image over a stream of distinct same-size images.
* ``stages [photo|volume]``: the CPU lattice builder's kernels on the 512x512 photo's positions and
  bilateral lattices, or the volume bench's 64x128x128 ones (run it in a worktree of another revision
  to compare builders).

torch runs the thread count it starts with (``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import collections
import importlib.util
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def _photo() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:512, :512])


def _staged(lib: Any, img: np.ndarray, un: np.ndarray, labels: int, cold: bool = True
            ) -> tuple[float, tuple[float, float], float, np.ndarray]:
    """One run of the bench's 512x512 pipeline (``nlgraph.bench.crf._pipeline``) with ``lib``'s
    DenseCRF2D, the lattice cache cleared first where ``cold``: seconds of (construction + unary,
    (smoothness add, appearance add), inference(5)) and Q."""
    from nlgraph.backends import permutohedral
    from nlgraph.bench.crf import _pipeline

    if cold:
        permutohedral.clear_cache()
    setup: list[float] = []
    stages: list[float] = []
    q = _pipeline(lib, img, un, labels, stage_times=stages, setup_times=setup)
    return setup[0], (stages[0], stages[1]), stages[2], q


def crf(rev: str, labels: int = 21) -> None:
    import pydensecrf.densecrf as peer

    import crf.densecrf as new
    from nlgraph.bench.crf import _unary

    src = subprocess.run(["git", "show", f"{rev}:crf/densecrf.py"], check=True, capture_output=True,
                         text=True).stdout
    path = Path(tempfile.mkdtemp()) / "densecrf_at_rev.py"
    path.write_text(src.replace("from ._layout import", "from crf._layout import"))
    spec = importlib.util.spec_from_file_location("densecrf_at_rev", path)
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    img = _photo()
    un = _unary(img, labels)
    stages: dict[str, list[np.ndarray]] = {"this tree": [], rev: [], "pydensecrf": []}
    q = {}
    for rep in range(6):
        for name, mod in (("this tree", new), (rev, old), ("pydensecrf", peer)):
            unary, kernels, inference, q[name] = _staged(mod, img, un, labels)
            if rep:  # the first round warms up
                stages[name].append(np.array([unary, kernels[0] + kernels[1], inference]) * 1e3)
    print(f"{labels} labels, {torch.get_num_threads()} threads; max |dQ| this tree vs {rev}: "
          f"{np.abs(q['this tree'] - q[rev]).max():.2e}")
    total = {}
    for name, st in stages.items():
        med = np.median(np.array(st), 0)
        total[name] = float(np.median(np.array(st).sum(1)))
        print(f"  {name:12s} total {total[name]:6.1f} ms (unary {med[0]:5.1f}, adds {med[1]:5.1f}, "
              f"inference {med[2]:6.1f})")
    print(f"  ratio to pydensecrf: this tree {total['this tree'] / total['pydensecrf']:.3f}, "
          f"{rev} {total[rev] / total['pydensecrf']:.3f}")


def _min_us(fn: Callable[[], Any], reps: int = 3000) -> float:
    for _ in range(reps // 10):
        fn()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e6


def exp() -> None:
    from nlgraph.backends import _exp_jit

    _exp_jit.MIN_NUMEL = 0  # the kernel on every size here
    def refill(s: torch.Tensor) -> torch.Tensor:
        return s.copy_(s)  # each call starts from a written tile, as in the tile loop

    def compiled(s: torch.Tensor, c: torch.Tensor) -> None:
        _exp_jit.exp_shifted_(refill(s), c)

    def torchs(s: torch.Tensor, c: torch.Tensor) -> None:
        refill(s).sub_(c[..., None]).exp_()

    for n in (16, 32, 64, 96, 128, 256):
        s = torch.randn(1, n, n)
        c = s.amax(-1)
        base = _min_us(partial(refill, s))
        jit, ref = (_min_us(partial(fn, s, c)) - base for fn in (compiled, torchs))
        print(f"{n} x {n}: compiled {jit:6.1f} us, torch sub_ + exp_ {ref:6.1f} us "
              f"({torch.get_num_threads()} threads)")


def smalln(n: int = 16) -> None:
    import nlgraph

    q, k, v = (torch.randn(1, n, 8) for _ in range(3))
    for name, backend in (("forced chunked", "chunked"), ("auto", "auto")):
        us = _min_us(partial(nlgraph.aggregate, q, k, v, nlgraph.Softmax(), backend=backend), 2000)
        print(f"N={n} d=8 {name:15s} {us:6.1f} us ({torch.get_num_threads()} threads)")


def photo(labels: int = 2, rounds: int = 11) -> None:
    """The cold 512x512 astronaut pipeline by stage, ours and pydensecrf alternating (``rounds``
    rounds after one warm-up): the unary, each ``addPairwise*`` call, inference(5); the minimum and
    median of each stage (ms) and the median over rounds of ours / pydensecrf's total (run it in
    worktrees of two revisions, in turns, to compare them)."""
    import pydensecrf.densecrf as peer

    import crf.densecrf as ours
    from nlgraph.bench.crf import _unary

    img = _photo()
    un = _unary(img, labels)
    times: dict[str, list[np.ndarray]] = {"ours": [], "pydensecrf": []}
    for rep in range(rounds + 1):
        for name, lib in (("ours", ours), ("pydensecrf", peer)):
            unary, kernels, inference, _ = _staged(lib, img, un, labels)
            if rep:  # the first round warms up
                times[name].append(np.array([unary, *kernels, inference]) * 1e3)
    print(f"{labels} labels, {torch.get_num_threads()} threads, {rounds} rounds (ms: min / median)")
    for name, st in times.items():
        a = np.array(st)
        cells = ", ".join(f"{stage} {a[:, i].min():.1f} / {np.median(a[:, i]):.1f}"
                          for i, stage in enumerate(("unary", "gaussian add", "bilateral add", "inference")))
        print(f"  {name:10s} total {a.sum(1).min():.1f} / {np.median(a.sum(1)):.1f}: {cells}")
    ratio = np.array(times["ours"]).sum(1) / np.array(times["pydensecrf"]).sum(1)
    print(f"  ours / pydensecrf per round: median {np.median(ratio):.3f} (min {ratio.min():.3f}, "
          f"max {ratio.max():.3f})")


def stream(labels: int = 2, images: int = 25) -> None:
    """Our pipeline over a stream of distinct same-size images (the 512x512 astronaut rolled by a
    different offset each time; the lattice cache kept, as a long-running process keeps it): the
    time per image after three warm-up images, minimum and median (run it in worktrees of two
    revisions, in turns, to compare them)."""
    import crf.densecrf as ours
    from nlgraph.bench.crf import _unary

    img0 = _photo()
    un = _unary(img0, labels)
    times = []
    for r in range(images):
        img = np.ascontiguousarray(np.roll(img0, 7 * r + 1, axis=1))
        unary, kernels, inference, _ = _staged(ours, img, un, labels, cold=False)
        times.append(unary + sum(kernels) + inference)
    per = np.array(times[3:]) * 1e3
    print(f"{labels} labels, {torch.get_num_threads()} threads: {per.min():.1f} ms min, "
          f"{np.median(per):.1f} ms median per image ({len(per)} images)")


def volume() -> None:
    """The volume bench's cold pipeline by stage, ours and pydensecrf's generic DenseCRF alternating
    (three rounds): each kernel's addPairwiseEnergy (its lattice build and normalisation) and
    inference(5), seconds per round and the minimum of each stage."""
    import pydensecrf.densecrf as peer

    import crf.densecrf as ours
    from crf.utils import create_pairwise_bilateral, create_pairwise_gaussian
    from nlgraph.backends import permutohedral
    from nlgraph.bench.crf import (
        _VOLUME_APPEAR_W,
        _VOLUME_INTENSITY,
        _VOLUME_SMOOTH,
        _VOLUME_SMOOTH_W,
        _VOLUME_SPATIAL,
        _ct_volume,
    )

    vol, _, unary = _ct_volume((64, 128, 128))
    feats = (create_pairwise_gaussian((_VOLUME_SMOOTH,) * 3, vol.shape),
             create_pairwise_bilateral((_VOLUME_SPATIAL,) * 3, (_VOLUME_INTENSITY,), vol, chdim=-1))
    rounds: dict[str, list[np.ndarray]] = {"ours": [], "pydensecrf": []}
    for _ in range(3):
        for name, lib in (("ours", ours), ("pydensecrf", peer)):
            permutohedral.clear_cache()
            d = lib.DenseCRF(unary.shape[1], 2)
            d.setUnaryEnergy(unary)
            t = [time.perf_counter()]
            d.addPairwiseEnergy(feats[0], compat=_VOLUME_SMOOTH_W)
            t.append(time.perf_counter())
            d.addPairwiseEnergy(feats[1], compat=_VOLUME_APPEAR_W)
            t.append(time.perf_counter())
            d.inference(5)
            t.append(time.perf_counter())
            rounds[name].append(np.diff(t))
    for name, r in rounds.items():
        print(f"{name:10s} (smoothness add, appearance add, inference) per round: "
              f"{np.round(np.array(r), 3).tolist()}; minimum {np.round(np.min(r, 0), 3).tolist()} s "
              f"({torch.get_num_threads()} threads)")


def _filter_parts(lat: Any, v: torch.Tensor, mm: Callable[..., torch.Tensor]) -> dict[str, Callable[[], Any]]:
    ordered = v if lat.splat_order is None else v[lat.splat_order]
    x = mm(lat.splat, ordered)
    return {"splat": lambda: mm(lat.splat, ordered), "one blur": lambda: mm(lat.blurs[0], x),
            "slice": lambda: mm(lat.slice, x), "filter": lambda: lat.filter(v)}


def filters(values: str = "21") -> None:
    """One filter of ``values`` columns on the photo's two lattices: its splat, one blur, its slice and
    the whole filter (medians of 9), for comparing lattices built by two revisions (run in worktrees)."""
    from nlgraph.backends.permutohedral import build_lattice
    from nlgraph.backends.permutohedral.csr import _csr_mm

    img = _photo().astype(np.float32)
    yy, xx = np.mgrid[:512, :512].astype(np.float32)
    feats = {"positions": np.stack([xx / 3, yy / 3], -1),
             "bilateral": np.concatenate([np.stack([xx / 80, yy / 80], -1), img / np.float32(13)], -1)}

    def median_ms(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(9):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return float(np.median(times)) * 1e3

    for name, f in feats.items():
        p = torch.from_numpy(np.ascontiguousarray(f.reshape(-1, f.shape[-1])))[None]
        lat = build_lattice(p, p, True)
        v = torch.randn(p.shape[1], int(values), generator=torch.Generator().manual_seed(0))
        parts = _filter_parts(lat, v, _csr_mm)
        print(f"{name} ({torch.get_num_threads()} threads, V={lat.num_vertices}): "
              + ", ".join(f"{k} {median_ms(fn):.2f} ms" for k, fn in parts.items()))


def stages(what: str = "photo") -> None:
    from nlgraph.backends.permutohedral import _jit, build_lattice

    if what == "volume":  # the bench's CT-like volume and its two kernels' features
        from crf.utils import create_pairwise_bilateral, create_pairwise_gaussian
        from nlgraph.bench.crf import _VOLUME_INTENSITY, _VOLUME_SMOOTH, _VOLUME_SPATIAL, _ct_volume

        vol = _ct_volume((64, 128, 128))[0]
        sm, sp = (_VOLUME_SMOOTH,) * 3, (_VOLUME_SPATIAL,) * 3
        feats = {"positions": create_pairwise_gaussian(sm, vol.shape).T,
                 "bilateral": create_pairwise_bilateral(sp, (_VOLUME_INTENSITY,), vol, chdim=-1).T}
    else:
        img = _photo().astype(np.float32)
        yy, xx = np.mgrid[:512, :512].astype(np.float32)
        feats = {"positions": np.stack([xx / 3, yy / 3], -1),
                 "bilateral": np.concatenate([np.stack([xx / 80, yy / 80], -1), img / np.float32(13)], -1)}
    spent: collections.Counter = collections.Counter()
    run = _jit._run

    def timed(fn, bounds, threads):
        """_jit._run, timed under the name of the kernel its part function calls: a module-level
        ``_kernel``, or ``elevate`` / ``vertices`` (the per-d kernels, closure variables of build)."""
        code = fn.__code__
        label = next((n for n in code.co_names if n.startswith("_")),
                     next((n for n in code.co_freevars if n in ("elevate", "vertices")), "?"))
        t = time.perf_counter_ns()
        out = run(fn, bounds, threads)
        spent[label] += time.perf_counter_ns() - t
        return out

    _jit._run = timed
    try:
        for name, f in feats.items():
            p = torch.from_numpy(np.ascontiguousarray(f.reshape(1, -1, f.shape[-1])))
            for _ in range(2):
                build_lattice(p, p, True)
            spent.clear()
            t = time.perf_counter_ns()
            for _ in range(7):
                build_lattice(p, p, True)
            total = (time.perf_counter_ns() - t) / 7e6
            print(f"{name}: build_lattice {total:.1f} ms ({torch.get_num_threads()} threads)")
            for part, ns in spent.most_common():
                print(f"  {part:14s} {ns / 7e6:6.2f} ms")
    finally:
        _jit._run = run


if __name__ == "__main__":
    what, *args = sys.argv[1:] or ["--help"]
    commands: dict[str, Callable[..., None]] = {"crf": lambda rev, labels="21": crf(rev, int(labels)),
                                                "exp": exp, "smalln": lambda n="16": smalln(int(n)),
                                                "stages": stages,  # stages [photo|volume]
                                                "filters": filters,  # filters [VALUES]
                                                "volume": volume,
                                                "photo": lambda labels="2", rounds="11": photo(int(labels),
                                                                                             int(rounds)),
                                                "stream": lambda labels="2": stream(int(labels))}
    if what not in commands:
        print(__doc__)
        sys.exit(0 if what == "--help" else 2)
    commands[what](*args)
