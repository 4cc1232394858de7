"""Each example runs, at a reduced size, as part of the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("skimage", reason="scikit-image (test dependency) not installed")


def test_denoise_example(tmp_path):
    from examples import denoise

    out = tmp_path / "denoise.png"
    rows = denoise.run(size=64, sigma=0.1, out=str(out))
    for r in rows:
        # measured: nlgraph 0.1-0.25 dB above scikit-image here (its exp(-5) weight cut-off)
        assert r["psnr_nlgraph"] > r["psnr_skimage"] - 0.2
        assert r["psnr_nlgraph"] > r["psnr_noisy"] + 5
    pytest.importorskip("matplotlib")
    assert out.exists() and out.stat().st_size > 10_000


@pytest.mark.parametrize("original", [False, True])
def test_crf_refine_example_runs_on_both_libraries(original):
    if original:
        pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (test dependency) not installed")
    args = [sys.executable, str(ROOT / "examples" / "crf_refine.py"), "--size", "64"]
    args += ["--pydensecrf"] if original else []
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    before, after = map(float, proc.stdout.split("label accuracy ")[1].split(" (")[0].split(" -> "))
    # not a rounding tolerance: the refinement's effect on the seeded scene (labels move with rounding only
    # at near-ties); measured 0.768 -> 0.885 at 64x64 (0.769 -> 0.981 at 256x256)
    assert after > before + 0.1


def test_crf_refine_same_labels_as_pydensecrf():
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (test dependency) not installed")
    import pydensecrf.densecrf as pd_dcrf
    import pydensecrf.utils as pd_utils

    import crf.densecrf as dcrf
    import crf.utils as utils
    from examples.crf_refine import refine, scene

    image, truth, noisy = scene(64)
    ours = refine(dcrf, utils, image, noisy, 3)
    theirs = refine(pd_dcrf, pd_utils, image, noisy, 3)
    # labels only: where the marginals agree to the mean-field rounding bound (test_densecrf_facade) a
    # label can differ only at a near-tie of the top two; 1% of the pixels is room for such ties
    assert np.mean(ours == theirs) >= 0.99


def test_segmentation_example_reduced():
    pytest.importorskip("sklearn", reason="scikit-learn (test dependency) not installed")
    from examples.segmentation.train import run

    lines = []
    results = run(steps=15, crf_steps=2, n_train=64, n_test=16, seed=0, log=lines.append)
    assert set(results) == {"local CNN", "CNN + non-local head", "+ dense CRF", "+ CRF-as-RNN",
                            "identical to torch.nn.MultiheadAttention"}
    assert all(0.0 <= v <= 1.0 for v in results.values())
    assert results["identical to torch.nn.MultiheadAttention"] == 1.0
    assert len(lines) == 5


def test_video_example_reduced():
    pytest.importorskip("sklearn", reason="scikit-learn (test dependency) not installed")
    from examples.video.train import make_clips, run

    x, y = make_clips(6, seed=0)
    assert x.shape == (6, 1, 4, 28, 28) and set(y.tolist()) <= {0, 1}
    lines = []
    results = run(steps=3, n_train=32, n_test=16, seed=0, log=lines.append)
    assert 0.0 <= results["C2D"] <= 1.0 and 0.0 <= results["C2D + space-time non-local"] <= 1.0
    # float32: both sides add the same z (|z| <= 0.8) to the attention term (|BN(W y)| <= ~1e-2 after
    # 3 steps from the zero-initialised BN scale), whose chains (~260 roundings, logits << 100) err by
    # <= 260 u 100 1e-2 ~ 2e-5 at most, plus the final additions' 2 u |z| ~ 1e-7
    assert results["max |NonLocal3d - attention over T*H*W tokens|"] < 1e-4
    assert len(lines) == 3


def test_video_example_context_parallel_rejects_bad_options():
    pytest.importorskip("sklearn", reason="scikit-learn (test dependency) not installed")
    from examples.video.train import main, run_context_parallel

    with pytest.raises(ValueError, match="init_noise must be >= 0, got -0.1"):
        run_context_parallel(2, steps=1, init_noise=-0.1)
    with pytest.raises(ValueError, match="world must be in 2..4"):
        run_context_parallel(5, steps=1)
    with pytest.raises(SystemExit):
        main(["--world-size", "2", "--init-noise", "nan"])


def test_video_example_context_parallel_float64():
    """--world-size: 2 gloo ranks holding 2 frames each compute the single-process step (float64)."""
    pytest.importorskip("sklearn", reason="scikit-learn (test dependency) not installed")
    from examples.video.train import run_context_parallel

    # init_noise: both runs start from the same perturbed weights (the README's draws of the recipe)
    res = run_context_parallel(2, steps=3, n_train=16, n_test=8, seed=0, dtype=torch.float64, init_noise=1e-3)
    assert res["one process"] == res["2 ranks"]
    # the same sums in another grouping (per-rank partial sums, then all-reduced): float64 rounding,
    # ~ (log2 of ~25k terms) u relative to the largest magnitudes involved; 1e-9 leaves ample room
    assert res["first step |loss difference|"] < 1e-9
    assert res["first step max |gradient difference| / max |gradient|"] < 1e-9
    # three Adam steps (lr 1e-3): an update passes a gradient's relative error through, and at most
    # lr |dg| / eps (eps = 1e-8) for gradients below eps: <= ~1e-3 * 1e-14 / 1e-8 = 1e-9 per step
    # relative to the largest gradient (measured 1e-10). The BatchNorm running statistics (what the
    # test accuracy reads) are global in both runs and updated once per training step, not by the
    # first-step probe.
    assert res["max |parameter difference| after training"] < 1e-8
    assert res["max |BatchNorm statistics difference| after training"] < 1e-8
