"""Shape arithmetic on the hot path of every call, in plain Python, and the one tile slicer."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["broadcast_shapes", "slice_rows_cols"]


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    """``torch.broadcast_shapes`` for shapes given as int sequences, as a tuple.

    torch's version costs 50-80 us a call in eager mode (it goes through its reference
    implementation); this loop costs about 1 us. Under ``torch.compile`` torch's own runs (it reasons
    about symbolic sizes). Raises RuntimeError, as torch's does, when the shapes do not broadcast.
    """
    if torch.compiler.is_compiling():
        return tuple(torch.broadcast_shapes(*shapes))
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for s in shapes:
        offset = ndim - len(s)
        for i, x in enumerate(s):
            cur = out[offset + i]
            if x == cur or x == 1:
                continue
            if cur != 1:
                raise RuntimeError(f"shapes {[tuple(t) for t in shapes]} do not broadcast")
            out[offset + i] = x
    return tuple(out)


def slice_rows_cols(t: Tensor, i0: int, i1: int, j0: int, j1: int) -> Tensor:
    """Rows [i0, i1) and columns [j0, j1) of the last two dims of ``t``, which may broadcast (size 1)
    along either: a size-1 dim stays size 1. The one tile slicer of graphs, tiles and backends."""
    rows = slice(0, 1) if t.shape[-2] == 1 else slice(i0, i1)
    cols = slice(0, 1) if t.shape[-1] == 1 else slice(j0, j1)
    return t[..., rows, cols]
