"""Shape arithmetic on the hot path of every call, in plain Python."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["broadcast_shapes"]


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
