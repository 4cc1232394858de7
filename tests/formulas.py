"""Materialised formulas written for the tests, independent of nlgraph's lowering.

Each builds the full N x M affinity matrix straight from the definition in design.md (explicit
pairwise differences for the Gaussian, explicit concatenation for the concatenation affinity),
and adjacency matrices from Python loops over nodes.
"""

from __future__ import annotations

import itertools
import math

import torch

# Tolerances (rtol, atol) for comparing a backend with a float64 formula or a peer, per compute dtype.
# fp16/bf16 are not in this table: they are judged against twice the error that plain PyTorch makes in
# the same precision (see test_numerics.py). Each entry is a rounding bound at the sizes it is used
# for, from the arithmetic, not a reading: an output computed through dependent sums of total length
# L, whose terms add up to S in magnitude, errs by at most ~L u S, and a softmax turns a relative error
# e of its logits into (1 + max |logit|) e of its weights (u: unit roundoff, 2^-24 / 2^-53).
# - float32, used by test_sdpa (N = 33, M = 29, D = 16, E = 8, ours vs SDPA in float32): the logits'
#   sums of |terms| reach 9.3 (max |logit| 4.6), so weights err by <= (D + 1) u 9.3 + (M + 3) u = 190 u
#   and outputs (sum p |v| <= 1.6) by <= 1.1e-5 per side, 2.2e-5 for the two: atol 2e-5. Relative to
#   an output: ~220 u per side forward, the backward's chains about twice as long with dy . v up to 11
#   in the softmax's Jacobian: rtol 2e-4 (~3400 u).
# - float64 (u = 1.1e-16), every float64 comparison in the suite (the TOL of the other files too):
#   chains L <= ~300 and logits whose sums of |terms| reach ~250 (criss-cross with unit-variance
#   random weights) bound weights' relative errors by ~(d + M + 3) u 250 < 1e-12 and outputs' by
#   ~L u S <= 1e-12 S (S: sum of the output's |terms|); atol 1e-10 covers every output with S < 100,
#   rtol 1e-9 the larger ones (gradients up to ~200, as large as their sums).
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-4, 2e-5),
}


def affinity_matrix(kind: str, q, k, params: dict):
    """f(q_i, k_j) for every pair, (..., N, M), and the normalisation kind."""
    if kind == "softmax":
        return torch.exp(log_affinity(kind, q, k, params)), "sum"
    if kind in ("gaussian", "gaussian_unnorm"):
        return torch.exp(log_affinity(kind, q, k, params)), ("sum" if kind == "gaussian" else "none")
    if kind == "dot":
        return params.get("scale", 1.0) * torch.einsum("...nd,...md->...nm", q, k), "count"
    if kind == "concat":
        w = params["weight"]
        n, m = q.shape[-2], k.shape[-2]
        qe = q[..., :, None, :].expand(*q.shape[:-2], n, m, q.shape[-1])
        ke = k[..., None, :, :].expand(*k.shape[:-2], n, m, k.shape[-1])
        cat = torch.cat(torch.broadcast_tensors(qe, ke), dim=-1)  # [theta(x_i), phi(x_j)]
        return torch.relu(cat @ w + params.get("bias", 0.0)), "count"
    raise ValueError(kind)


def aggregate_formula(kind: str, q, k, v, params: dict, adj=None, bias=None):
    """y_i = (1/C_i) sum_j adj_ij exp(bias_ij) f_ij v_j, C per the affinity; empty rows give 0.

    adj: (..., N, M) float edge multiplicities / weights (None = complete graph).
    bias: (..., N, M) additive log-weights (an SDPA float mask), -inf allowed.
    """
    f, norm = affinity_matrix(kind, q, k, params)
    w = torch.ones_like(f) if adj is None else adj.to(f.dtype).expand_as(f)
    if bias is not None:
        w = w * torch.exp(bias)
    fw = f * w
    y = fw @ v
    if norm == "none":
        return y
    c = fw.sum(-1, keepdim=True) if norm == "sum" else w.sum(-1, keepdim=True)
    return torch.where(c != 0, y / torch.where(c != 0, c, torch.ones_like(c)), torch.zeros_like(y))


def grid_coords(shape):
    return list(itertools.product(*[range(s) for s in shape]))


def window_adjacency(shape, radius):
    coords = grid_coords(shape)
    n = len(coords)
    adj = torch.zeros(n, n)
    for i, ci in enumerate(coords):
        for j, cj in enumerate(coords):
            if all(abs(a - b) <= radius for a, b in zip(ci, cj, strict=True)):
                adj[i, j] = 1
    return adj


def criss_cross_adjacency(h, w):
    adj = torch.zeros(h * w, h * w)
    for i in range(h * w):
        for j in range(h * w):
            if i // w == j // w or i % w == j % w:
                adj[i, j] = 1
    return adj


def edge_adjacency(edge_index, n, m, weight=None):
    """Dense adjacency adj[target, source] = sum of the weights of the (source -> target) edges.

    Built as a sum of one-hot matrices so it is differentiable w.r.t. ``weight``.
    """
    e = edge_index.shape[1]
    onehot = torch.zeros(e, n, m, dtype=torch.float64)
    for t in range(e):
        onehot[t, int(edge_index[1, t]), int(edge_index[0, t])] = 1.0
    w = torch.ones(e, dtype=torch.float64) if weight is None else weight
    return torch.einsum("e,enm->nm", w, onehot)


