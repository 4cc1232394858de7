"""``aggregate(..., return_lse=True)`` and ``nlgraph.merge``: against formulas written here.

lse == log C_i from the definition (tests/formulas.py ``log_normaliser``: ``torch.logsumexp`` of the
materialised logits for C = sum f, the log of the (weighted) neighbour count, 0 for C = 1, -inf for a
row without neighbours) on every backend that can run the case, forward and gradients (a loss that
reads y and lse); float64 gradcheck of the chunked backend's custom autograd with the lse output;
merge of 2-5 random disjoint key splits == one call over all keys, per normalisation, forward and
gradients, with masks, empty parts and all-empty rows.

Tolerances: float64 cases use the suite's table (formulas.TOLERANCES, derived there). The float32
cases (triton under the interpreter, chunked/reference in float32) have logits |s| <= ~6 (unit-variance
features, d = 4, bandwidths >= 1), sums over M <= 9 keys: lse errs by <= (d + 2) u 6 + M u ~ 50 u and
y / gradients by a few times that relative to their magnitude (u = 2^-24 = 6e-8): 1e-5 holds with
margin (as TOLERANCES[float32] for the longer test_sdpa chains).
"""

from __future__ import annotations

import math
import types

import pytest
import torch

import nlgraph
from nlgraph import affinity as A
from nlgraph import dispatch
from nlgraph import graph as G

from .formulas import TOLERANCES, aggregate_formula, log_affinity, log_normaliser

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _leaf(t: torch.Tensor, dtype=F64) -> torch.Tensor:
    return t.detach().to(dtype).requires_grad_(True)


