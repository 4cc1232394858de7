"""``nlgraph bench nlm``: non-local means, ours (the core op) vs scikit-image, time and PSNR.

256x256 and 512x512 crops of scikit-image photos (camera: grey; astronaut: colour) with Gaussian
noise (sigma = 0.08), patch_size=7, patch_distance=11, h=0.08 (scikit-image's defaults except h),
both ``fast_mode`` settings; ours and scikit-image in the same process, timed alternately. The
peer is scikit-image's own path for the same computation (``skimage[fast_mode=True]``: its
integral-image algorithm; ``skimage[fast_mode=False]``: its classic Gaussian-weighted distance; the
two weigh patches differently, so each is compared with our result of the same mode). scikit-image's
NLM runs on one core (Cython); ours uses torch's threads (``--threads 1`` for core for core).
``--quick`` uses 96x96.
"""

from __future__ import annotations

import sys

import numpy as np

from nlgraph.bench import harness


def main(argv=None) -> int:
    args = harness.parse_args("nlm", __doc__, argv)
    try:
        from skimage import data, img_as_float
        from skimage.metrics import peak_signal_noise_ratio
        from skimage.restoration import denoise_nl_means as sk_nl_means
    except ImportError:
        print("nlgraph bench nlm: scikit-image is needed as the peer (pip install scikit-image)", file=sys.stderr)
        return 2
    import nlgraph

    sizes = [96] if args.quick else [256, 512]
    rows = []
    for size in sizes:
        for name, img, ca in (("camera grey", data.camera(), None), ("astronaut colour", data.astronaut(), -1)):
            clean = img_as_float(img[:size, :size])
            noisy = clean + np.random.default_rng(0).normal(0, 0.08, clean.shape)
            for fast in (True, False):
                kw = dict(patch_size=7, patch_distance=11, h=0.08, fast_mode=fast, channel_axis=ca)
                ours = nlgraph.denoise_nl_means(noisy, **kw)
                theirs = sk_nl_means(noisy, **kw)
                # both ran once above (the warm-up); then alternately
                t_ours, t_peer = harness.time_pair(lambda: nlgraph.denoise_nl_means(noisy, **kw),
                                                   lambda: sk_nl_means(noisy, **kw), repeats=args.repeats, warmup=0)
                psnr = lambda x: peak_signal_noise_ratio(clean, x, data_range=1.0)  # noqa: E731
                rows.append(dict(name=f"{name} {size}x{size} fast_mode={fast}", ours="nlgraph",
                                 peer=f"skimage[fast_mode={fast}]",
                                 ours_s=t_ours, peer_s=t_peer, ratio=t_ours / t_peer, psnr_noisy=psnr(noisy),
                                 psnr_ours=psnr(ours), psnr_peer=psnr(theirs)))
                print(f"  {rows[-1]['name']}: ours {t_ours:.2f}s skimage {t_peer:.2f}s", file=sys.stderr, flush=True)
    harness.print_table("nlgraph bench nlm (float64, median s; PSNR in dB)", rows, [
        ("name", "case"), ("peer", "peer"), ("ours_s", "ours s"), ("peer_s", "skimage s"), ("ratio", "ours/skimage"),
        ("psnr_noisy", "PSNR noisy"), ("psnr_ours", "PSNR ours"), ("psnr_peer", "PSNR skimage")])
    if args.json:
        harness.write_json(args.json, "nlm", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
