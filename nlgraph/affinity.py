"""Pairwise affinities f(q_i, k_j) and their normalisations C_i.

Every affinity lowers itself to one canonical *score form* that all backends share::

    s_ij = q'_i . k'_j + r_i + c_j              (a bilinear term plus row and column biases)
    f_ij = kernel(s_ij)                          kernel in {exp, linear, relu}
    C_i  = sum_j f_ij  |  sum_j w_ij  |  1       norm in {"sum", "count", "none"}

where w_ij are the graph's edge weights (1 for a plain edge). The canonical form is what makes one
tiled loop (and one fused GPU kernel) serve attention, non-local blocks and the dense-CRF message:

=================  ===========================================  ==================  ====================
affinity           f(q_i, k_j)                                  canonical form      C_i
=================  ===========================================  ==================  ====================
``Softmax``        exp(s q_i.k_j)                               q'=s q, k'=k        sum_j f
``Gaussian``       ``exp(-max(|q_i/b - k_j/b|^2/2 - o, 0))``    q'=(q-m)/b,         sum_j f or 1
                                                                k'=(k-m)/b,
                                                                ``r=-|q'|^2/2``,
                                                                ``c=-|k'|^2/2``
``DotProduct``     s q_i.k_j                                    q'=s q, k'=k        number of neighbours
``Concatenation``  ReLU(w_q.q_i + w_k.k_j + b)                  r=w_q.q+b, c=w_k.k  number of neighbours
=================  ===========================================  ==================  ====================

``EdgeWeighted(base, weight)`` multiplies f by a per-edge weight w_ij >= 0 (and, for the count
normalisation, C_i becomes sum_j w_ij, i.e. weights act as edge multiplicities).

Parameters given as tensors (``scale``, ``bandwidth``, ``weight``) receive gradients: the lowering
to the canonical form is ordinary autograd, outside any backend. They stay the caller's tensors (an
optimiser's in-place update is seen), so their values are checked at construction and again at every
call (:meth:`Affinity.check_values`, eager mode only).

Numerics of the lowering (every backend that consumes the form inherits them):

* The Gaussian is translation invariant, so its features are centred on a common shift m (the keys'
  mean, detached: f does not depend on m, so values and gradients are exact for any m) before the
  expansion ``|q' - k'|^2 = |q'|^2 + |k'|^2 - 2 q'.k'``. The expansion's rounding error is then
  about ``u (|q'|^2 + |k'|^2)`` with q', k' measured from the data's centre, not from the origin:
  features far from the origin (pixel coordinates of a large image or volume, a crop at an offset)
  keep their float32 precision.
* In eager mode each form checks that its scores cannot overflow the accumulation dtype (float32
  for fp16/bf16/fp32 inputs, float64 for float64):
  ``|s_ij| <= sum_d max_i |q'_id| max_j |k'_jd| + max |r| + max |c|`` must stay below its largest
  finite number, else a ValueError says so (instead of the NaN, or the silently zero weights, an
  overflowed score gives). Under torch.compile / export and inside vmap the check steps aside
  (nlgraph._values.checking_values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union, overload

import torch
from torch import Tensor

from ._values import all_finite, checking_values, finite_nonnegative, finite_number, known_norm, scores_fit
from ._values import positive as _positive

__all__ = [
    "Affinity",
    "Softmax",
    "Gaussian",
    "DotProduct",
    "Concatenation",
    "EdgeWeighted",
    "ScoreForm",
]

Scalar = Union[float, int, Tensor]

KERNELS = ("exp", "linear", "relu")
NORMS = ("sum", "count", "none")


@dataclass(frozen=True)
class ScoreForm:
    """The canonical form ``s_ij = query_i . key_j + row_i + col_j`` with a kernel and a normaliser.

    Attributes:
        query: (..., N, d') transformed queries, or None when there is no bilinear term.
        key: (..., M, d') transformed keys, or None when there is no bilinear term.
        row: (..., N) per-query bias r_i, or None.
        col: (..., M) per-key bias c_j, or None.
        kernel: "exp", "linear" or "relu": f = kernel(s).
        norm: "sum" (C = sum f), "count" (C = sum of edge weights) or "none" (C = 1).
    """

    query: Optional[Tensor]
    key: Optional[Tensor]
    row: Optional[Tensor]
    col: Optional[Tensor]
    kernel: str
    norm: str
    #: exp kernels only: the score is capped at 0 after adding this offset, s <- min(s + clamp, 0)
    #: (a Gaussian with a flat top, as non-local means uses to discount the noise variance).
    clamp: Optional[float] = None
    #: exp kernels only: after the flat top, scores below ``-floor`` are dropped (f = 0, as a non-edge):
    #: a truncated kernel (a Gaussian with a cut-off). None keeps every score.
    floor: Optional[float] = None
    #: Computes the (..., N) per-query term left out of the scores because C = sum f cancels it (the
    #: normalised Gaussian's ``-|q'|^2/2``), or None: see :attr:`lse_row`.
    lse_row_of: Optional[Callable[[], Tensor]] = None

    @property
    def lse_row(self) -> Optional[Tensor]:
        """(..., N) the per-query term the scores leave out (or None): the true log C_i is
        logsumexp_j s_ij + lse_row_i. Only the log-normaliser (``aggregate(..., return_lse=True)``)
        reads it and y does not depend on it, so it is computed when read (each read computes it)."""
        return None if self.lse_row_of is None else self.lse_row_of()


def _centre(query: Tensor, key: Tensor) -> Tensor:
    """A common shift for the Gaussian's features: the keys' mean, detached, (..., 1, d).

    Averaged further over the leading dims where the query has size 1 (or none), so that neither
    ``query - centre`` nor ``key - centre`` grows beyond its own shape.
    """
    c = key.detach().mean(-2, keepdim=True)
    nq, nc = query.dim() - 2, c.dim() - 2
    dims = [i for i in range(nc) if c.shape[i] != 1 and (i < nc - nq or query.shape[i - (nc - nq)] == 1)]
    if dims:
        c = c.mean(dims, keepdim=True)
    if nc > nq:
        c = c.reshape(c.shape[nc - nq:])
    return c


def _scaled_bound(query: Tensor, key: Tensor, scale: Scalar) -> Optional[float]:
    """An upper bound of every partial sum of ``(scale q_i) . k_j`` from the call's value scan
    (:func:`nlgraph._values.known_norm`: |Q|_F, |K|_F), or None (then :func:`_checked` scans the form).

    |(s q_i) . k_j| <= |s| |Q|_F |K|_F (Cauchy-Schwarz, also for each partial sum); forming s q rounds
    each entry once, a factor (1 + u) where the product is normal and an absolute error of at most
    half the smallest subnormal eta where it underflows, which adds (eta / 2) |k_j|_1 <= (eta / 2)
    sqrt(d) |K|_F to a partial sum (hypothesis found scale = 2^-149 on float32: a bound without the
    term lay below the formed products). The dot product's own rounding is :func:`scores_fit`'s
    margin. For a float scale only (a tensor scale is checked on the form)."""
    if isinstance(scale, Tensor):
        return None
    nq, nk = known_norm(query), known_norm(key)
    if nq is None or nk is None:
        return None
    f64 = query.dtype == torch.float64
    u = 2.0**-53 if f64 else 2.0**-24
    eta = 2.0**-1074 if f64 else 2.0**-149
    return abs(float(scale)) * nq * nk * (1 + u) + 0.5 * eta * math.sqrt(query.shape[-1]) * nk


def _checked(affinity: "Affinity", form: ScoreForm, factor: float = 1.0,
             bound: Optional[float] = None) -> ScoreForm:
    """Raise ValueError when the scores of ``form`` may overflow the accumulation dtype (eager only).

    Every partial sum of q'_i . k'_j is at most S = sum_d max_i |q'_id| max_j |k'_jd| in magnitude
    (exactly; rounded, S (1 + d u) to first order), so |s_ij| <= S + max |r| + max |c|. Computed in
    float64 from the form's own tensors (one host sync); a non-finite term (an overflow while forming
    q * scale, |k'|^2, ...) fails the check as well. ``factor`` >= 0 multiplies the bilinear term (a
    scale applied by the kernel instead of to the form's queries). ``bound``: an upper bound of every
    |s_ij| (and partial sum) the caller derived from the call's value scan, or None; it passes the
    check without a pass over the form when it is small enough.
    """
    if not checking_values():
        return form
    terms = [t for t in (form.query, form.row, form.col) if t is not None]
    dtype = torch.float64 if terms[0].dtype == torch.float64 else torch.float32
    # the bilinear term: a form has both query and key or neither
    q, k = (form.query, form.key) if form.query is not None and form.key is not None else (None, None)
    width = 0 if q is None else q.shape[-1]
    if bound is None and q is not None and k is not None and form.row is None and form.col is None:
        # the core op's value scan measured |Q|_F and |K|_F (upper bounds): every partial sum of
        # q'_i . k'_j is at most |q'_i| |k'_j| <= |Q|_F |K|_F (Cauchy-Schwarz), with no further pass
        nq, nk = known_norm(q), known_norm(k)
        bound = None if nq is None or nk is None else nq * nk
    if bound is not None and scores_fit(bound * factor, width, dtype):
        return form
    with torch.no_grad():
        # a screen first: S <= d max|q'| max|k'| needs one min-and-max pass per tensor (no copies), read
        # in one sync; only when that coarser bound does not pass does the per-feature bound below decide
        scanned = terms + ([k] if k is not None and k is not q else [])
        ends = [e for t in scanned for e in torch.aminmax(t.detach())]
        if len({e.dtype for e in ends}) > 1:
            ends = [e.double() for e in ends]
        ext = [abs(v) for v in torch.stack(ends).tolist()]  # exact: every float is a Python float
        big = [max(ext[2 * i], ext[2 * i + 1]) for i in range(len(scanned))]
        coarse = sum(big[:len(terms)])
        if q is not None:
            kmax = big[0] if k is q else big[-1]
            coarse += width * big[0] * kmax * factor - big[0]
        if scores_fit(coarse, width, dtype):  # False for inf / NaN: the fine bound decides
            return form
        acc = torch.zeros((), dtype=torch.float64, device=terms[0].device)
        if q is not None and k is not None:
            # per-feature max |.| over every other dim (no reshape: strided views are not copied)
            qa = q.detach().abs().amax(dim=tuple(range(q.dim() - 1))).double()
            ka = qa if k is q else k.detach().abs().amax(dim=tuple(range(k.dim() - 1))).double()
            acc = acc + (qa * ka).sum() * factor
        for t in (form.row, form.col):
            if t is not None:
                acc = acc + t.detach().abs().amax().double()
        bound = float(acc)
    if not scores_fit(bound, width, dtype):  # also False for inf / NaN
        reach = f"can reach {bound:.3g}" if math.isfinite(bound) else "overflow already in their terms"
        info = torch.finfo(dtype)
        raise ValueError(
            f"{affinity!r}: the scores of these query/key values {reach} (bilinear term q'.k' plus row and "
            f"column biases; {dtype} holds at most {info.max:.3g}), so the result would be NaN or wrong. "
            f"Rescale query/key (or the affinity's parameters), or pass float64 inputs"
        )
    return form


def _check_scalar(name: str, value: Scalar, *, positive: bool, scalar: bool = False) -> None:
    """Type, shape and (in eager mode) value checks of one parameter; ``scalar``: one entry only."""
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating-point tensor, got dtype {value.dtype}")
        if value.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
        if scalar and value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (one entry), got shape {tuple(value.shape)}")
        if checking_values():
            _check_tensor_values(name, value, positive=positive)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        if positive and value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")


def _check_tensor_values(name: str, value: Tensor, *, positive: bool) -> None:
    if positive:
        if not _positive(value):
            raise ValueError(f"{name} must be finite and > 0 (shape {tuple(value.shape)})")
    elif not all_finite(value):
        raise ValueError(f"{name} must be finite (shape {tuple(value.shape)})")


def _fmt(value: Optional[Scalar]) -> str:
    """Short repr of a parameter: numbers as they are, tensors by shape."""
    if isinstance(value, Tensor):
        return f"tensor{tuple(value.shape)}"
    return repr(value)


@overload
def _as(value: Tensor, like: Tensor) -> Tensor: ...


@overload
def _as(value: Scalar, like: Tensor) -> Scalar: ...


def _as(value: Scalar, like: Tensor) -> Scalar:
    """Move a tensor parameter to the dtype and device of ``like``; plain numbers pass through."""
    if isinstance(value, Tensor):
        return value.to(dtype=like.dtype, device=like.device)
    return value


class Affinity:
    """Base class: says what f and C are and how to lower them to a :class:`ScoreForm`."""

    kernel: str = "exp"
    norm: str = "sum"
    #: The exact closed form the sum has on the complete graph (``"dot_product"``: ``q (k^T v)``;
    #: ``"concatenation"``: sorted prefix sums of ReLU(a_i + b_j)), or None; the algebra backend asks.
    closed_form: Optional[str] = None

    def validate(self, query: Tensor, key: Tensor) -> None:
        """Check the parameters against the query/key shapes; raise ValueError/TypeError."""

    def tensors(self) -> tuple[Tensor, ...]:
        """Tensor parameters (for device checks)."""
        return ()

    def _checked(self) -> tuple[tuple[str, Tensor, bool], ...]:
        """(name, tensor, must be > 0) for each tensor parameter :meth:`check_values` checks."""
        return ()

    def check_values(self) -> None:
        """Check the current values of the tensor parameters (finite; bandwidths > 0).

        Parameters are the caller's tensors, so an in-place edit after construction is seen here.
        Data-dependent: the core op runs it once per call in eager mode, not under ``torch.compile``.
        """
        for name, t, positive in self._checked():
            _check_tensor_values(name, t, positive=positive)

    def form(self, query: Tensor, key: Tensor) -> ScoreForm:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Softmax(Affinity):
    """Embedded-Gaussian / attention affinity ``f = exp(scale * q.k)``, ``C = sum_j f``.

    Args:
        scale: logit scale; None means 1/sqrt(d) as in
            :func:`torch.nn.functional.scaled_dot_product_attention`. A tensor is trainable.
            The original non-local "gaussian" and "embedded gaussian" blocks use scale=1.
    """

    kernel, norm = "exp", "sum"

    def __init__(self, scale: Optional[Scalar] = None):
        if scale is not None:
            _check_scalar("Softmax(scale)", scale, positive=False, scalar=True)
        self.scale = scale

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.scale,) if isinstance(self.scale, Tensor) else ()

    def _checked(self):
        return (("Softmax(scale)", self.scale, False),) if isinstance(self.scale, Tensor) else ()

    def form(self, query: Tensor, key: Tensor) -> ScoreForm:
        scale = 1.0 / math.sqrt(query.shape[-1]) if self.scale is None else _as(self.scale, query)
        if isinstance(scale, Tensor):
            scale = scale.reshape(())
        return _checked(self, ScoreForm(query * scale, key, None, None, "exp", "sum"),
                        bound=_scaled_bound(query, key, scale))

    def check_scores(self, query: Tensor, key: Tensor) -> None:
        """:meth:`form`'s overflow check without forming the scaled queries (for kernels that take a float
        scale themselves, as SDPA does); eager mode only, like the check itself."""
        if isinstance(self.scale, Tensor):
            self.form(query, key)
            return
        scale = 1.0 / math.sqrt(query.shape[-1]) if self.scale is None else float(self.scale)
        _checked(self, ScoreForm(query, key, None, None, "exp", "sum"), factor=abs(scale))

    def __repr__(self) -> str:
        return f"Softmax(scale={_fmt(self.scale)})"


class Gaussian(Affinity):
    """Gaussian affinity ``f = exp(-|q/b - k/b|^2 / 2)`` with a per-dimension bandwidth b.

    This is the dense-CRF kernel (features pre-divided by theta) and the non-local-means weight.

    Args:
        bandwidth: scalar or (d,) tensor of per-dimension bandwidths (> 0). A tensor is trainable.
        normalize: True for ``C = sum_j f`` (a normalised filter, as non-local means); False for
            ``C = 1`` (the raw Gaussian sum of the dense-CRF message).
        offset: o >= 0 flattens the top: ``f = exp(-max(|q' - k'|^2 / 2 - o, 0))``, i.e. distances
            below sqrt(2 o) all weigh 1 (non-local means' noise-variance correction). 0 (default)
            is the plain Gaussian.
        cutoff: None (default: every pair) or c >= 0 truncates the kernel: ``f = 0`` where
            ``max(|q' - k'|^2 / 2 - o, 0) > c`` (weights below exp(-c) are dropped, as scikit-image's
            fast non-local means drops those below exp(-5)). A dropped pair is a non-edge: it adds
            to neither sum nor C, and a query whose every pair is dropped gets 0 (and a log-normaliser
            of -inf).
    """

    kernel = "exp"

    def __init__(self, bandwidth: Scalar = 1.0, normalize: bool = True, offset: float = 0.0,
                 cutoff: Optional[float] = None):
        _check_scalar("Gaussian(bandwidth)", bandwidth, positive=True)
        if isinstance(bandwidth, Tensor) and bandwidth.dim() > 1:
            raise ValueError(
                f"Gaussian(bandwidth) must be a scalar or (d,), got shape {tuple(bandwidth.shape)}"
            )
        if not isinstance(normalize, bool):
            raise TypeError(f"Gaussian(normalize) must be a bool, got {type(normalize).__name__}")
        if not finite_number(offset):
            raise ValueError(f"Gaussian(offset) must be a finite number >= 0, got {offset!r}")
        if cutoff is not None and not finite_number(cutoff):
            raise ValueError(f"Gaussian(cutoff) must be None or a finite number >= 0, got {cutoff!r}")
        self.bandwidth = bandwidth
        self.normalize = normalize
        self.offset = float(offset)
        self.cutoff = None if cutoff is None else float(cutoff)
        self.norm = "sum" if normalize else "none"

    def validate(self, query: Tensor, key: Tensor) -> None:
        b = self.bandwidth
        if isinstance(b, Tensor) and b.dim() == 1 and b.shape[0] not in (1, query.shape[-1]):
            raise ValueError(
                f"Gaussian(bandwidth) has {b.shape[0]} entries but the features have d={query.shape[-1]}"
            )

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.bandwidth,) if isinstance(self.bandwidth, Tensor) else ()

    def _checked(self):
        b = self.bandwidth
        return (("Gaussian(bandwidth)", b, True),) if isinstance(b, Tensor) else ()

    def scaled(self, query: Tensor, key: Tensor, fresh: bool = False) -> tuple[Tensor, Tensor]:
        """The features in bandwidth units (q / b, k / b): fresh tensors (one when key is query).

        ``fresh``: query and key are the caller's own temporaries (no one else holds them), so a float
        bandwidth divides them in place (no second N x d allocation; autograd needs neither value)."""
        b = _as(self.bandwidth, query)
        if fresh and not isinstance(b, Tensor):
            q = query.div_(b)
            return q, (q if key is query else key.div_(b))
        q = query / b
        return q, (q if key is query else key / b)

    def form(self, query: Tensor, key: Tensor) -> ScoreForm:
        # Centred on a common (detached) shift, so the expansion of |q' - k'|^2 below loses only
        # rounding relative to the data's spread, not to its distance from the origin.
        centre = _centre(query, key)
        shifted = query - centre
        q, k = self.scaled(shifted, shifted if key is query else key - centre, fresh=True)
        col = -0.5 * (k * k).sum(-1)
        # With C = sum f the row term -|q'|^2/2 cancels (softmax is shift invariant per row):
        # dropping it keeps the logits small and loses nothing, values and gradients alike. The
        # flat top (offset > 0) and the cut-off need the true distance, so they keep the row term.
        dropped = self.normalize and not self.offset and self.cutoff is None
        row_of = lambda: -0.5 * (q * q).sum(-1)  # noqa: E731
        if dropped:
            form = ScoreForm(q, k, None, col, "exp", self.norm, None, lse_row_of=row_of, floor=self.cutoff)
        else:
            form = ScoreForm(q, k, row_of(), col, "exp", self.norm, self.offset or None, floor=self.cutoff)
        return _checked(self, form, bound=self._score_bound(query, key) if dropped else None)

    def _score_bound(self, query: Tensor, key: Tensor) -> Optional[float]:
        """An upper bound of |s_ij| for :meth:`form`'s dropped-row scores from the call's value scan
        (:func:`nlgraph._values.known_norm`), or None (then the overflow check scans the form).

        With c the keys' mean (a mean of rows, so |c| <= |K|_F / sqrt(M)) and R_q, R_k the numbers of
        query and key rows, |Q - c|_F <= |Q|_F + sqrt(R_q / M) |K|_F, likewise for K; dividing by the
        bandwidth b gives Q', K'. Then |q'_i . k'_j| (and every partial sum) <= |Q'|_F |K'|_F and
        |col_j| = |k'_j|^2 / 2 <= |K'|_F^2 / 2. Forming q', k' rounds twice (the shift, the scale) and
        |k'|^2 sums d rounded squares: a factor (1 + (d + 4) u) covers each (the caller's own factor
        covers the score's dot product). For a float bandwidth and the forms without a row term (the
        normalised Gaussian without flat top or cut-off: :meth:`form` asks only for those).
        """
        if isinstance(self.bandwidth, Tensor):
            return None
        nq, nk = known_norm(query), known_norm(key)
        if nq is None or nk is None:
            return None
        d, m = query.shape[-1], key.shape[-2]
        if not d or not m:
            return None
        rows_q, rows_k = query.numel() // d, key.numel() // d
        u = 2.0**-53 if query.dtype == torch.float64 else 2.0**-24
        grow = 1 + (d + 4) * u
        b = float(self.bandwidth)
        q_b = (nq + math.sqrt(rows_q / m) * nk) / b * grow
        k_b = (nk + math.sqrt(rows_k / m) * nk) / b * grow
        return q_b * k_b + 0.5 * k_b * k_b * grow

    def __repr__(self) -> str:
        extra = f", offset={self.offset}" if self.offset else ""
        extra += f", cutoff={self.cutoff}" if self.cutoff is not None else ""
        return f"Gaussian(bandwidth={_fmt(self.bandwidth)}, normalize={self.normalize}{extra})"


class DotProduct(Affinity):
    """Dot-product affinity ``f = scale * q.k``, ``C = number of neighbours`` (Wang et al. 2018).

    On the complete graph this is exactly ``scale * q (k^T v) / M``, which the ``algebra`` backend
    computes in O(N d e) instead of O(N M d).
    """

    kernel, norm = "linear", "count"
    closed_form = "dot_product"

    def __init__(self, scale: Scalar = 1.0):
        _check_scalar("DotProduct(scale)", scale, positive=False, scalar=True)
        self.scale = scale

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.scale,) if isinstance(self.scale, Tensor) else ()

    def _checked(self):
        return (("DotProduct(scale)", self.scale, False),) if isinstance(self.scale, Tensor) else ()

    def form(self, query: Tensor, key: Tensor) -> ScoreForm:
        scale = _as(self.scale, query)
        if isinstance(scale, Tensor):
            scale = scale.reshape(())
        return _checked(self, ScoreForm(query * scale, key, None, None, "linear", "count"),
                        bound=_scaled_bound(query, key, scale))

    def __repr__(self) -> str:
        return f"DotProduct(scale={_fmt(self.scale)})"


class Concatenation(Affinity):
    """Concatenation affinity ``f = ReLU(w . [q_i, k_j] + b) = ReLU(w_q.q_i + w_k.k_j + b)``.

    ``C = number of neighbours`` as in Wang et al. 2018. Summed exactly in O((N + M) log M) per
    value channel by the ``algebra`` backend (keys sorted by w_k.k_j, prefix sums).

    Args:
        weight: (2d,) tensor, the first d entries act on the query, the last d on the key
            (the layout of a 1x1 convolution over the concatenated features).
        bias: optional scalar bias b.
    """

    kernel, norm = "relu", "count"
    closed_form = "concatenation"

    def __init__(self, weight: Tensor, bias: Optional[Scalar] = None):
        if not isinstance(weight, Tensor):
            raise TypeError(f"Concatenation(weight) must be a tensor, got {type(weight).__name__}")
        if weight.dim() != 1 or weight.shape[0] % 2 or weight.shape[0] == 0:
            raise ValueError(f"Concatenation(weight) must have shape (2*d,), got {tuple(weight.shape)}")
        _check_scalar("Concatenation(weight)", weight, positive=False)
        if bias is not None:
            _check_scalar("Concatenation(bias)", bias, positive=False, scalar=True)
        self.weight = weight
        self.bias = bias

    def validate(self, query: Tensor, key: Tensor) -> None:
        if self.weight.shape[0] != 2 * query.shape[-1]:
            raise ValueError(
                f"Concatenation(weight) has shape {tuple(self.weight.shape)}, expected (2*d,) = "
                f"({2 * query.shape[-1]},) for query of shape {tuple(query.shape)}"
            )

    def tensors(self) -> tuple[Tensor, ...]:
        extra = (self.bias,) if isinstance(self.bias, Tensor) else ()
        return (self.weight,) + extra

    def _checked(self):
        extra = (("Concatenation(bias)", self.bias, False),) if isinstance(self.bias, Tensor) else ()
        return (("Concatenation(weight)", self.weight, False),) + extra

    def form(self, query: Tensor, key: Tensor) -> ScoreForm:
        w = _as(self.weight, query)
        d = query.shape[-1]
        row = query @ w[:d]
        if self.bias is not None:
            row = row + (_as(self.bias, query).reshape(()) if isinstance(self.bias, Tensor) else self.bias)
        col = key @ w[d:]
        return _checked(self, ScoreForm(None, None, row, col, "relu", "count"))

    def __repr__(self) -> str:
        return f"Concatenation(weight={_fmt(self.weight)}, bias={_fmt(self.bias)})"


class EdgeWeighted(Affinity):
    """Per-edge weights: ``f'_ij = w_ij * f(q_i, k_j)`` for a base affinity.

    Args:
        base: the affinity to weight.
        weight: non-negative weights, either dense (..., N, M) (broadcastable, like an SDPA mask)
            or (E,), one per edge of an :class:`nlgraph.graph.EdgeIndex` graph. Zero removes an
            edge. Dense weights receive gradients on every backend; per-edge (E,) weights on the
            ``reference`` backend (others say so in their capability check).

    With the count normalisation (DotProduct, Concatenation) C_i = sum_j w_ij, so integer weights
    behave exactly like repeated edges. Internally the weights become an additive log-weight on the
    scores, the same channel an SDPA float ``attn_mask`` uses.
    """

    def __init__(self, base: Affinity, weight: Tensor):
        if not isinstance(base, Affinity) or isinstance(base, EdgeWeighted):
            raise TypeError(f"EdgeWeighted(base) must be a non-weighted Affinity, got {base!r}")
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            raise TypeError("EdgeWeighted(weight) must be a floating-point tensor")
        if weight.dim() == 0:
            raise ValueError("EdgeWeighted(weight) must be (E,) per edge or dense (..., N, M), got a 0-dim "
                             "tensor")
        self.base = base
        self.weight = weight  # the caller's tensor: read (and re-checked) at every call
        self.kernel = base.kernel
        self.norm = base.norm
        if checking_values():
            self._check_weight()

    def _check_weight(self) -> None:
        if not finite_nonnegative(self.weight):
            raise ValueError(f"EdgeWeighted(weight) must be finite and >= 0 (shape "
                             f"{tuple(self.weight.shape)})")

    def check_values(self) -> None:
        self.base.check_values()
        self._check_weight()

    def validate(self, query: Tensor, key: Tensor) -> None:
        self.base.validate(query, key)

    def tensors(self) -> tuple[Tensor, ...]:
        return self.base.tensors() + (self.weight,)

    def form(self, query: Tensor, key: Tensor) -> ScoreForm:
        return self.base.form(query, key)

    def __repr__(self) -> str:
        return f"EdgeWeighted({self.base!r}, weight={tuple(self.weight.shape)})"