def _pair(t: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A library leaf in ``dtype`` and its float64 twin for the formula (the same tensor in float64)."""
    lib = _leaf(t, dtype)
    return lib, (lib if dtype == F64 else _leaf(t))


def _affinity(kind: str, d: int, gen: torch.Generator, dtype=F64):
    """(library affinity, formula kind, formula params, [(parameter leaf, its float64 twin)])."""
    if kind == "softmax":
        s, s64 = _pair(torch.tensor(0.8, dtype=F64), dtype)
        return A.Softmax(scale=s), "softmax", {"scale": s64}, [(s, s64)]
    if kind == "softmax_default":
        return A.Softmax(), "softmax", {}, []
    if kind in ("gaussian", "gaussian_unnorm", "gaussian_offset"):
        b, b64 = _pair(torch.rand(d, generator=gen, dtype=F64) + 1.0, dtype)
        offset = 0.4 if kind == "gaussian_offset" else 0.0
        aff = A.Gaussian(b, normalize=kind != "gaussian_unnorm", offset=offset)
        return aff, ("gaussian_unnorm" if kind == "gaussian_unnorm" else "gaussian"), {
            "bandwidth": b64, "offset": offset}, [(b, b64)]
    if kind == "dot":
        return A.DotProduct(scale=0.5), "dot", {"scale": 0.5}, []
    if kind == "concat":
        w, w64 = _pair(torch.randn(2 * d, generator=gen, dtype=F64), dtype)
        return A.Concatenation(w, bias=0.2), "concat", {"weight": w64, "bias": 0.2}, [(w, w64)]
    raise AssertionError(kind)


KINDS = ["softmax", "softmax_default", "gaussian", "gaussian_unnorm", "gaussian_offset", "dot", "concat"]
GRAPHS = ["complete", "bool_mask", "float_mask", "exclude_self", "weighted"]


def _graph(name: str, lead, n: int, m: int, gen: torch.Generator, dtype=F64):
    """(graph, weight tensor for EdgeWeighted or None, formula adj, formula bias, extra leaves)."""
    if name == "complete":
        return None, None, None, None, []
    if name == "bool_mask":
        mask = torch.rand(*lead, n, m, generator=gen) > 0.4
        mask[..., 0, :] = False  # a row without neighbours: y = 0, lse = -inf
        return G.Mask(mask), None, mask.to(F64), None, []
    if name == "float_mask":
        bias = torch.randn(1, n, m, generator=gen, dtype=F64)
        bias[torch.rand(1, n, m, generator=gen) < 0.3] = -math.inf
        bias[..., 1, :] = -math.inf  # an empty row
        lib = _leaf(bias, dtype)
        ref = lib if dtype == F64 else _leaf(bias)
        return G.Mask(lib), None, None, ref, [(lib, ref)]
    if name == "exclude_self":
        return G.ExcludeSelf(), None, 1.0 - torch.eye(n, m, dtype=F64), None, []
    if name == "weighted":  # dense edge weights: the count becomes the weighted count
        w = torch.rand(*lead, n, m, generator=gen, dtype=F64) * 2
        w[torch.rand(*lead, n, m, generator=gen) < 0.2] = 0.0
        lib = _leaf(w, dtype)
        ref = lib if dtype == F64 else _leaf(w)
        return None, lib, ref, None, [(lib, ref)]
    raise AssertionError(name)


def _masked(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf rows read as 0, so a loss on it has finite gradients."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def _close(actual, expected, what, rtol, atol):
    actual, expected = actual.detach().to(F64), expected.detach().to(F64)
    fin = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), fin), f"{what}: -inf rows differ"
    assert torch.equal(actual[~fin], expected[~fin]), f"{what}: non-finite entries differ"
    scale = max(1.0, float(expected[fin].abs().max())) if fin.any() else 1.0
    torch.testing.assert_close(actual[fin], expected[fin], rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def _check(kind: str, graph_name: str, dtype=F64, backends=None, seed: int = 0, lead=(2,), n=5, m=7, d=3,
           e=2) -> None:
    """aggregate(return_lse=True) == the formulas on ``backends`` (default: the exact ones): y, lse, grads."""
    gen = _gen(seed)
    q64 = torch.randn(*lead, n, d, generator=gen, dtype=F64)
    k64 = torch.randn(*lead, m, d, generator=gen, dtype=F64)
    v64 = torch.randn(*lead, m, e, generator=gen, dtype=F64)
    aff, fkind, params, ptensors = _affinity(kind, d, gen, dtype)
    graph, weight, adj, bias, extra = _graph(graph_name, lead, n, m, gen, dtype)
    if weight is not None:
        aff = A.EdgeWeighted(aff, weight)
    q, k, v = _leaf(q64, dtype), _leaf(k64, dtype), _leaf(v64, dtype)
    refs = [q, k, v] if dtype == F64 else [_leaf(q64), _leaf(k64), _leaf(v64)]
    y_ref = aggregate_formula(fkind, *refs, params, adj, bias)
    l_ref = log_normaliser(fkind, refs[0], refs[1], params, adj, bias)
    libs = [q, k, v] + [t for t, _ in ptensors + extra]
    twins = refs + [t for _, t in ptensors + extra]
    dy = torch.randn(y_ref.shape, generator=gen, dtype=F64)
    dl = torch.randn(l_ref.shape, generator=gen, dtype=F64)
    loss_ref = (y_ref * dy).sum() + (_masked(l_ref) * dl).sum()
    g_ref = torch.autograd.grad(loss_ref, twins, allow_unused=True)
    rtol, atol = TOLERANCES[F64] if dtype == F64 else (1e-5, 1e-5)
    n_, m_ = q.shape[-2], k.shape[-2]
    low_aff, low_graph = nlgraph.core.lower_edge_weights(aff, graph, n_, m_)
    names = backends or nlgraph.dispatch.exact_backends(q, k, v, low_aff, low_graph, return_lse=True)
    assert names, f"no backend for {kind} {graph_name}"
    for b in names:
        what = f"{b}, {kind}, {graph_name}, {dtype}"
        y, lse = nlgraph.aggregate(q, k, v, aff, graph, backend=b, return_lse=True)
        assert lse.shape == l_ref.shape, what
        assert lse.dtype == (torch.float32 if dtype != F64 else F64), what
        _close(y, y_ref, f"y, {what}", rtol, atol)
        _close(lse, l_ref, f"lse, {what}", rtol, atol)
        loss = (y.to(F64) * dy).sum() + (_masked(lse).to(F64) * dl).sum()
        grads = torch.autograd.grad(loss, libs, allow_unused=True)
        for i, (g, gr) in enumerate(zip(grads, g_ref, strict=True)):
            g = torch.zeros_like(libs[i]) if g is None else g
            gr = torch.zeros_like(twins[i]) if gr is None else gr
            if graph_name == "weighted" and i == len(libs) - 1:
                gr = torch.where(weight.detach() == 0, torch.zeros_like(gr), gr)  # removed edges: no gradient
            assert torch.isfinite(g).all(), f"non-finite gradient {i}, {what}"
            _close(g, gr, f"gradient of input {i}, {what}", rtol, atol)


# ---------------------------------------------------------------------------------------------
# lse on every backend
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("graph_name", GRAPHS)
@pytest.mark.parametrize("kind", KINDS)
def test_lse_matches_the_formula_on_every_backend(kind, graph_name):
    """float64, every exact backend that can run the case (reference, chunked, algebra, pyg)."""
    _check(kind, graph_name, m=5 if graph_name == "exclude_self" else 7)


@pytest.mark.parametrize("kind", ["dot", "concat", "softmax_default", "gaussian_unnorm"])
def test_lse_on_the_complete_graph_without_batch_dims(kind):
    """Unbatched, so pyg (one edge list) and algebra (closed forms) take part too."""
    _check(kind, "complete", lead=(), n=4, m=6)
    _check(kind, "exclude_self", lead=(), n=5, m=5)


@pytest.mark.parametrize("graph_name", ["complete", "bool_mask", "float_mask"])
@pytest.mark.parametrize("kind", ["softmax_default", "gaussian_unnorm"])
def test_lse_float32_incl_triton(kind, graph_name):
    """float32: triton (interpreted on the CPU, tiny), chunked and reference against the float64 formula."""
    gen = _gen(5)
    q = torch.randn(2, 5, 4, generator=gen)
    names = nlgraph.dispatch.exact_backends(q, q, q, A.Softmax(), None, return_lse=True)
    _check(kind, graph_name, dtype=torch.float32, backends=[b for b in names if b in ("triton", "chunked",
                                                                                      "reference")],
           d=4, m=9)


def test_lse_normalised_gaussian_on_triton_adds_the_dropped_row_term():
    """The normalised Gaussian's scores omit -|q'|^2/2 (softmax cancels it); lse must add it back."""
    gen = _gen(6)
    q, k, v = torch.randn(1, 6, 2, generator=gen), torch.randn(1, 8, 2, generator=gen), torch.randn(1, 8, 3,
                                                                                                    generator=gen)
    aff = A.Gaussian(1.5)
    want = log_normaliser("gaussian", q.double(), k.double(), {"bandwidth": 1.5})
    for b in [b for b in nlgraph.compatible_backends(q, k, v, aff, None, return_lse=True)
              if b in ("triton", "chunked", "reference")]:
        _, lse = nlgraph.aggregate(q, k, v, aff, backend=b, return_lse=True)
        _close(lse, want, f"lse, {b}", 1e-5, 1e-5)


def test_permutohedral_lse_is_the_log_of_its_approximate_normaliser():
    """lse = log of the lattice's filter of ones (its C), which the C = 1 filter of ones gives directly."""
    gen = _gen(7)
    f = torch.rand(1, 300, 2, generator=gen) * 4
    v = torch.randn(1, 300, 3, generator=gen)
    aff = A.Gaussian(1.0)
    y, lse = nlgraph.aggregate(f, f, v, aff, backend="permutohedral", return_lse=True)
    ones = nlgraph.aggregate(f, f, torch.ones(1, 300, 1), A.Gaussian(1.0, normalize=False),
                             backend="permutohedral")
    # the same lattice filters the same ones: equal up to the float32 rounding of one filter pass
    torch.testing.assert_close(lse, ones[..., 0].log(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, nlgraph.aggregate(f, f, v, aff, backend="permutohedral"), rtol=0, atol=0)
    _, lse0 = nlgraph.aggregate(f, f, v, A.Gaussian(1.0, normalize=False), backend="permutohedral",
                                return_lse=True)
    assert torch.equal(lse0, torch.zeros(1, 300))


@pytest.mark.parametrize("norm", ["sum", "count", "none"])
def test_chunked_gradcheck_with_lse(norm):
    """float64 gradcheck of the chunked Function with its stat output used (ragged 2 x 3 tiles)."""
    gen = _gen(8)
    n, m, d = 5, 7, 3
    q = _leaf(torch.randn(2, n, d, generator=gen, dtype=F64))
    k = _leaf(torch.randn(2, m, d, generator=gen, dtype=F64))
    v = _leaf(torch.randn(2, m, 2, generator=gen, dtype=F64))
    bias = torch.randn(2, n, m, generator=gen, dtype=F64)
    bias[..., 0, :3] = -math.inf
    bias = _leaf(bias)
    aff = {"sum": A.Softmax(), "count": A.DotProduct(), "none": A.Gaussian(1.3, normalize=False)}[norm]

    def fn(q_, k_, v_, b_):
        y, lse = nlgraph.aggregate(q_, k_, v_, aff, G.Mask(b_), backend="chunked",
                                   options={"block_n": 2, "block_m": 3}, return_lse=True)
        return y, _masked(lse)

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))
    if norm != "none":  # the lse output alone: its gradient is what the backward's shifted D_i carries
        assert torch.autograd.gradcheck(lambda *a: fn(*a)[1], (q, k, v, bias))


