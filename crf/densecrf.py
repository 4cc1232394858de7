"""A drop-in replacement for ``pydensecrf.densecrf``: ``import crf.densecrf as dcrf``.

Same classes, methods, argument names, defaults, constants, array layouts ((n_labels, n_pixels)
float32) and sign conventions as pydensecrf (Krähenbühl's dense-CRF code):

* a scalar compatibility is a Potts *reward* (the pairwise term adds ``+w * K(Q)`` to -U);
  a per-label vector v or an (L, L) matrix M is an *energy* (adds ``-v * K(Q)`` or
  ``-0.5 (M + M^T) K(Q)``);
* kernels are normalised as pydensecrf does: NORMALIZE_SYMMETRIC (default)
  ``n * K(n * Q)`` with ``n = 1 / sqrt(K(1))``; NORMALIZE_BEFORE ``K(Q / K(1))``; NORMALIZE_AFTER
  ``K(Q) / K(1)``; NO_NORMALIZATION the raw filter. K includes the pixel itself, as the lattice does.

K is ``nlgraph.aggregate(f, f, Q, Gaussian(1, normalize=False))`` on the ``permutohedral``
backend, the same lattice pydensecrf runs (``backend = "chunked"`` on an instance gives the exact
Gaussian sums instead). On the lattice each term keeps, as pydensecrf keeps its lattice, the core
op's lattice of its features with the normalisation folded into the splat's and the slice's weights
(``permutohedral.lattice_of(...).scaled(...)``), and a Potts term's weight and subtraction into the
slice's product: an iteration makes no pass over the (N, L) marginals besides the filters and the
softmax. Kernel types (CONST/DIAG/FULL) only matter to pydensecrf's parameter
learning; inference is the same for all three and all are accepted.

Unaries: ``setUnaryEnergy(u)`` (energies -log p; +inf means "label impossible", as mean-field
handles it in pydensecrf), ``setUnaryEnergy(L, f)`` (pydensecrf's logistic unary ``L @ f``) and
``setUnary(ConstUnary(u))`` / ``setUnary(LogisticUnary(L, f))``. Sizes and ``niter`` take ints or
integral floats (``DenseCRF2D(4.0, 4, 2)``, ``inference(2.0)``), as pydensecrf's ``int`` arguments do.

Where pydensecrf crashes or silently misbehaves (wrong dtypes, wrong shapes, compatibility of the
wrong length, NaN or -inf energies, a pixel with every label impossible, non-integral sizes that it
truncates, images of the wrong size), this module raises ValueError/TypeError naming the argument
and the shapes. Non-contiguous and float64 inputs are accepted (converted); the README lists every
deliberate difference.
"""

from __future__ import annotations

import math
import weakref
from numbers import Real
from typing import Optional

import numpy as np
import torch

import nlgraph
from nlgraph.backends import permutohedral
from nlgraph.backends._exp_jit import softmax_rows
from nlgraph.backends.permutohedral import Lattice
from nlgraph.core import all_finite

from ._layout import transposed

__all__ = ["DenseCRF", "DenseCRF2D", "Unary", "ConstUnary", "LogisticUnary", "CONST_KERNEL", "DIAG_KERNEL",
           "FULL_KERNEL", "NO_NORMALIZATION", "NORMALIZE_BEFORE", "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC"]

# pydensecrf's enum values (KernelType, NormalizationType)
CONST_KERNEL, DIAG_KERNEL, FULL_KERNEL = 0, 1, 2
NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC = 0, 1, 2, 3


