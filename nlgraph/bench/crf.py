"""``nlgraph bench crf``: dense-CRF mean-field, ours (crf.densecrf on the lattice) vs pydensecrf.

Rows:
* "cold": 5 mean-field iterations on 512x512 scikit-image photos (astronaut; camera as RGB), 2 and
  21 labels, unaries from a noisy ground truth, a smoothness (sxy=3, compat=3) and an appearance
  (sxy=80, srgb=13, compat=10) kernel: the whole pipeline (build the CRF, add both kernels, which
  builds the lattices, run inference) for ``crf.densecrf`` and for ``pydensecrf`` in the same
  process, timed alternately (ours, peer, ours, ...), their time ratio, label agreement and max |Q
  difference|, and (JSON only) each side's minor page faults per pipeline. Our lattice cache is
  cleared before every run, so both build every lattice.
* "stream": the same pipeline over a stream of distinct same-size images (the photo rolled by a
  different offset each time), time per image: our appearance lattice is rebuilt for every image,
  the smoothness lattice (positions only, the same for every 512x512 image) comes from the cache.
* the cold pipeline's stages on the astronaut photo: each kernel (lattice construction and the
  normalisation filter) and the 5 inference iterations, ours vs pydensecrf (run alternately).
* exact (``chunked``) vs lattice (``permutohedral``) messages in our facade on a 96x96 crop
  (48x48 with --quick; exact is O(N^2)): time ratio and label agreement.

The peer is pydensecrf's one path, ``pydensecrf[C++ lattice]`` (single-threaded; ours uses torch's
threads, ``--threads 1`` for core for core). The exact-vs-lattice rows compare two of our backends.

Needs the test extras (pydensecrf2, scikit-image).
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Optional

import numpy as np

from nlgraph.bench import harness


def _images():
    import skimage.data

    cam = skimage.data.camera()
    return {"astronaut": np.ascontiguousarray(skimage.data.astronaut()),
            "camera": np.ascontiguousarray(np.stack([cam] * 3, -1))}


def _unary(img, n, seed=0):
    from crf.utils import unary_from_labels

    gray = img.astype(np.float64).mean(-1)
    gt = np.minimum((gray / 256 * n).astype(np.int64), n - 1)
    rng = np.random.default_rng(seed)
    noisy = np.where(rng.random(gt.shape) < 0.3, rng.integers(0, n, gt.shape), gt)
    return unary_from_labels(noisy, n, gt_prob=0.7, zero_unsure=False)


PEER = "pydensecrf[C++ lattice]"
STAGES = ("addPairwiseGaussian", "addPairwiseBilateral", "inference(5)")


def _pipeline(dcrf, img, unary, n, backend=None, stage_times: Optional[list] = None):
    """Build the CRF, add both kernels, infer; ``stage_times`` receives the seconds of each of STAGES."""
    h, w = img.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n)
    if backend is not None:
        d.backend = backend
    d.setUnaryEnergy(unary)
    marks = [time.perf_counter()]
    d.addPairwiseGaussian(sxy=3, compat=3)
    marks.append(time.perf_counter())
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10)
    marks.append(time.perf_counter())
    q = d.inference(5)
    marks.append(time.perf_counter())
    if stage_times is not None:
        stage_times.extend(np.diff(marks))
    return np.array(q)


def _cold(dcrf, img, unary, n):
    from nlgraph.backends import permutohedral

    permutohedral.clear_cache()
    return _pipeline(dcrf, img, unary, n)


def _page_faults(fn, repeats: int = 3) -> int:
    """Median minor page faults (first touches of fresh memory, ``getrusage``) of one ``fn()`` call."""
    counts = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sorted(counts)[len(counts) // 2]


def _stream_time(dcrf, img, unary, n, count: int) -> float:
    """Seconds per image over ``count`` distinct images (one untimed image first)."""
    frames = [np.ascontiguousarray(np.roll(img, 17 * (i + 1), axis=1)) for i in range(count + 1)]
    _pipeline(dcrf, frames[0], unary, n)
    start = time.perf_counter()
    for f in frames[1:]:
        _pipeline(dcrf, f, unary, n)
    return (time.perf_counter() - start) / count


def _stages(modules, img, unary, n, repeats: int) -> list[dict[str, float]]:
    """Median seconds of each cold pipeline stage (the two kernels: lattice construction; inference),
    one dict per module, the modules run alternately (one untimed round first)."""
    from nlgraph.backends import permutohedral

    runs = [[] for _ in modules]
    for _ in range(repeats + 1):
        for dcrf, mod_runs in zip(modules, runs):
            permutohedral.clear_cache()
            mod_runs.append([])
            _pipeline(dcrf, img, unary, n, stage_times=mod_runs[-1])
    return [{stage: sorted(t)[len(t) // 2] for stage, t in zip(STAGES, zip(*mod_runs[1:]))} for mod_runs in runs]


def main(argv=None) -> int:
    args = harness.parse_args("crf", __doc__, argv)
    try:
        import pydensecrf.densecrf as peer
    except ImportError:
        print("nlgraph bench crf: pydensecrf (pip install pydensecrf2) is needed as the peer", file=sys.stderr)
        return 2
    import crf.densecrf as ours

    rows = []
    images = _images()
    # process warm-up for both sides (first-call costs, the allocator's growing mmap threshold): the
    # first timed case otherwise pays ~20-40% extra
    first = images["astronaut"] if not args.quick else np.ascontiguousarray(images["astronaut"][::4, ::4])
    for _ in range(3):
        for dcrf in (ours, peer):
            _cold(dcrf, first, _unary(first, 2), 2)
    for name, img in images.items():
        if args.quick:
            img = np.ascontiguousarray(img[::4, ::4])
        for n in (2, 21):
            unary = _unary(img, n)
            q_ours = _cold(ours, img, unary, n)
            q_peer = _pipeline(peer, img, unary, n)
            t_ours, t_peer = harness.time_pair(lambda: _cold(ours, img, unary, n),
                                               lambda: _pipeline(peer, img, unary, n), repeats=args.repeats)
            common = dict(ours="crf.densecrf", peer=PEER,
                          agreement=float((q_ours.argmax(0) == q_peer.argmax(0)).mean()),
                          max_abs_q_diff=float(np.abs(q_ours - q_peer).max()))
            size = f"{img.shape[0]}x{img.shape[1]}"
            faults = dict(ours_page_faults=_page_faults(lambda: _cold(ours, img, unary, n)),
                          peer_page_faults=_page_faults(lambda: _pipeline(peer, img, unary, n)))
            rows.append(dict(name=f"{name} {size} L={n} 5 iters, cold", ours_s=t_ours, peer_s=t_peer,
                             ratio=t_ours / t_peer, **common, **faults))
            print(f"  {rows[-1]['name']}: ours {t_ours:.3f}s pydensecrf {t_peer:.3f}s", file=sys.stderr, flush=True)
            s_ours = _stream_time(ours, img, unary, n, args.repeats + 1)
            s_peer = _stream_time(peer, img, unary, n, args.repeats + 1)
            rows.append(dict(name=f"{name} {size} L={n} 5 iters, stream", ours_s=s_ours, peer_s=s_peer,
                             ratio=s_ours / s_peer, **common))
            print(f"  {rows[-1]['name']}: ours {s_ours:.3f}s pydensecrf {s_peer:.3f}s", file=sys.stderr, flush=True)
    img = images["astronaut"] if not args.quick else np.ascontiguousarray(images["astronaut"][::4, ::4])
    for n in (2, 21):
        unary = _unary(img, n)
        st_ours, st_peer = _stages((ours, peer), img, unary, n, args.repeats)
        for stage in st_ours:
            rows.append(dict(name=f"astronaut {img.shape[0]}x{img.shape[1]} L={n} {stage}, cold",
                             ours="crf.densecrf", peer=PEER,
                             ours_s=st_ours[stage], peer_s=st_peer[stage], ratio=st_ours[stage] / st_peer[stage]))
    size = 48 if args.quick else 96
    crop = np.ascontiguousarray(images["astronaut"][100:100 + size, 200:200 + size])
    for n in (2, 21):
        unary = _unary(crop, n)
        q_lat = _cold(ours, crop, unary, n)
        q_ex = _pipeline(ours, crop, unary, n, backend="chunked")
        t_lat = harness.time_call(lambda: _cold(ours, crop, unary, n), repeats=args.repeats)
        t_ex = harness.time_call(lambda: _pipeline(ours, crop, unary, n, backend="chunked"), repeats=args.repeats)
        rows.append(dict(name=f"astronaut crop {size}x{size} L={n} 5 iters", ours="permutohedral",
                         peer="chunked (exact)",
                         ours_s=t_lat, peer_s=t_ex, ratio=t_lat / t_ex,
                         agreement=float((q_lat.argmax(0) == q_ex.argmax(0)).mean()),
                         max_abs_q_diff=float(np.abs(q_lat - q_ex).max())))
    harness.print_table("nlgraph bench crf (float32, whole pipeline incl. lattice construction, median s)", rows,
                        [("name", "case"), ("ours", "ours"), ("peer", "peer"), ("ours_s", "ours s"),
                         ("peer_s", "peer s"), ("ratio", "ours/peer"), ("agreement", "labels equal"),
                         ("max_abs_q_diff", "max |dQ|")])
    if args.json:
        harness.write_json(args.json, "crf", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
