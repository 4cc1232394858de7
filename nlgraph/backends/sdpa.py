"""The ``sdpa`` backend: torch's own attention kernels (``scaled_dot_product_attention``).

Where a maintained fused kernel computes the case exactly, nlgraph routes to it instead of
competing with it: the fused flash kernel on the CPU (4-D input, equal q/v widths), flash,
memory-efficient or cuDNN attention on CUDA, and SDPA's math path where torch itself takes it.
Cases, each exact (the same formula, only the summation order differs):

* ``Softmax`` (float or tensor scale: a tensor scale multiplies the queries, so it gets its
  gradient by autograd) on the complete graph;
* bool and float ``Mask`` graphs (SDPA's ``attn_mask`` semantics, broadcast shapes), ``Causal``
  (SDPA's ``is_causal``, top-left aligned) and ``ExcludeSelf`` (an N x N bool mask), and
  intersections of them (masks combined as torch combines them: bool masks and, float masks add);
* the normalised ``Gaussian`` without a flat top: softmax cancels the row term of
  ``-|q' - k'|^2 / 2``, leaving ``softmax_j(q'_i . k'_j - |k'_j|^2 / 2)`` with q', k' the centred
  features in bandwidth units (see :mod:`nlgraph.affinity`): a column bias, i.e. a broadcast
  (..., 1, M) float mask. When that bias needs a gradient (keys or a tensor bandwidth require
  grad), it travels instead as one more feature, ``[q', 1] . [k', c]``, so the fused kernel's own
  backward differentiates it (SDPA's CPU flash kernel takes no mask that requires grad; its math
  path would materialise N x M). A flat top (``offset > 0``) is not a column bias: chunked/triton run it.
* attention dropout (normalised weights times Bernoulli(1 - p) / (1 - p), the normaliser
  unchanged, as ``aggregate`` defines it). SDPA draws the mask from torch's default RNG of the
  device; this backend reseeds that RNG with the op's seed for the call and restores it after, so
  the op stays deterministic per seed / ``generator`` and a call does not advance the global RNG.
  The Bernoulli stream is SDPA's, not chunked's (each backend's dropout is its own correct sample;
  equal seeds give equal masks within one backend). Under ``torch.compile`` the reseeding steps
  aside and the compiled RNG draws the mask.

Leading dims are flattened to SDPA's 4-D (B, H, N, d) views (expanded with stride 0 where inputs
broadcast, never copied when they are views already); inputs whose feature rows are not contiguous
are copied once (the fused kernels need unit stride there). Where values are narrower or wider
than the features (up to 2x), the narrower side is zero-padded so the fused CPU kernel (which needs
equal widths) runs; wider gaps run SDPA as is (its math path).

Automatic dispatch (``prefer``) takes this backend where a fused kernel runs, and for the math path
only while the (B, H, N, M) scores it materialises stay small (``MATH_MAX_SCORES``) or no larger
than the output; otherwise chunked (CPU) or triton (CUDA, wide heads) run the case in O(N + M)
memory. On the CPU, calls that will be differentiated with heads at least 512 wide and small N M take
SDPA's math kernel, measured faster there (``MATH_GRAD_MIN_WIDTH``). :func:`kernel_for` names the
kernel that runs for a case (``nlgraph info`` prints it). Plain softmax attention reaches this backend
without the registry walk: :func:`fast_run` (through :func:`nlgraph.dispatch.fast_softmax`) answers
where the general path would make the same SDPA call.
Not here: C = 1 and count normalisations, windows, criss-cross, k-NN and edge-list graphs, edge
weights on edge lists, the Gaussian's flat top, and ``return_lse`` (SDPA's public API does not
return the log-sum-exp).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._shapes import broadcast_shapes
from .._values import FLOAT_DTYPES, checking_values, distinct, norm_bounds, scores_fit
from ..affinity import Gaussian, Softmax
from ..graph import Causal, Mask

__all__ = ["can_run", "prefer", "run", "fast_run", "kernel_for", "kernel_summary", "MATH_MAX_SCORES"]

#: The math path materialises the (B, H, N, M) scores: automatic dispatch takes it up to this many
#: entries (64 MiB in float32), or when the output is at least as large (need_weights-style values).
MATH_MAX_SCORES = 1 << 24

#: The smallest scale passed with ``is_causal`` (the smallest positive float32); below it a bool mask.
MIN_CAUSAL_SCALE = 2.0**-149

#: The widest ratio of value to feature width (or back) that is zero-padded to equal widths.
PAD_RATIO = 2

_TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
#: torch >= 2.5: a fully masked row gives zeros (SDPA's safe softmax), as the core op defines it.
_ZERO_EMPTY_ROWS = _TORCH >= (2, 5)

_KERNELS = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def _members(graph) -> list:
    if graph is None:
        return []
    return list(graph.members())


def _is_sdpa_mask(g) -> bool:
    """SDPA describes the graph itself: a stored ``attn_mask``, ``is_causal`` or the j != i mask."""
    return g.attn_mask is not None or g.causal or g.excludes_self


def _gaussian_ok(affinity) -> bool:
    return (type(affinity) is Gaussian and affinity.normalize and not affinity.offset
            and affinity.cutoff is None)


def can_run(query, key, value, affinity, graph, dropout_p: float = 0.0) -> tuple[bool, str]:
    if query.device.type not in ("cpu", "cuda"):
        return False, f"sdpa runs on CPU and CUDA tensors here, got {query.device}"
    if type(affinity) is Softmax:
        pass
    elif type(affinity) is Gaussian:
        if not affinity.normalize:
            return False, "SDPA normalises by the softmax: Gaussian(normalize=False) (C = 1) is not attention"
        if affinity.offset:
            return False, "the Gaussian's flat top (offset > 0) is not a column bias; SDPA cannot express it"
        if affinity.cutoff is not None:
            return False, "the Gaussian's cut-off drops pairs by their distance; SDPA cannot express it"
    else:
        return False, f"sdpa computes softmax attention (Softmax, normalised Gaussian), not {affinity!r}"
    members = _members(graph)
    for g in members:
        if not _is_sdpa_mask(g):
            return False, (f"sdpa takes the complete graph, Mask, Causal and ExcludeSelf (and their "
                           f"intersections), not {graph!r}")
    if not _ZERO_EMPTY_ROWS and any(not g.causal for g in members):
        return False, f"torch {torch.__version__} returns NaN for fully masked rows (zeros from torch 2.5)"
    return True, ""


@dataclass
class _Layout:
    """The shapes of the SDPA call this backend makes, without building it."""

    lead: tuple[int, ...]
    n: int
    m: int
    d: int  # feature width handed to SDPA (after augmentation / padding)
    e: int  # value width handed to SDPA (after padding)
    e_out: int  # the op's value width e
    augment: bool  # the Gaussian's column bias travels as an extra feature
    mask: bool  # an attn_mask is passed
    mask_grad: bool  # ... and it requires grad
    causal: bool  # is_causal=True


def _needs_bias_grad(affinity, key) -> bool:
    if not torch.is_grad_enabled():
        return False
    b = affinity.bandwidth
    return key.requires_grad or (isinstance(b, Tensor) and b.requires_grad)


def _layout(query, key, value, affinity, graph) -> _Layout:
    members = _members(graph)
    shapes = [query.shape[:-2], key.shape[:-2], value.shape[:-2]]
    if graph is not None:
        shapes.append(torch.Size(graph.lead_shape))
    lead = tuple(broadcast_shapes(*shapes))
    n, m, d, e = query.shape[-2], key.shape[-2], query.shape[-1], value.shape[-1]
    gaussian = type(affinity) is Gaussian
    augment = gaussian and _needs_bias_grad(affinity, key)
    col_mask = gaussian and not augment
    # torch's CPU flash kernel masks is_causal's scores with -inf before scaling them: a scale <= 0 (also
    # one that rounds to 0 in float32) turns them into NaN (-inf * 0) or +inf (measured, torch 2.13). Then
    # the triangle travels as a bool mask.
    s = affinity.scale if type(affinity) is Softmax else None
    positive = s is None or isinstance(s, Tensor) or s >= MIN_CAUSAL_SCALE
    causal = len(members) == 1 and members[0].causal and not col_mask and positive
    float_masks = [g.attn_mask for g in members
                   if g.attn_mask is not None and g.attn_mask.is_floating_point()]
    mask = (bool(members) and not causal) or col_mask
    mask_grad = torch.is_grad_enabled() and any(t.requires_grad for t in float_masks)
    dq, dv = d + augment, e
    if dq != dv and max(dq, dv) <= PAD_RATIO * min(dq, dv):
        dq = dv = max(dq, dv)
    if augment and dq == dv:
        dq = dv = dq + (-dq % 8)  # measured: a width of a multiple of 8 runs faster than d + 1
    return _Layout(lead, n, m, dq, dv, e, augment, mask, mask_grad, causal)


#: Wide heads in training on the CPU: SDPA's math path (it materialises the scores) beat its flash kernel
#: forward+backward at d = 512 and N = M = 1024 (math/flash 0.85-0.95, one thread, five runs on a 2-core
#: VM); at N = 2048 the runs disagreed (0.88-1.14) and at N = 4096 flash won. So math runs there only:
#: head width >= MATH_GRAD_MIN_WIDTH, N M <= MATH_GRAD_MAX_PAIRS per head, all heads' scores within
#: MATH_GRAD_MAX_SCORES (32 MiB in float32).
MATH_GRAD_MIN_WIDTH = 512
MATH_GRAD_MAX_PAIRS = 1 << 20
MATH_GRAD_MAX_SCORES = 1 << 23


def _math_trains_faster(device: torch.device, d: int, lead: tuple[int, ...], n: int, m: int,
                        tensors: tuple[Tensor, ...]) -> bool:
    """True where SDPA's math path is the faster kernel for a CPU call that will be differentiated."""
    if device.type != "cpu" or d < MATH_GRAD_MIN_WIDTH or n * m > MATH_GRAD_MAX_PAIRS:
        return False
    if math.prod(lead) * n * m > MATH_GRAD_MAX_SCORES or torch.compiler.is_compiling():
        return False
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _fused_expected(lay: _Layout, device: torch.device, dropout_p: float) -> bool:
    """Whether SDPA takes a fused kernel for this layout (static rules; :func:`kernel_for` asks torch).

    CPU (torch's flash kernel for CPU): 4-D input (always, here), unit stride along features (made
    here), q/k/v of one width, no dropout and no attn_mask that requires grad. CUDA: flash,
    efficient or cuDNN attention take head widths up to 256 in this form."""
    if device.type == "cpu":
        # the global switch (sdpa_kernel) is read in eager mode only: a traced graph cannot branch on it
        enabled = torch.compiler.is_compiling() or torch.backends.cuda.flash_sdp_enabled()
        return lay.d == lay.e and dropout_p == 0 and not lay.mask_grad and enabled
    return lay.d <= 256 and lay.e <= 256 and not lay.mask_grad