def log_affinity(kind: str, q, k, params: dict):
    """log f(q_i, k_j) for every pair, (..., N, M), for the exp-kernel affinities (the logits)."""
    if kind == "softmax":
        scale = params.get("scale", 1.0 / math.sqrt(q.shape[-1]))
        return scale * torch.einsum("...nd,...md->...nm", q, k)
    if kind in ("gaussian", "gaussian_unnorm"):
        b = params["bandwidth"]
        diff = q[..., :, None, :] / b - k[..., None, :, :] / b
        dist = 0.5 * (diff * diff).sum(-1)
        if params.get("offset"):
            dist = torch.clamp(dist - params["offset"], min=0.0)  # flat top
        if params.get("cutoff") is not None:  # truncated: no weight beyond the cut-off
            dist = torch.where(dist > params["cutoff"], math.inf, dist)
        return -dist
    raise ValueError(kind)


def log_normaliser(kind: str, q, k, params: dict, adj=None, bias=None):
    """lse_i = log C_i, (..., N), from the definition; -inf for a query without neighbours.

    C = sum f (softmax, gaussian): torch.logsumexp over the materialised logits log f_ij + log adj_ij
    + bias_ij; count (dot, concat): log sum_j adj_ij exp(bias_ij); none (gaussian_unnorm): 0. Rows
    without an edge are set to -inf after a logsumexp over zeros, so gradients stay finite there.
    adj: (..., N|1, M|1) edge weights >= 0 (None = complete), bias: additive log-weights (-inf allowed).
    """
    n, m = q.shape[-2], k.shape[-2]
    one = torch.ones((), dtype=q.dtype)
    w = one if adj is None else adj
    logw = torch.zeros((), dtype=q.dtype) if adj is None else torch.where(
        adj > 0, torch.log(torch.where(adj > 0, adj, one)), torch.full_like(adj, -math.inf))
    if bias is not None:
        logw = logw + bias
        w = w * torch.exp(bias)
    if kind in ("dot", "concat"):
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], torch.as_tensor(w).shape[:-2])
        c = torch.broadcast_to(w, (*lead, n, m)).sum(-1)
        return torch.where(c > 0, torch.log(torch.where(c > 0, c, torch.ones_like(c))),
                           torch.full_like(c, -math.inf))
    logits = log_affinity("gaussian" if kind == "gaussian_unnorm" else kind, q, k, params) + logw
    edge = torch.isfinite(logits)
    has = edge.any(-1)
    if kind == "gaussian_unnorm":
        return torch.where(has, 0.0, -math.inf).to(q.dtype)
    safe = torch.where(has[..., None], logits, torch.zeros_like(logits))
    return torch.where(has, torch.logsumexp(safe, -1), torch.full_like(has, -math.inf, dtype=q.dtype))


def _axis_neighbours(a: int, b: int, s: int, k: int, t: int, causal: bool, border: str) -> bool:
    """Whether key coordinate b is in the window of query coordinate a on one axis (LocalWindow's rule,
    written from its docstring: same dilation group, then the clipped, shifted or causal window)."""
    if a % t != b % t:
        return False
    a1, b1 = a // t, b // t
    group = len(range(a % t, s, t))  # positions of the query's dilation group on this axis
    if causal:
        return 0 <= a1 - b1 <= k - 1
    if border == "clip":
        return -(k // 2) <= b1 - a1 <= k - 1 - k // 2
    start = min(max(a1 - k // 2, 0), group - k)
    return start <= b1 < start + k


def window_options_adjacency(shape, kernel_size, dilation=None, is_causal=None, border="clip"):
    """Dense (N, N) float64 adjacency of a LocalWindow with per-axis options, from loops over nodes."""
    dims = len(shape)
    dilation = dilation or (1,) * dims
    is_causal = is_causal or (False,) * dims
    coords = grid_coords(shape)
    n = len(coords)
    adj = torch.zeros(n, n, dtype=torch.float64)
    for i, ci in enumerate(coords):
        for j, cj in enumerate(coords):
            adj[i, j] = float(all(_axis_neighbours(a, b, s, k, t, c, border) for a, b, s, k, t, c
                                  in zip(ci, cj, shape, kernel_size, dilation, is_causal, strict=True)))
    return adj


def window_rpb_bias(shape, kernel_size, dilation, rpb):
    """Dense (..., N, N) additive logits rpb[..., b'_0 - a'_0 + k_0 - 1, ...] (zero where the relative
    offset is off the table), built from a loop over node pairs; differentiable w.r.t. rpb."""
    dims = len(shape)
    coords = grid_coords(shape)
    n = len(coords)
    lead = rpb.shape[:rpb.dim() - dims]
    flat = rpb.reshape(*lead, -1)
    idx = torch.zeros(n, n, dtype=torch.long)
    inside = torch.zeros(n, n, dtype=torch.bool)
    for i, ci in enumerate(coords):
        for j, cj in enumerate(coords):
            pos, ok = 0, True
            for a, b, k, t in zip(ci, cj, kernel_size, dilation, strict=True):
                rel = b // t - a // t + k - 1
                ok = ok and 0 <= rel <= 2 * k - 2
                pos = pos * (2 * k - 1) + min(max(rel, 0), 2 * k - 2)
            idx[i, j], inside[i, j] = pos, ok
    return torch.where(inside, flat[..., idx], torch.zeros((), dtype=rpb.dtype))
