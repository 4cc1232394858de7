"""The API reference (docs/, Sphinx autodoc over the docstrings) builds without a warning.

Built as a reader would (``python -m sphinx -W -b html docs <out>``) in a fresh process, into a
temporary folder; then the pages of the public modules must exist and name their key objects.
"""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx", reason="sphinx (test dependency) not installed")

ROOT = Path(__file__).resolve().parent.parent

# page -> objects whose anchors (their full dotted names) it must hold
PAGES = {
    "api/nlgraph.html": ["nlgraph.aggregate"],
    "api/graph.html": ["nlgraph.graph.Graph", "nlgraph.graph.Mask", "nlgraph.graph.LocalWindow"],
    "api/affinity.html": ["nlgraph.affinity.Softmax", "nlgraph.affinity.Gaussian",
                          "nlgraph.affinity.ScoreForm"],
    "api/dispatch.html": ["nlgraph.dispatch.select_backend", "nlgraph.dispatch.compatible_backends",
                          "nlgraph.dispatch.backend_names"],
    "api/merge.html": ["nlgraph.merge.merge"],
    "api/distributed.html": ["nlgraph.distributed.aggregate"],
    "api/nonlocal_blocks.html": ["nlgraph.nonlocal_blocks.NonLocal2d"],
    "api/blocks.html": ["nlgraph.blocks.GlobalContextBlock", "nlgraph.blocks.NeighborhoodAttention"],
    "api/denoise.html": ["nlgraph.denoise.denoise_nl_means"],
    "api/adapters.html": ["nlgraph.adapters.mha_to_torch", "nlgraph.adapters.nonlocal_to_mha"],
    "api/crf.html": ["crf.DenseCRF", "crf.crf_features", "crf.densecrf.DenseCRF2D"],
    "api/attention.html": ["attention.MultiheadAttention", "attention.CrissCrossAttention"],
}


def test_docs_build_without_warnings_and_name_the_public_objects(tmp_path):
    out = tmp_path / "html"
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-b", "html", "-q", "docs", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"sphinx -W failed (exit {proc.returncode}):\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    index = (out / "index.html").read_text(encoding="utf-8")
    missing = []
    for page, names in PAGES.items():
        if f'href="{page}"' not in index:
            missing.append(f"index.html does not link {page}")
        if not (out / page).is_file():
            missing.append(f"{page} was not built")
            continue
        html = (out / page).read_text(encoding="utf-8")
        missing += [f"{page} documents no {name}" for name in names if f'id="{name}"' not in html]
    assert not missing, "\n".join(missing)