def prefer(query, key, value, affinity, graph, dropout_p: float = 0.0) -> bool:
    lay = _layout(query, key, value, affinity, graph)
    if _fused_expected(lay, query.device, dropout_p):
        return True
    if query.device.type == "cuda":
        return False  # wide heads: triton's kernels (or chunked) in O(N + M) memory
    scores = math.prod(lay.lead) * lay.n * lay.m
    return scores <= MATH_MAX_SCORES or lay.e_out >= lay.m


@dataclass
class _Call:
    query: Tensor
    key: Tensor
    value: Tensor
    mask: Optional[Tensor]
    causal: bool
    scale: Optional[float]
    lead: tuple[int, ...]
    e: int
    math_path: bool = False  # run SDPA's math kernel (:func:`_math_trains_faster`)


def _as4(t: Tensor, lead: tuple[int, ...], full: bool) -> Tensor:
    """(..., r, c) broadcasting against ``lead`` as a 4-D (B, H, r, c) tensor: a view, copied only where
    broadcast leading dims cannot merge. ``full``: expanded to the whole batch (q, k, v: the fused
    kernels want equal batch dims); else size-1 dims stay 1 where they can (masks broadcast)."""
    k = len(lead)
    if k == 2 and t.dim() == 4 and (not full or tuple(t.shape[:2]) == lead):
        return t  # already (B, H, r, c) against a (B, H) batch: as is (the common case, no view)
    t = t.reshape((1,) * (k + 2 - t.dim()) + tuple(t.shape))
    rc = tuple(t.shape[-2:])
    if k <= 2:
        lead4 = (1,) * (2 - k) + lead
        t = t.reshape((1,) * (2 - k) + tuple(t.shape))
        return t.expand(*lead4, *rc) if full else t
    front, head = math.prod(lead[:-1]), lead[-1] if full else t.shape[k - 1]
    if all(s == 1 for s in t.shape[:k - 1]):
        t = t.reshape(1, t.shape[k - 1], *rc)
        return t.expand(front, head, *rc) if full else t
    return t.expand(*lead[:-1], head, *rc).reshape(front, head, *rc)


