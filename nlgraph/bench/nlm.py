"""``nlgraph bench nlm``: non-local means, ours vs scikit-image (both modes), time, PSNR, peak memory.

256x256 and 512x512 crops of scikit-image photos (camera: grey; astronaut: colour) with Gaussian
noise (sigma = 0.08), patch_size=7, patch_distance=11, h=0.08 (scikit-image's defaults except h),
float64. Ours is ``nlgraph.denoise_nl_means`` (default ``backend="auto"``: the shift-major path),
both ``fast_mode`` settings with the default cut-off (``cutoff=5.0``, scikit-image's rule of
dropping weights below exp(-5)), plus fast mode with ``cutoff=None`` (the exact formula, every
weight kept). The peers run in the same process, all timed in turns:
scikit-image's fast mode (its integral-image algorithm, its fastest path) and its classic mode (the
same Gaussian-weighted distance as our ``fast_mode=False``). Each row's ``ratio`` is against the
scikit-image path computing the same distance; ``ratio_fastest`` against scikit-image's fastest
(fast mode) whatever the distance. scikit-image runs on one core (Cython); ours is timed with one
torch thread and with torch's default (``--threads N``: that count only).

Quality anchors, PSNR on the same noisy images (their times, one run each, are for information):
OpenCV's ``fastNlMeansDenoising`` / ``fastNlMeansDenoisingColored`` on the image rounded to uint8
(templateWindowSize 7, searchWindowSize 23; h = 20 grey and h = hColor = 15 colour, the best of
h in {10, 15, 20, 25, 30} on the 256 crops), and BM3D (``bm3d`` package, sigma_psd = 0.08). A peer
that is not installed gives a row saying so. Peak memory: RSS rise of one call in a fresh
subprocess (``--no-memory`` skips). ``--quick`` uses 96x96 and skips the anchors.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

from nlgraph.bench import harness

IMAGES = {"camera grey": ("camera", None), "astronaut colour": ("astronaut", -1)}
PARAMS = dict(patch_size=7, patch_distance=11, h=0.08)
NOISE = 0.08


def _noisy(image: str, size: int):
    from skimage import data
    from skimage.util import img_as_float

    name, ca = IMAGES[image]
    clean = img_as_float(getattr(data, name)()[:size, :size])
    return clean, clean + np.random.default_rng(0).normal(0, NOISE, clean.shape), ca


def _memory_case(case: dict) -> None:
    """Subprocess body: one call of ours or scikit-image's, reporting the peak RSS rise."""
    import nlgraph

    _, noisy, ca = _noisy(case["image"], case["size"])
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    kw = dict(PARAMS, fast_mode=case["fast"], channel_axis=ca)
    if case["who"] == "ours":
        harness.report_peak(lambda: nlgraph.denoise_nl_means(noisy, **kw))
    else:
        from skimage.restoration import denoise_nl_means as sk_nl_means

        harness.report_peak(lambda: sk_nl_means(noisy, **kw))


def _anchors(image: str, size: int, clean, noisy, ca, psnr) -> list[dict]:
    rows: list[dict[str, Any]] = []
    try:
        import cv2
    except ImportError:
        rows.append(dict(name=f"{image} {size}x{size} anchor", peer="OpenCV fastNlMeansDenoising",
                         note="not installed (pip install opencv-python-headless)"))
    else:
        u8 = np.clip(np.round(noisy * 255), 0, 255).astype(np.uint8)
        if ca is None:
            def fn():
                return cv2.fastNlMeansDenoising(u8, None, h=20, templateWindowSize=7, searchWindowSize=23)
            peer = "cv2.fastNlMeansDenoising[uint8,h=20]"
        else:
            def fn():
                return cv2.fastNlMeansDenoisingColored(u8, None, h=15, hColor=15, templateWindowSize=7,
                                                       searchWindowSize=23)
            peer = "cv2.fastNlMeansDenoisingColored[uint8,h=15]"
        start = time.perf_counter()
        out = fn()
        rows.append(dict(name=f"{image} {size}x{size} anchor", peer=peer, peer_s=time.perf_counter() - start,
                         peer_threads=cv2.getNumThreads(), psnr_noisy=psnr(noisy),
                         psnr_peer=psnr(out / 255.0)))
    try:
        import bm3d
    except ImportError:
        rows.append(dict(name=f"{image} {size}x{size} anchor", peer="BM3D",
                         note="not installed (pip install bm3d)"))
    else:
        from importlib.metadata import version

        start = time.perf_counter()
        out = bm3d.bm3d(noisy, sigma_psd=NOISE) if ca is None else bm3d.bm3d_rgb(noisy, NOISE)
        rows.append(dict(name=f"{image} {size}x{size} anchor",
                         peer=f"bm3d {version('bm3d')}[sigma_psd={NOISE}]",
                         peer_s=time.perf_counter() - start, psnr_noisy=psnr(noisy),
                         psnr_peer=psnr(np.asarray(out))))
    return rows


