"""Transposing copies between pydensecrf's label-major (L, N) arrays and the (N, L) rows the filters read.

pydensecrf's arrays are (n_labels, n_vars); the lattice filters and the row softmax want each variable's
labels contiguous, so unaries go in, and marginals come out, through a transposing copy of N x L
floats (22 MB at 512 x 512 and 21 labels). The compiled kernel here (blocks of 256: the source rows
read in order, or for short source rows each destination row written in order) runs in parts over
torch's thread count on the lattice builder's thread pool. ``python -m crf._layout`` (median of 9,
the 2-core AMD EPYC VM of the README's tables, several runs): (21, 262144) and (262144, 21) with two
threads 3.5-4.6 ms against 8.6-25 ms for torch's ``x.T.contiguous()`` and 7.4-12 ms for
``torch.empty(...).copy_(x.T)``; one thread 7.0 against 7.7-8.8 ms; 2 labels 0.4-0.5 against 1.4-2.7
ms. It also times the label softmax's options (see ``nlgraph.backends._exp_jit.softmax_rows``).
Where numba does not import, or for other dtypes and devices, the ``copy_`` path runs: the same
values, bit for bit (a copy).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import torch
from torch import Tensor

from nlgraph._optional import optional
from nlgraph._values import untransformed

__all__ = ["transposed"]

#: Elements at least before the compiled kernel runs (below, torch's copy costs microseconds).
_MIN_NUMEL = 1 << 15

_KERNELS: Optional[tuple[Any, Any]] = None


def _kernels() -> Optional[tuple[Any, Any]]:
    global _KERNELS
    if _KERNELS is None and optional("numba") is not None:
        from . import _layout_kernels

        _KERNELS = (_layout_kernels.wide, _layout_kernels.tall)
    return _KERNELS


def transposed(x: Tensor, negate: bool = False) -> Tensor:
    """``x.T`` (``-x.T`` where ``negate``) of a 2-D tensor as a new contiguous tensor (never a view of
    ``x``). The negation rides on the copy: a separate ``neg_()`` is a pass of torch's parallel kernels,
    after which torch's OpenMP worker spins on the other core while the lattice build that follows
    in a CRF's set-up starts its second thread."""
    if x.dim() != 2:
        raise ValueError(f"transposed expects a 2-D tensor, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    out = torch.empty(cols, rows, dtype=x.dtype, device=x.device)
    kernels = (_kernels() if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
               and x.is_contiguous() and x.numel() >= _MIN_NUMEL and not x.requires_grad
               and untransformed() else None)
    if kernels is None:
        return torch.neg(x.T, out=out) if negate else out.copy_(x.T)
    from nlgraph.backends.permutohedral import _jit  # (numba imports: its pool and part bounds)

    a, o = x.detach().numpy(), out.numpy()
    wide, tall = kernels
    threads = torch.get_num_threads()
    if rows >= cols:  # parts along the longer side
        _jit._run(lambda t, s, e: tall(a, o, s, e, negate), _jit._bounds(0, rows, threads), threads)
    else:
        _jit._run(lambda t, s, e: wide(a, o, s, e, negate), _jit._bounds(0, cols, threads), threads)
    return out


def _view_softmax(x: Tensor) -> Tensor:  # pragma: no cover - a measurement's contender
    """The label softmax over the (L, N) view, transposed back (the few-label path without numba)."""
    return transposed(torch.softmax(x.T, dim=0))


def _measure() -> None:  # pragma: no cover - a measurement, run by hand
    """Median of 9 calls, torch's thread count: the transposing copies, then the label softmax of
    (262144, L) scores (``nlgraph.backends._exp_jit.softmax_rows``' measurements), each call right
    after a torch op on the same tensor (as in mean field)."""
    import time

    import numpy as np

    from nlgraph.backends._exp_jit import _kernels

    def median_ms(fn, before=lambda: None) -> float:
        fn()
        ts = []
        for _ in range(9):
            before()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)) * 1e3

    threads = torch.get_num_threads()
    for shape in ((21, 262144), (262144, 21), (2, 262144), (262144, 2)):
        x = torch.rand(*shape)
        for name, fn in (("x.T.contiguous()", lambda x=x: x.T.contiguous()),
                         ("empty().copy_(x.T)", lambda x=x: torch.empty(x.shape[::-1]).copy_(x.T)),
                         ("transposed(x)", lambda x=x: transposed(x))):
            print(f"{shape} {name:24s} {median_ms(fn):6.2f} ms ({threads} threads)")
    kernels = _kernels()
    for labels in (2, 4, 5, 8, 12, 16, 21, 64):
        x = torch.randn(262144, labels) * 5
        out, y = torch.empty_like(x), torch.empty_like(x)
        rows = [("torch.softmax(x, 1)", partial(torch.softmax, x, 1, out=out)),
                ("softmax of the (L, N) view", partial(_view_softmax, x))]
        if kernels is not None:
            rows.append(("compiled, one part",
                         partial(kernels["softmax_rows"], x.numpy(), out.numpy(), 0, x.shape[0])))
        for name, fn in rows:
            ms = median_ms(fn, partial(torch.add, x, 1, out=y))
            print(f"(262144, {labels}) softmax {name:26s} {ms:6.2f} ms ({threads} threads)")


if __name__ == "__main__":  # pragma: no cover
    _measure()