def _mask_of(g, n: int, m: int, device: torch.device) -> Tensor:
    if g.attn_mask is not None:
        return g.attn_mask
    if g.excludes_self:
        return ~torch.eye(n, dtype=torch.bool, device=device)
    return torch.ones(n, m, dtype=torch.bool, device=device).tril()  # Causal, top-left aligned


def _pad(t: Tensor, width: int) -> Tensor:
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))


def _plan(query, key, value, affinity, graph) -> _Call:
    lay = _layout(query, key, value, affinity, graph)
    n, m = lay.n, lay.m
    device = query.device
    col = None
    scale: Optional[float]
    if type(affinity) is Softmax:
        s = affinity.scale
        if isinstance(s, Tensor):
            query, scale = query * s.to(query.dtype).reshape(()), 1.0
        else:
            # None: SDPA's own default 1/sqrt(d), unless padding widens the features it would read d from
            scale = None if s is None and lay.d == query.shape[-1] else (
                1.0 / math.sqrt(query.shape[-1]) if s is None else float(s))
            if checking_values():
                affinity.check_scores(query, key)  # eager: the overflow check every backend's form makes
    else:
        form = affinity.form(query, key)  # centred, in bandwidth units; the row term cancels
        query, key, col, scale = form.query, form.key, form.col, 1.0
        if lay.augment:
            query = torch.cat([query, query.new_ones(*query.shape[:-1], 1)], -1)
            key = torch.cat([key, col[..., None]], -1)
            col = None
    query, key, value = _pad(query, lay.d), _pad(key, lay.d), _pad(value, lay.e)
    q4, k4, v4 = (_as4(t, lay.lead, True) for t in (query, key, value))
    q4, k4, v4 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q4, k4, v4))
    mask = None
    if lay.mask:
        bools: list[Tensor] = []
        floats: list[Tensor] = []
        for g in _members(graph):
            t = _mask_of(g, n, m, device)
            (floats if t.is_floating_point() else bools).append(_as4(t, lay.lead, False))
        if col is not None:
            c = col.detach()[..., None, :]
            floats.append(_as4(c, lay.lead, False))
        for t in bools:
            mask = t if mask is None else mask & t
        if floats:
            total = floats[0].to(q4.dtype)
            for t in floats[1:]:
                total = total + t.to(q4.dtype)
            mask = total if mask is None else total.masked_fill(~mask, -math.inf)
    math_path = mask is None and _math_trains_faster(device, lay.d, lay.lead, n, m, (q4, k4, v4))
    return _Call(q4, k4, v4, mask, lay.causal, scale, lay.lead, lay.e_out, math_path)


