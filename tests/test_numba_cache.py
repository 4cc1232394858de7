"""The compiled kernels come from numba's on-disk cache in a new process: none is compiled again.

Kernels defined inside a function (a closure) were compiled anew in every process (0.5-2 s at the
first call: a dense CRF's first ``inference`` took 2.2 s instead of 0.3 s) and added an entry to
the cache directory each time. Checked with numba's own counters in two fresh processes: the first
may compile (an empty cache), the second must only load.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("numba")

SCRIPT = r"""
import json, torch
from crf import _layout, _layout_kernels
from nlgraph.backends import _exp_jit, _exp_kernels
from nlgraph.backends.permutohedral import _jit, build_lattice
_exp_jit.MIN_NUMEL = 0
_layout._MIN_NUMEL = 0
s = torch.randn(64, 32)
assert _exp_jit.exp_shifted_(s, s.amax(1))
assert _exp_jit.softmax_rows(torch.randn(64, 3)) is not None
_layout.transposed(torch.randn(3, 64)); _layout.transposed(torch.randn(64, 3))
pts = torch.rand(1, 300, 2) * 5
lat = build_lattice(pts, pts, True)
lat.scaled(torch.ones(300), torch.ones(300))
kernels = {"exp_rows": _exp_kernels.exp_rows, "softmax_rows": _exp_kernels.softmax_rows,
           "wide": _layout_kernels.wide, "tall": _layout_kernels.tall, "elevate_2": _jit.ELEVATE[2],
           "vertices_2": _jit.VERTICES[2], "merge": _jit._merge, "column_scaled": _jit._column_scaled}
print(json.dumps({k: [len(f.stats.cache_hits), len(f.stats.cache_misses)] for k, f in kernels.items()}))
"""


def _stats() -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_kernels_load_from_numbas_cache_in_a_new_process():
    _stats()  # (may compile: a fresh checkout's cache is empty)
    stats = _stats()
    for name, (hits, misses) in stats.items():
        assert hits >= 1 and misses == 0, (name, stats)