def _real_2d(name: str, x, shape: Optional[tuple], layout: str = "") -> np.ndarray:
    """``x`` (a numpy array, array-like or tensor) as a non-empty real 2-D numpy array of ``shape``
    (when given); TypeError/ValueError naming ``name`` otherwise. ``layout`` describes the two axes."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must be a real-valued array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D{layout}, got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"Bad shape for {name} (need {shape}, got {arr.shape})")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    return arr


def _float_matrix(name: str, x, shape: Optional[tuple] = None) -> torch.Tensor:
    """A finite float32 (rows, cols) tensor from a numpy array / array-like, with clear errors."""
    arr = _real_2d(name, x, shape)
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if not _finite(t.numpy()):  # (by numpy: no wake-up of torch's workers before a lattice build)
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def _count(name: str, val, minimum: int) -> int:
    """An int argument (pydensecrf's C ``int``): ints, numpy ints and integral floats (4.0) are accepted."""
    if isinstance(val, (bool, np.bool_)) or not isinstance(val, Real):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(val).__name__} {val!r}")
    if isinstance(val, (int, np.integer)):
        count = int(val)
    else:
        try:
            as_float = float(val)
        except (TypeError, ValueError, OverflowError):
            as_float = math.nan
        if not as_float.is_integer():
            raise ValueError(f"{name} must be an int >= {minimum}, got {val!r} (pydensecrf would silently "
                             f"truncate it)")
        count = int(as_float)
    if count < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {val!r}")
    return count


def _finite(a: np.ndarray) -> bool:
    """Whether every entry of a float array is finite, by numpy on one thread: a finite sum (NaN and
    Inf propagate to it) or, where the sum is not, the elementwise test. torch's parallel sum costs
    less (0.24 against 0.93 ms at 21 x 262144), but left torch's OpenMP worker spinning on the other
    core while the lattice build of the ``addPairwise*`` call that follows started its second thread:
    that call's median 19-21 -> 15-16 ms (512x512, 2 labels, two threads, ``benchmarks/turns.py
    photo``, in turns)."""
    with np.errstate(over="ignore", invalid="ignore"):  # (inf - inf in the sum: the answer, no warning)
        return bool(np.isfinite(a.sum())) or bool(np.isfinite(a).all())


def _unary_energy(name: str, u, shape: Optional[tuple] = None, copy: bool = True) -> torch.Tensor:
    """Unary energies as an owned float32 (n_labels, n_vars) tensor (``copy=False``: possibly a view of
    the caller's float32 array, for a caller that copies it anyway).

    +inf (probability 0: the label is impossible) is valid, as in pydensecrf's mean field; NaN, -inf
    and a variable whose every label is +inf (no possible label: pydensecrf returns NaN everywhere)
    raise ValueError naming the first offending entries."""
    arr = _real_2d(name, u, shape, " (n_labels, n_vars)")
    # a copy (unless the caller makes its own): never a view of the caller's array
    t = torch.from_numpy(np.array(arr, dtype=np.float32, order="C") if copy
                         else np.asarray(arr, dtype=np.float32, order="C"))
    if not _finite(t.numpy()):
        bad = torch.isnan(t) | (t == -np.inf)
        if bool(bad.any()):
            lab, var = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name} contains NaN or -inf (first at label {lab}, variable {var}); energies "
                             f"are -log(probability): +inf (probability 0) is allowed, NaN and -inf are not")
        dead = torch.isinf(t).all(0).nonzero()[:, 0]
        if dead.numel():
            raise ValueError(f"{name} is +inf for every label at {dead.numel()} variable(s) (first: "
                             f"{dead[:5].tolist()}): such a variable has no possible label")
    return t