def test_lse_of_empty_and_featureless_cases():
    """M = 0: -inf; N = 0 or an empty batch: empty; e = 0 with keys: the real lse (and its gradient)."""
    gen = _gen(9)
    q = _leaf(torch.randn(2, 4, 3, generator=gen, dtype=F64))
    k = _leaf(torch.randn(2, 6, 3, generator=gen, dtype=F64))
    for aff in (A.Softmax(), A.DotProduct(), A.Gaussian(1.0, normalize=False)):
        y, lse = nlgraph.aggregate(q, k[:, :0], k.new_zeros(2, 0, 5), aff, return_lse=True)
        assert y.shape == (2, 4, 5) and lse.shape == (2, 4) and torch.isneginf(lse).all()
        (lse.sum() + y.sum()).backward()  # connected (zero gradients), as y alone is
        y, lse = nlgraph.aggregate(q[:, :0], k, k, aff, return_lse=True)
        assert y.shape == (2, 0, 3) and lse.shape == (2, 0)
        y, lse = nlgraph.aggregate(q[:0], k[:0], k[:0], aff, return_lse=True)
        assert y.shape == (0, 4, 3) and lse.shape == (0, 4)
    v0 = k.new_zeros(2, 6, 0)
    for kind, aff in (("softmax", A.Softmax()), ("dot", A.DotProduct())):
        y, lse = nlgraph.aggregate(q, k, v0, aff, return_lse=True)
        want = log_normaliser(kind, q, k, {})
        assert y.shape == (2, 4, 0)
        _close(lse, want, f"lse with e = 0, {kind}", *TOLERANCES[F64])
        if kind == "softmax":
            g, = torch.autograd.grad(lse.sum(), q)
            g_ref, = torch.autograd.grad(want.sum(), q)
            _close(g, g_ref, "d lse / d q with e = 0", *TOLERANCES[F64])
    y, lse = nlgraph.aggregate(q[..., :0], k[..., :0], k, return_lse=True)  # d = 0: every logit is 0
    _close(lse, torch.full((2, 4), math.log(6), dtype=F64), "lse with d = 0", *TOLERANCES[F64])