def main(argv=None) -> int:
    args = harness.parse_args("nlm", __doc__, argv)
    try:
        from skimage.metrics import peak_signal_noise_ratio
        from skimage.restoration import denoise_nl_means as sk_nl_means
    except ImportError:
        print("nlgraph bench nlm: scikit-image is needed as the peer (pip install scikit-image)",
              file=sys.stderr)
        return 2
    if args.memory_case:
        import json

        _memory_case(json.loads(args.memory_case))
        return 0
    import nlgraph

    default_threads = torch.get_num_threads()
    thread_counts = [default_threads] if args.threads is not None else sorted({1, default_threads})
    sizes = [96] if args.quick else (args.sizes or [256, 512])
    module = "nlgraph.bench.nlm"
    rows = []
    for size in sizes:
        for image, (_, ca) in IMAGES.items():
            clean, noisy, ca = _noisy(image, size)

            def psnr(x, clean=clean):
                return float(peak_signal_noise_ratio(clean, x, data_range=1.0))

            def ours(fast, threads, cutoff="default", noisy=noisy, ca=ca):
                torch.set_num_threads(threads)
                kw = {} if cutoff == "default" else {"cutoff": cutoff}
                return nlgraph.denoise_nl_means(noisy, fast_mode=fast, channel_axis=ca, **kw, **PARAMS)

            def theirs(fast, noisy=noisy, ca=ca):
                return sk_nl_means(noisy, fast_mode=fast, channel_axis=ca, **PARAMS)

            # keys (who, fast_mode, threads, cutoff: "default" or None); scikit-image's have neither
            # threads nor cutoff
            fns: dict[tuple[str, bool, Optional[int], Optional[str]], Callable[[], object]] = {}
            for fast in (True, False):
                for th in thread_counts:
                    fns[("ours", fast, th, "default")] = functools.partial(ours, fast, th)
            exact = ("ours", True, thread_counts[0], None)
            fns[exact] = functools.partial(ours, True, thread_counts[0], None)
            fns[("skimage", True, None, None)] = functools.partial(theirs, True)
            fns[("skimage", False, None, None)] = functools.partial(theirs, False)
            outs = {k: fn() for k, fn in fns.items()}  # the warm-up, and the outputs for PSNR
            t = harness.time_round_robin(fns, repeats=args.repeats, warmup=0)
            torch.set_num_threads(default_threads)
            sk_fast = t[("skimage", True, None, None)]
            for key in fns:
                who, fast, threads, cutoff = key
                if who != "ours":
                    continue
                peer = ("skimage", fast, None, None)
                name = f"{image} {size}x{size} fast_mode={fast}" + (" cutoff=None" if cutoff is None else "")
                row: dict[str, Any] = dict(
                    name=name, threads=threads, ours="nlgraph[auto]", peer=f"skimage[fast_mode={fast}]",
                    ours_s=t[key], peer_s=t[peer], ratio=t[key] / t[peer],
                    peer_fastest="skimage[fast_mode=True]", ratio_fastest=t[key] / sk_fast,
                    psnr_noisy=psnr(noisy), psnr_ours=psnr(outs[key]), psnr_peer=psnr(outs[peer]))
                row["psnr_diff"] = row["psnr_ours"] - row["psnr_peer"]
                if not args.no_memory and cutoff == "default" and threads == thread_counts[0]:
                    case = dict(image=image, size=size, fast=fast, threads=threads)
                    row["ours_peak_mib"] = harness.measure_peak_in_subprocess(module, dict(case, who="ours"))
                    row["peer_peak_mib"] = harness.measure_peak_in_subprocess(module,
                                                                              dict(case, who="skimage"))
                rows.append(row)
                print(f"  {row['name']} threads={threads}: ours {t[key]:.3f}s skimage {t[peer]:.3f}s "
                      f"PSNR {row['psnr_ours']:.3f} vs {row['psnr_peer']:.3f}", file=sys.stderr, flush=True)
            if not args.quick:
                rows += _anchors(image, size, clean, noisy, ca, psnr)
    harness.print_table("nlgraph bench nlm (float64, median s; PSNR in dB; peak RSS rise in MiB)", rows, [
        ("name", "case"), ("threads", "threads"), ("peer", "peer"), ("ours_s", "ours s"),
        ("peer_s", "peer s"),
        ("ratio", "ours/peer"), ("ratio_fastest", "ours/skimage fast"), ("psnr_ours", "PSNR ours"),
        ("psnr_peer", "PSNR peer"), ("psnr_diff", "dPSNR"), ("ours_peak_mib", "ours MiB"),
        ("peer_peak_mib", "peer MiB"), ("note", "note")])
    if args.json:
        harness.write_json(args.json, "nlm", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