def _math_only(on: bool):
    """A context that lets SDPA run only its math kernel (``on``), or nothing."""
    if not on:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int):
    """Run with the device's default RNG seeded to ``seed``; its state is restored afterwards."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        gen = torch.cuda.default_generators[index]
    else:
        gen = torch.default_generator
    state = gen.get_state()
    gen.manual_seed(seed)
    try:
        yield
    finally:
        gen.set_state(state)


def run(query: Tensor, key: Tensor, value: Tensor, affinity, graph, *, dropout_p: float = 0.0,
        seed: int = 0) -> Tensor:
    call = _plan(query, key, value, affinity, graph)
    reseed = dropout_p > 0 and not torch.compiler.is_compiling()
    with _seeded(query.device, seed) if reseed else contextlib.nullcontext(), _math_only(call.math_path):
        y = F.scaled_dot_product_attention(call.query, call.key, call.value, attn_mask=call.mask,
                                           dropout_p=dropout_p, is_causal=call.causal, scale=call.scale)
    if y.shape[-1] != call.e:
        y = y[..., :call.e]
    return y.reshape(*call.lead, query.shape[-2], call.e)


_PLAIN = (Tensor, torch.nn.Parameter)


def fast_run(query: Tensor, key: Tensor, value: Tensor, scale: Optional[float],
             is_causal: bool) -> Optional[Tensor]:
    """Plain softmax attention with as little Python as it takes, or None: then the general path runs.

    :func:`nlgraph.aggregate` tries this first for ``Softmax`` (no tensor scale) on the complete graph
    (or ``is_causal``) with everything else at its default. It answers only where the general path
    would validate the inputs, choose this backend and make exactly this SDPA call: plain tensors of
    one float dtype and device, 3-D or 4-D with identical leading dims, q/k/v of one width that a
    fused kernel takes, nothing empty, eager mode (not traced, not vmapped), and values that pass the
    core op's NaN/Inf scan and overflow screen (one pass and one sync: :func:`nlgraph._values.norm_bounds`,
    the screen's Cauchy-Schwarz bound as in :func:`nlgraph.affinity._checked`). Anything else,
    including every bad input, returns None, so errors and their messages are always the general
    path's. Measured on a 2-core CPU at (1, 1, 1024, 64): the general path's Python (validation, the
    registry walk, the plan) cost ~0.5 ms a call with the caches cold after the previous SDPA call,
    this one ~0.05 ms plus the scan.
    """
    if torch.compiler.is_compiling() or not checking_values():
        return None  # traced or vmapped: the general path (which traces to the same SDPA call)
    if type(query) not in _PLAIN or type(key) not in _PLAIN or type(value) not in _PLAIN:
        return None
    dtype, device = query.dtype, query.device
    if dtype not in FLOAT_DTYPES or key.dtype != dtype or value.dtype != dtype:
        return None
    if key.device != device or value.device != device:
        return None
    nd = query.dim()
    if nd not in (3, 4) or key.dim() != nd or value.dim() != nd:
        return None
    qs, ks, vs = query.shape, key.shape, value.shape
    d = qs[-1]
    if ks[-1] != d or vs[-1] != d or ks[-2] != vs[-2] or qs[:-2] != ks[:-2] or vs[:-2] != qs[:-2]:
        return None
    if not d or not qs[-2] or not ks[-2] or 0 in qs[:-2]:
        return None
    if is_causal and scale is not None and not scale >= MIN_CAUSAL_SCALE:
        return None  # the CPU flash kernel's is_causal needs a positive scale (see _layout)
    if device.type == "cpu":
        if not torch.backends.cuda.flash_sdp_enabled():  # the CPU flash switch (sdpa_kernel sets it)
            return None
    elif device.type != "cuda" or d > 256:
        return None
    lead = tuple(qs[:-2]) if nd == 4 else (1, qs[0])
    if _math_trains_faster(device, d, lead, qs[-2], ks[-2], (query, key, value)):
        return None  # the general path runs SDPA's math kernel here
    scanned = distinct((query, key, value))
    bounds = norm_bounds(scanned)
    if not all(math.isfinite(b) for b in bounds):
        return None  # NaN/Inf (or a tensor too large for the bound): the general path decides and says why
    nq, nk = bounds[0], next(b for u, b in zip(scanned, bounds, strict=True) if u is key)
    factor = 1.0 / math.sqrt(d) if scale is None else abs(float(scale))
    if not scores_fit(nq * nk * factor, d, dtype):
        return None
    if nd == 3:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    y = F.scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=scale)
    return y.squeeze(1) if nd == 3 else y


def kernel_for(query: Tensor, key: Tensor, value: Tensor, affinity=None, graph=None,
               dropout_p: float = 0.0) -> str:
    """The SDPA kernel torch selects for the call this backend makes on these inputs.

    One of ``"flash-cpu"`` (the fused CPU kernel), ``"flash"``, ``"efficient"``, ``"cudnn"`` (CUDA),
    ``"math"`` (the unfused reference path: it materialises the scores) or ``"overrideable"``. Asks
    torch (``torch._fused_sdp_choice``) on the exact tensors the backend would pass; eager only.

    Raises:
        ValueError: the backend cannot run this case (the reason is in the message).
    """
    affinity = Softmax() if affinity is None else affinity
    ok, reason = can_run(query, key, value, affinity, graph, dropout_p)
    if not ok:
        raise ValueError(f"sdpa cannot run this case: {reason}")
    call = _plan(query, key, value, affinity, graph)
    choice = int(torch._fused_sdp_choice(call.query, call.key, call.value, call.mask, dropout_p, call.causal,
                                         scale=call.scale))
    name = "math" if call.math_path else _KERNELS.get(choice, f"backend {choice}")
    return "flash-cpu" if name == "flash" and query.device.type == "cpu" else name


def kernel_summary(device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """The kernel SDPA picks on ``device`` for typical cases of this backend, one line (``nlgraph info``)."""
    x = torch.zeros(1, 8, 256, 64, device=device, dtype=dtype)
    grad_mask = Mask(torch.zeros(256, 256, device=device, dtype=dtype, requires_grad=True))
    cases = {"softmax (1, 8, 256, 64)": (Softmax(), None, 0.0), "causal": (Softmax(), Causal(), 0.0),
             "Gaussian": (Gaussian(1.0), None, 0.0), "float mask requiring grad": (Softmax(), grad_mask, 0.0),
             "dropout": (Softmax(), None, 0.1)}
    return "; ".join(f"{name}: {kernel_for(x, x, x, aff, graph, p)}"
                     for name, (aff, graph, p) in cases.items())