def test_lse_with_dropout_is_the_undropped_normaliser():
    gen = _gen(10)
    q, k, v = (torch.randn(1, 5, 3, generator=gen, dtype=F64) for _ in range(3))
    _, lse = nlgraph.aggregate(q, k, v, dropout_p=0.5, return_lse=True, backend="chunked")
    _close(lse, log_normaliser("softmax", q, k, {}), "lse under dropout", *TOLERANCES[F64])


def test_return_lse_validation_and_capability():
    q = torch.randn(4, 3)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        nlgraph.aggregate(q, q, q, return_lse=1)
    with pytest.raises(TypeError, match="does not take option"):
        nlgraph.aggregate(q, q, q, backend="chunked", options={"return_lse": True})
    assert isinstance(nlgraph.aggregate(q, q, q, return_lse=False), torch.Tensor)
    # a backend without the capability is skipped by automatic dispatch and refused when forced
    fake = types.ModuleType("nolse")
    fake.can_run = lambda *a, **k: (True, "")
    fake.run = lambda q_, k_, v_, a_, g_: q_ * 0
    dispatch._REGISTRY["nolse"] = "nolse"
    dispatch._MODULES["nolse"] = fake
    order = dict(dispatch._REGISTRY)
    dispatch._REGISTRY.clear()
    dispatch._REGISTRY.update({"nolse": "nolse", **{k: v for k, v in order.items() if k != "nolse"}})
    try:
        assert dispatch.select_backend(q, q, q, A.Softmax(), None)[0] == "nolse"
        assert dispatch.select_backend(q, q, q, A.Softmax(), None, return_lse=True)[0] != "nolse"
        assert "nolse" not in nlgraph.compatible_backends(q, q, q, A.Softmax(), None, return_lse=True)
        with pytest.raises(nlgraph.BackendError, match="log-normaliser"):
            nlgraph.aggregate(q, q, q, backend="nolse", return_lse=True)
    finally:
        del dispatch._REGISTRY["nolse"], dispatch._MODULES["nolse"]
    assert list(dispatch._REGISTRY) == [k for k in order if k != "nolse"]


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------