def _softmax_labels(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax over the labels of (N, L) scores, contiguous (N, L) for the filters; into ``out`` if given.

    For few labels (up to 15; up to 32 on one thread; float32, CPU, numba) the compiled row softmax of
    :func:`nlgraph.backends._exp_jit.softmax_rows` (1.4-10x torch's row softmax there; measurements in
    its docstring); otherwise, for 4 labels or fewer, the softmax over the (L, N) view and a
    transposing copy (faster than torch's row softmax there); with more labels torch's. With many
    labels the arrays are large (N x L floats); writing into a reused buffer instead of a fresh one
    saves the page faults of fresh memory (measured: most of the inference time lost to them at L=21).
    """
    fast = softmax_rows(x, out)
    if fast is not None:
        return fast
    if x.shape[1] <= 4:
        return transposed(torch.softmax(x.T, dim=0))
    return torch.softmax(x, dim=1, out=out)


def _divided(rows: list[np.ndarray], by: list) -> torch.Tensor:
    """(len(rows), N) float32 features rows[i] / float32(by[i]) (pydensecrf's float arithmetic),
    written in place into one array (no temporary per row)."""
    out = np.empty((len(rows), rows[0].shape[0]), np.float32)
    for i, (r, b) in enumerate(zip(rows, by, strict=True)):
        np.divide(r, np.float32(b), out=out[i], dtype=np.float32)
    return torch.from_numpy(out)


class _Pairwise:
    """One pairwise term: features, compatibility and kernel normalisation."""

    def __init__(self, crf: "DenseCRF", features: torch.Tensor, compat, kernel, normalization,
                 cached: bool = True):
        if kernel not in (CONST_KERNEL, DIAG_KERNEL, FULL_KERNEL):
            raise ValueError(f"kernel must be CONST_KERNEL, DIAG_KERNEL or FULL_KERNEL, got {kernel!r}")
        if normalization not in (NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC):
            raise ValueError(f"normalization must be one of the NORMALIZE_* / NO_NORMALIZATION constants, "
                             f"got {normalization!r}")
        # a weak reference: a strong one made a cycle (the CRF holds its terms), so a dropped CRF's
        # lattices (tens of MB per photo) lived on until the cyclic garbage collector ran, and a
        # stream of images built each lattice on fresh memory
        self._crf = weakref.ref(crf)
        self.features = features  # (N, D): the same tensor at every call, so the lattice is reused
        self.normalization = normalization
        self.kind, self.compat = self._compat(compat, crf.n_labels)
        self._scaled: Optional[tuple[str, Optional[Lattice]]] = None  # (backend, its lattice): _lattice()
        # cached: the lattice comes from (and stays in) the core op's cache (features that come again,
        # e.g. the positions of every same-size image); else it is this term's own, scaled in place
        self._cached = cached
        self._base: Optional[Lattice] = None  # the unscaled lattice made here, until _lattice() takes it
        self._norm: Optional[torch.Tensor] = None  # (N,): :attr:`norm`, made on first use
        self._norm_backend = crf.backend  # ... by the backend the term was added on (as before the lazy norm)
        if normalization != NO_NORMALIZATION and crf.backend == "permutohedral":
            # the lattice is built here, as pydensecrf builds its own in addPairwise*; the kernel
            # normalisation's filter waits for the first inference step (:attr:`norm`), so that the
            # terms' lattice builds run back to back: a filter (torch's parallel sparse products)
            # between them left torch's OpenMP worker spinning on the other core while the next build
            # started, and the build's second thread started late (2-core VM: a 512x512 photo's
            # bilateral build 37 -> 30 ms, median, with the core free)
            self._base = self._unscaled()

    @property
    def norm(self) -> torch.Tensor:
        """(N,) pydensecrf's kernel normalisation: 1 / sqrt(K 1) (symmetric) or 1 / K 1, computed once,
        by the backend the term was added on (on the lattice, the lattice's own K 1, as aggregate's bit
        for bit)."""
        if self._norm is None:
            base = None
            if self._norm_backend == "permutohedral":
                base = self._base = self._base or self._unscaled()
                memo = base.derived.get(self._memo_key()) if self._cached else None
                if memo is not None:  # the same cached lattice and normalisation: the same norm
                    self._norm = memo[0]
                    return memo[0]
            with torch.inference_mode(False):  # (it may serve later calls outside inference mode)
                ones = torch.ones(self.features.shape[0], 1)
                if base is not None:
                    k1 = base.filter(ones)[:, 0]
                else:
                    k1 = self.filter(ones, self._norm_backend)[:, 0]
                symmetric = self.normalization == NORMALIZE_SYMMETRIC
                self._norm = 1.0 / torch.sqrt(k1 + 1e-20) if symmetric else 1.0 / (k1 + 1e-20)
        return self._norm

    def _memo_key(self) -> tuple:
        """This term's key in its cached lattice's ``derived`` products: its normalisation (the norm
        and the scaled lattice depend on nothing else of the term)."""
        return ("crf.densecrf", self.normalization)

    @property
    def crf(self) -> "DenseCRF":
        """The CRF this term belongs to."""
        crf = self._crf()
        if crf is None:  # (only a term kept beyond its CRF's life)
            raise RuntimeError("this pairwise term's DenseCRF no longer exists")
        return crf

    @staticmethod
    def _compat(compat, n_labels: int):
        if isinstance(compat, Real) and not isinstance(compat, bool):
            if not math.isfinite(compat):
                raise ValueError(f"compat must be finite, got {compat}")
            return "potts", float(compat)
        arr = np.asarray(compat)
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"compat must be a number, a ({n_labels},) vector or a ({n_labels}, {n_labels}) "
                            f"matrix, got dtype {arr.dtype}")
        if arr.ndim == 1:
            if arr.shape != (n_labels,):
                raise ValueError(f"compat vector must have one entry per label ({n_labels},), "
                                 f"got {arr.shape}")
            kind = "diagonal"
        elif arr.ndim == 2:
            if arr.shape != (n_labels, n_labels):
                raise ValueError(f"compat matrix must be ({n_labels}, {n_labels}), got {arr.shape}")
            arr = 0.5 * (arr + arr.T)  # pydensecrf symmetrises the matrix
            kind = "matrix"
        else:
            raise ValueError(f"LabelCompatibility of dimension >2 not meaningful (got shape {arr.shape})")
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if not all_finite(t):
            raise ValueError("compat contains NaN or Inf")
        return kind, t

    def filter(self, values: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        """K(values): the Gaussian filter over all pixels (self included), (N, e) -> (N, e), on
        ``backend`` (default: the CRF's)."""
        return nlgraph.aggregate(self.features, self.features, values, nlgraph.Gaussian(1.0, normalize=False),
                                 backend=self.crf.backend if backend is None else backend)

    def _before(self) -> bool:
        return self.normalization in (NORMALIZE_SYMMETRIC, NORMALIZE_BEFORE)

    def _after(self) -> bool:
        return self.normalization in (NORMALIZE_SYMMETRIC, NORMALIZE_AFTER)

    def _lattice(self) -> Optional[Lattice]:
        """On the ``permutohedral`` backend, the lattice of the normalised kernel ``diag(after) K
        diag(before)`` (:meth:`Lattice.scaled`: the normalisation folded into the splat's and the
        slice's weights), made from the core op's own lattice of these features on first use and kept,
        as pydensecrf keeps its lattice; None on any other backend (those go through the core op)."""
        backend = self.crf.backend
        if self._scaled is None or self._scaled[0] != backend:
            lattice = None
            if backend == "permutohedral":
                norm = self.norm if self.normalization != NO_NORMALIZATION else None
                base, self._base = self._base or self._unscaled(), None
                # a cached lattice (the positions of every same-size image) keeps its scaled copy for
                # the next CRF with the same normalisation (same norm: the memo's own tensor)
                shared = self._cached and self._norm_backend == "permutohedral"
                memo = base.derived.get(self._memo_key()) if shared else None
                if memo is not None and memo[0] is norm:
                    lattice = memo[1]
                else:
                    with torch.inference_mode(False):
                        lattice = base.scaled(norm if self._after() else None,
                                              norm if self._before() else None, inplace=not self._cached)
                    if shared:
                        base.derived[self._memo_key()] = (norm, lattice)
            self._scaled = (backend, lattice)
        return self._scaled[1]

    def _unscaled(self) -> Lattice:
        """The lattice of K on these features: the core op's (cached) one, or a new one of this
        term's own (``cached=False``)."""
        return permutohedral.lattice_of(self.features, self.features, nlgraph.Gaussian(1.0, normalize=False),
                                        cache=self._cached)

    def normalised(self, q: torch.Tensor, scale: float = 1.0, add: Optional[torch.Tensor] = None,
                   out: Optional[torch.Tensor] = None,
                   scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``scale * N(q) + add`` for the normalised kernel N (pydensecrf's normalisations of K), into
        ``out`` (may be ``add``) if given, else a fresh tensor.

        On the lattice, one filter with every factor and the addition folded into its products; on
        other backends the core op's K and a pass for each factor (``scratch``: an (N, L) buffer for
        the normalised input)."""
        lattice = self._lattice()
        if lattice is not None:
            return lattice.filter(q, scale=scale, add=add, out=out)
        if self._before():
            norm = self.norm[:, None]
            q = torch.mul(q, norm, out=scratch) if scratch is not None else q * norm
        x = self.filter(q)  # fresh: scaled in place (one pass instead of two)
        factor = (self.norm * scale)[:, None] if self._after() else scale
        if add is None:
            return x.mul_(factor)
        if isinstance(factor, float):
            return torch.add(add, x, alpha=factor, out=out)
        return torch.addcmul(add, x, factor, out=out)

    def apply(self, q: torch.Tensor, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """pydensecrf's PairwisePotential::apply on (N, L) marginals: compatibility(normalised K(q)).

        ``scratch``: an (N, L) buffer for the normalised input (reused across iterations)."""
        if self.kind == "potts":
            return self.normalised(q, -self.compat, scratch=scratch)
        x = self.normalised(q, scratch=scratch)
        return x.mul_(self.compat) if self.kind == "diagonal" else x @ self.compat.T

    def subtract(self, base: torch.Tensor, q: torch.Tensor, out: torch.Tensor,
                 scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``out = base - apply(q)`` (``out`` may be ``base``). A Potts term folds its scaling and the
        subtraction into the filter: ``base + compat * N(q)`` in one pass."""
        if self.kind != "potts":
            return torch.sub(base, self.apply(q, scratch), out=out)
        return self.normalised(q, self.compat, add=base, out=out, scratch=scratch)


class Unary:
    """A unary term for :meth:`DenseCRF.setUnary` (pydensecrf's ``Unary``); holds (n_labels, n_vars) energies.

    Unlike pydensecrf's (moved into the CRF on first use), an instance can be set on several CRFs."""

    energy: torch.Tensor

    def __init__(self, *_, **__):
        if type(self) is Unary:
            raise TypeError("Unary is abstract: use ConstUnary(u) or LogisticUnary(L, f)")


class ConstUnary(Unary):
    """Fixed unary energies u, (n_labels, n_vars): ``setUnary(ConstUnary(u))`` == ``setUnaryEnergy(u)``."""

    def __init__(self, u):
        self.energy = _unary_energy("unary energy", u)


class LogisticUnary(Unary):
    """pydensecrf's logistic unary: energies ``L @ f`` for L (n_labels, D) and features f (D, n_vars)."""

    def __init__(self, L, f):
        lm = _float_matrix("L", L).double()
        fm = _float_matrix("f", f).double()
        if lm.shape[1] != fm.shape[0]:
            raise ValueError(f"LogisticUnary: L {tuple(lm.shape)} and f {tuple(fm.shape)} do not multiply "
                             f"(need L (n_labels, D) and f (D, n_vars))")
        self.energy = _unary_energy("unary energy L @ f", (lm @ fm).float())


class DenseCRF:
    """A fully connected CRF over ``nvar`` variables with ``nlabels`` labels (pydensecrf's DenseCRF).

    Attributes:
        backend: the core op's backend for the Gaussian filters: "permutohedral" (default, what
            pydensecrf computes) or "chunked" (exact, O(N^2)).
    """

    def __init__(self, nvar: int, nlabels: int, *_, **__):
        self._nvar, self._nlabel = _count("nvar", nvar, 1), _count("nlabels", nlabels, 1)
        self._neg_unary: Optional[torch.Tensor] = None  # (N, L): -U, what mean field adds to (read only)
        self._pairwise: list[_Pairwise] = []
        self.backend = "permutohedral"

    @property
    def n_labels(self) -> int:
        return self._nlabel

    def setUnaryEnergy(self, u, f=None) -> None:
        """Set the unary energies U, (nlabels, nvar): -log probabilities (+inf: label impossible).

        With ``f``: pydensecrf's logistic unary, energies ``u @ f`` for u (nlabels, D) and f (D, nvar)
        (pydensecrf's wrapper also insists on D = nvar)."""
        if f is not None:
            self.setUnary(LogisticUnary(u, f))
            return
        # (N, L) rows for the filters: a transposing copy (so the (L, N) check needs no copy of its own)
        self._neg_unary = transposed(_unary_energy("unary energy", u, (self._nlabel, self._nvar), copy=False),
                                     negate=True)

    def setUnary(self, u: Unary) -> None:
        """Set the unary term from a :class:`ConstUnary` or :class:`LogisticUnary` (pydensecrf's setUnary)."""
        if not isinstance(u, Unary):
            raise TypeError(f"setUnary expects a ConstUnary or LogisticUnary, got {type(u).__name__}")
        want = (self._nlabel, self._nvar)
        if tuple(u.energy.shape) != want:
            raise ValueError(f"Bad shape for unary energy (need {want}, got {tuple(u.energy.shape)})")
        self._neg_unary = transposed(u.energy, negate=True)

    def addPairwiseEnergy(self, features, compat, kernel=DIAG_KERNEL,
                          normalization=NORMALIZE_SYMMETRIC) -> None:
        """Add a Gaussian pairwise term over ``features`` (D, nvar) (already divided by their bandwidths)."""
        # our own copy, as pydensecrf keeps one: the caller may reuse its buffer (for the next CRF)
        feats = _float_matrix("features", features).clone()
        if feats.shape[1] != self._nvar:
            raise ValueError(f"Bad shape for pairwise energy (Need (?, {self._nvar}), "
                             f"got {tuple(feats.shape)})")
        self._add_pairwise(feats, compat, kernel, normalization)

    def _add_pairwise(self, feats: torch.Tensor, compat, kernel, normalization, cached: bool = True) -> None:
        """addPairwiseEnergy on features (D, nvar) of our own (no copy); ``cached``: see _Pairwise."""
        # (N, D) as a view of the (D, N) array: the lattice reads coordinate rows (no transposing copy)
        self._pairwise.append(_Pairwise(self, feats.T, compat, kernel, normalization, cached))

    # ---------------------------------------------------------------- inference

    def _neg_energy(self) -> torch.Tensor:
        """-U, (N, L) (zeros without a unary term); read only."""
        return self._neg_unary if self._neg_unary is not None else torch.zeros(self._nvar, self._nlabel)

    def _step(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """One mean-field step from q: (new q, tmp1 = -U - pairwise, tmp2 = the last pairwise term)."""
        tmp1 = self._neg_energy().clone()
        tmp2 = None
        for p in self._pairwise:
            tmp2 = None  # free the previous term before the next filter allocates (a smaller heap peak)
            tmp2 = p.apply(q)
            tmp1.sub_(tmp2)
        return _softmax_labels(tmp1), tmp1, tmp2

    def _next(self, q: torch.Tensor, neg_energy: torch.Tensor, bufs: list[torch.Tensor]) -> torch.Tensor:
        """The next q of :meth:`inference`, written into ``bufs`` = [tmp1, new q, scratch] (none of them
        q): tmp1 = -U - sum of the pairwise terms (each one fused pass where it can be), its softmax."""
        tmp1 = neg_energy  # (read only: the first term writes into bufs[0]; no term: softmax(-U))
        for p in self._pairwise:
            tmp1 = p.subtract(tmp1, q, bufs[0], bufs[2])
        return _softmax_labels(tmp1, bufs[1])

    def inference(self, niter: int) -> np.ndarray:
        """``niter`` mean-field steps from softmax(-U); returns Q as a float32 (nlabels, nvar) array."""
        niter = _count("niter", niter, 0)
        # four (N, L) buffers for the whole run: tmp1, the next q, a scratch and q's own (the new q is
        # written into the buffer q is not in)
        neg_energy = self._neg_energy()  # (read only: kept from setUnaryEnergy, no copy per run)
        bufs = [torch.empty_like(neg_energy) for _ in range(3)]
        q = _softmax_labels(neg_energy, torch.empty_like(neg_energy))
        for _ in range(int(niter)):
            new_q = self._next(q, neg_energy, bufs)
            if new_q is bufs[1]:
                bufs[1] = q
            q = new_q
        return transposed(q).numpy()

    def startInference(self):
        """(Q, tmp1, tmp2) to drive :meth:`stepInference` by hand; all float32 (nlabels, nvar) arrays."""
        if self._neg_unary is not None:
            q = _softmax_labels(self._neg_energy())
        else:
            q = torch.zeros(self._nvar, self._nlabel)
        shape = (self._nlabel, self._nvar)
        return transposed(q).numpy(), np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def _marginals(self, name: str, q) -> torch.Tensor:
        if not isinstance(q, np.ndarray):
            raise TypeError(f"{name} must be the numpy array returned by startInference/inference, "
                            f"got {type(q).__name__}")
        return transposed(_float_matrix(name, q, (self._nlabel, self._nvar)))

    def stepInference(self, Q, tmp1, tmp2) -> None:
        """One mean-field step, in place on the arrays from :meth:`startInference`."""
        q = self._marginals("Q", Q)
        for name, t in (("tmp1", tmp1), ("tmp2", tmp2)):
            if (not isinstance(t, np.ndarray) or t.shape != (self._nlabel, self._nvar)
                    or t.dtype != np.float32):
                raise ValueError(f"{name} must be the float32 ({self._nlabel}, {self._nvar}) array from "
                                 f"startInference")
        new_q, t1, t2 = self._step(q)
        Q[...] = new_q.T.numpy()
        tmp1[...] = t1.T.numpy()
        tmp2[...] = 0.0 if t2 is None else t2.T.numpy()

    def klDivergence(self, Q) -> float:
        """KL(Q || P) up to the log-partition constant, as pydensecrf computes it."""
        q = self._marginals("Q", Q).double()
        kl = float((q * torch.log(q.clamp_min(1e-20))).sum())
        if self._neg_unary is not None:
            # an impossible label (+inf energy) at Q = 0 contributes 0 (its limit), not inf * 0 = NaN
            kl -= float(torch.where(q > 0, self._neg_unary.double() * q, 0.0).sum())
        for p in self._pairwise:
            kl += float((q * p.apply(q.float()).double()).sum())
        return kl


class DenseCRF2D(DenseCRF):
    """A dense CRF over a ``w`` x ``h`` image (pixel index j * w + i), as pydensecrf's DenseCRF2D."""

    def __init__(self, w: int, h: int, nlabels: int, *_, **__):
        w, h = _count("w", w, 1), _count("h", h, 1)
        super().__init__(w * h, nlabels)
        self._w, self._h = w, h

    def _grid(self) -> tuple[np.ndarray, np.ndarray]:
        j, i = np.meshgrid(np.arange(self._h, dtype=np.float32), np.arange(self._w, dtype=np.float32),
                           indexing="ij")
        return i.reshape(-1), j.reshape(-1)  # x = column i, y = row j, pixel index j * w + i

    @staticmethod
    def _pair(name: str, s, n: int) -> tuple:
        vals = (s,) * n if isinstance(s, Real) else tuple(s)
        if len(vals) != n or not all(isinstance(v, Real) and math.isfinite(v) and float(v) > 0 for v in vals):
            raise ValueError(f"{name} must be a positive number or {n} of them, got {s!r}")
        return vals

    def addPairwiseGaussian(self, sxy, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC) -> None:
        """Smoothness kernel on positions: features (x / sx, y / sy)."""
        sx, sy = self._pair("sxy", sxy, 2)
        x, y = self._grid()
        self._add_pairwise(_divided([x, y], [sx, sy]), compat, kernel, normalization)

    def addPairwiseBilateral(self, sxy, srgb, rgbim, compat, kernel=DIAG_KERNEL,
                             normalization=NORMALIZE_SYMMETRIC) -> None:
        """Appearance kernel on the positions and colours of a uint8 (h, w, 3) image ``rgbim``.

        Features (x / sx, y / sy, r / sr, g / sg, b / sb).
        """
        sx, sy = self._pair("sxy", sxy, 2)
        sr, sg, sb = self._pair("srgb", srgb, 3)
        im = np.asarray(rgbim)
        if im.dtype != np.uint8:
            raise ValueError(f"rgbim must be a uint8 (h, w, 3) image, got dtype {im.dtype}")
        if im.ndim != 3 or im.shape[:2] != (self._h, self._w):
            raise ValueError(f"Bad shape for pairwise bilateral (Need {(self._h, self._w, 3)}, "
                             f"got {im.shape})")
        if im.shape[2] != 3:
            raise ValueError("addPairwiseBilateral only works for RGB images. For other types, use "
                             "`utils.create_pairwise_bilateral` to construct your own pairwise energy and "
                             "add it through `addPairwiseEnergy`.")
        x, y = self._grid()
        col = im.reshape(-1, 3)
        # the image's own lattice: features no later image repeats, so no cache entry (and no copy of
        # them) is kept, and the kernel normalisation scales its weights in place
        feats = _divided([x, y, col[:, 0], col[:, 1], col[:, 2]], [sx, sy, sr, sg, sb])
        self._add_pairwise(feats, compat, kernel, normalization, cached=False)