def _splits(m: int, parts: int, gen: torch.Generator, allow_empty: bool) -> list[torch.Tensor]:
    """A random partition of range(m) into ``parts`` disjoint index sets (some empty if allowed)."""
    perm = torch.randperm(m, generator=gen)
    if allow_empty:
        cuts = torch.randint(0, m + 1, (parts - 1,), generator=gen).sort().values.tolist()
    else:
        cuts = (torch.randperm(m - 1, generator=gen)[:parts - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, m]
    return [perm[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


MERGE_KINDS = ["softmax", "gaussian", "gaussian_unnorm", "dot", "concat", "weighted_dot", "weighted_softmax"]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", MERGE_KINDS)
def test_merge_of_random_key_splits_equals_the_whole(kind, masked, seed):
    """2-5 random disjoint key sets (empty ones for odd seeds), merged == one call over all keys (reference
    backend; the parts on the automatic one): y, lse and every gradient."""
    gen = _gen(100 + seed)
    n, m, d, e = 5, 9, 3, 2
    q = _leaf(torch.randn(2, n, d, generator=gen, dtype=F64))
    k = _leaf(torch.randn(2, m, d, generator=gen, dtype=F64))
    v = _leaf(torch.randn(2, m, e, generator=gen, dtype=F64))
    base = kind.removeprefix("weighted_")
    aff, _, _, ptensors = _affinity(base, d, gen)
    ptensors = [t for t, _ in ptensors]
    weight = None
    if kind.startswith("weighted"):
        weight = _leaf(torch.rand(2, n, m, generator=gen, dtype=F64) * 2)
    mask = None
    if masked:
        mask = torch.rand(2, n, m, generator=gen) > 0.5
        mask[:, 0] = False  # a row without neighbours anywhere: zeros and -inf after the merge
    leaves = [q, k, v] + ptensors + ([weight] if weight is not None else [])

    def run(idx):
        a = aff if weight is None else A.EdgeWeighted(aff, weight[..., idx])
        g = None if mask is None else G.Mask(mask[..., idx])
        return nlgraph.aggregate(q, k[:, idx], v[:, idx], a, g, return_lse=True, backend="reference"
                                 if idx.numel() == m else "auto")

    y, lse = run(torch.arange(m))
    parts = [run(idx) for idx in _splits(m, 2 + seed % 4, gen, allow_empty=seed % 2 == 1)]
    ym, lm = nlgraph.merge(parts, aff)
    rtol, atol = TOLERANCES[F64]
    what = f"{kind}, masked={masked}, seed={seed}"
    _close(ym, y, f"merged y, {what}", rtol, atol)
    _close(lm, lse, f"merged lse, {what}", rtol, atol)
    dy = torch.randn(y.shape, generator=gen, dtype=F64)
    dl = torch.randn(lse.shape, generator=gen, dtype=F64)
    g_whole = torch.autograd.grad((y * dy).sum() + (_masked(lse) * dl).sum(), leaves, allow_unused=True)
    g_merged = torch.autograd.grad((ym * dy).sum() + (_masked(lm) * dl).sum(), leaves, allow_unused=True)
    for i, (a, b) in enumerate(zip(g_merged, g_whole, strict=True)):
        a = torch.zeros_like(leaves[i]) if a is None else a
        b = torch.zeros_like(leaves[i]) if b is None else b
        assert torch.isfinite(a).all(), f"non-finite gradient {i}, {what}"
        _close(a, b, f"gradient of input {i}, {what}", rtol, atol)


def test_merge_of_all_empty_parts():
    """Every part without neighbours: y = 0, lse = -inf, finite (zero) gradients."""
    y1 = torch.zeros(3, 4, 2, dtype=F64, requires_grad=True)
    l1 = torch.full((3, 4), -math.inf, dtype=F64, requires_grad=True)
    y2 = torch.randn(3, 4, 2, dtype=F64, requires_grad=True)
    l2 = torch.full((3, 4), -math.inf, dtype=F64)
    l2[0, 0] = 0.5
    l2.requires_grad_(True)
    for aff in (A.Softmax(), A.DotProduct()):
        y, lse = nlgraph.merge([(y1, l1), (y1, l1)], aff)
        assert torch.equal(y, torch.zeros_like(y)) and torch.isneginf(lse).all()
        grads = torch.autograd.grad(y.sum() + _masked(lse).sum(), [y1, l1])
        assert all(torch.isfinite(g).all() for g in grads)
        y, lse = nlgraph.merge([(y1, l1), (y2, l2)], aff)  # one row has a part: that part alone
        assert lse[0, 0] == 0.5 and torch.equal(y[0, 0], y2[0, 0]) and torch.isneginf(lse.flatten()[1:]).all()
        assert torch.equal(y.flatten(0, 1)[1:], torch.zeros(11, 2, dtype=F64))
    y, lse = nlgraph.merge([(y1, l1), (y2, l2)], A.Gaussian(1.0, normalize=False))  # C = 1: the sum
    assert torch.equal(y, y1 + y2) and lse[0, 0] == 0 and torch.isneginf(lse.flatten()[1:]).all()


def test_merge_keeps_low_precision_parts_and_single_part():
    gen = _gen(11)
    q, k, v = torch.randn(1, 4, 3, generator=gen), torch.randn(1, 8, 3, generator=gen), torch.randn(1, 8, 2,
                                                                                                    generator=gen)
    parts = [nlgraph.aggregate(q.half(), k[:, s].half(), v[:, s].half(), return_lse=True)
             for s in (slice(0, 5), slice(5, 8))]
    y, lse = nlgraph.merge(parts)
    assert y.dtype == torch.float16 and lse.dtype == torch.float32
    y_ref, l_ref = nlgraph.aggregate(q.double(), k.double(), v.double(), return_lse=True)
    # fp16 inputs and fp16 part outputs: each rounds by 2^-11 relative; a convex combination of them too
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=4e-3)
    torch.testing.assert_close(lse.double(), l_ref, rtol=0, atol=4e-3)
    one = nlgraph.aggregate(q, k, v, return_lse=True)
    y1, l1 = nlgraph.merge([one])
    assert torch.equal(y1, one[0]) and torch.equal(l1, one[1])


def test_merge_errors():
    y, lse = torch.zeros(2, 3, 4), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="at least one"):
        nlgraph.merge([])
    with pytest.raises(TypeError, match="list of"):
        nlgraph.merge(y)
    with pytest.raises(TypeError, match=r"parts\[1\] must be a \(y, lse\) pair"):
        nlgraph.merge([(y, lse), y])
    with pytest.raises(ValueError, match=r"parts\[0\] must be y of shape"):
        nlgraph.merge([(y, torch.zeros(2, 4))])
    with pytest.raises(ValueError, match="same shape"):
        nlgraph.merge([(y, lse), (torch.zeros(2, 3, 5), lse)])
    with pytest.raises(TypeError, match="share a dtype"):
        nlgraph.merge([(y, lse), (y.double(), lse)])
    with pytest.raises(TypeError, match="floating-point"):
        nlgraph.merge([(y, lse.long())])
    with pytest.raises(TypeError, match="Affinity"):
        nlgraph.merge([(y, lse)], "softmax")

    class Odd(A.Affinity):
        norm = "max"

    with pytest.raises(ValueError, match="no merge rule|has rules"):
        nlgraph.merge([(y, lse)], Odd())


def test_criss_cross_is_the_merge_of_its_row_and_column():
    """CCNet's criss-cross graph = the row (self included) and the column without self: disjoint key
    sets, so merging the two masked calls gives the one CrissCross call exactly, forward and gradients."""
    gen = _gen(12)
    h, w = 3, 4
    x = _leaf(torch.randn(2, h * w, 3, generator=gen, dtype=F64))
    v = _leaf(torch.randn(2, h * w, 2, generator=gen, dtype=F64))
    idx = torch.arange(h * w)
    row = (idx[:, None] // w) == (idx[None, :] // w)
    col = ((idx[:, None] % w) == (idx[None, :] % w)) & ~torch.eye(h * w, dtype=torch.bool)
    aff = A.Softmax(scale=1.0)
    parts = [nlgraph.aggregate(x, x, v, aff, G.Mask(mk), return_lse=True) for mk in (row, col)]
    y, lse = nlgraph.merge(parts, aff)
    y_ref, l_ref = nlgraph.aggregate(x, x, v, aff, G.CrissCross((h, w)), return_lse=True)
    rtol, atol = TOLERANCES[F64]
    _close(y, y_ref, "criss-cross y", rtol, atol)
    _close(lse, l_ref, "criss-cross lse", rtol, atol)
    g = torch.autograd.grad(y.square().sum() + lse.sum(), [x, v])
    g_ref = torch.autograd.grad(y_ref.square().sum() + l_ref.sum(), [x, v])
    for a, b in zip(g, g_ref, strict=True):
        _close(a, b, "criss-cross gradients", rtol, atol)


@pytest.mark.parametrize("kind", ["softmax_default", "gaussian"])
def test_lse_half_precision_is_float32(kind):
    """fp16/bf16 inputs: lse comes back in float32 (the accumulation dtype), == the formula on the rounded
    inputs. Bound: the lowering rounds q' (q * scale, or (q - centre) / b) and the Gaussian's dropped row
    term to the input dtype, a relative error of u_h (2^-11 fp16, 2^-8 bf16) per factor, so a logit
    |s| <= S moves by <= 3 u_h S and lse (a convex combination of the logits' errors) by as much."""
    gen = _gen(13)
    q, k, v = (torch.randn(1, 6, 4, generator=gen) for _ in range(3))
    aff = A.Softmax() if kind == "softmax_default" else A.Gaussian(2.0)
    params = {} if kind == "softmax_default" else {"bandwidth": 2.0}
    fkind = "softmax" if kind == "softmax_default" else "gaussian"
    for dtype, u in ((torch.float16, 2.0 ** -11), (torch.bfloat16, 2.0 ** -8)):
        qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
        q64, k64 = qh.double(), kh.double()
        want = log_normaliser(fkind, q64, k64, params)
        big = float(log_affinity(fkind, q64, k64, params).abs().max())
        if kind == "gaussian":  # the row term -|q'|^2/2 the lowering drops and lse adds back
            big += float((((q64 - k64.mean(-2, keepdim=True)) / 2.0) ** 2).sum(-1).max()) / 2
        names = [b for b in nlgraph.compatible_backends(qh, kh, vh, aff, None, return_lse=True)
                 if b in ("triton", "chunked", "reference")]
        assert "chunked" in names
        for b in names:
            _, lse = nlgraph.aggregate(qh, kh, vh, aff, backend=b, return_lse=True)
            assert lse.dtype == torch.float32, b
            torch.testing.assert_close(lse.double(), want, rtol=0, atol=3 * u * big + 1e-5,
                                       msg=lambda m: f"{b} {dtype}: {m}")  # noqa: B023
