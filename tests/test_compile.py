"""PyTorch workflows keep working: torch.compile(fullgraph=True), torch.export and torch.func.

Eager validation is thorough; under torch.compile / torch.export the data-dependent checks (the NaN
scan, range checks, empty-tile skipping) step aside, so the modules trace into one graph
(``fullgraph=True`` refuses any graph break) and export. Results are compared with eager mode.

Tolerances: the compiled graph may reorder and fuse float64 sums. Every quantity here is a sum of
at most K <= 256 products of O(1) factors (projections of width <= 16, softmax weights <= 1,
values O(1)) nested at most four deep, so a reordering moves it by at most ~4 K u S with
u = 2^-53 and S the magnitude of the sums (<= ~10 here): below 1e-11 absolute. Shapes are small
to keep CPU compilation (inductor, C++ through gcc) fast.
"""

from __future__ import annotations

import pytest
import torch

import nlgraph
from attention import MultiheadAttention
from nlgraph import NonLocal2d
from nlgraph import affinity as A
from nlgraph import graph as G

ATOL, RTOL = 1e-11, 1e-11


def _nonlocal(mode: str) -> NonLocal2d:
    torch.manual_seed(0)
    block = NonLocal2d(8, inter_channels=4, mode=mode).double().eval()
    with torch.no_grad():  # a trained-looking block: W and BN non-zero, so y matters
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block


def _mha() -> MultiheadAttention:
    torch.manual_seed(1)
    return MultiheadAttention(16, 4, batch_first=True).double().eval()


def _mha_inputs():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 16, generator=gen, dtype=torch.float64)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, -2:] = True
    return x, pad


def _grads(out, params):
    return torch.autograd.grad(out.square().sum(), params)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian", "dot_product", "concatenation"])
def test_nonlocal2d_compiles_fullgraph(mode):
    """One graph, forward and backward (AOTAutograd traces both): chunked backend for the softmax
    modes, algebra for the others. Inductor's code generation is checked separately (slower)."""
    block = _nonlocal(mode)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3),
                    requires_grad=True)
    params = [x] + list(block.parameters())
    y_eager = block(x)
    g_eager = _grads(y_eager, params)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, y_eager, atol=ATOL, rtol=RTOL)
    names = ["x"] + [n for n, _ in block.named_parameters()]
    for name, g, ge in zip(names, _grads(y, params), g_eager, strict=True):
        torch.testing.assert_close(g, ge, atol=ATOL, rtol=RTOL, msg=lambda m: f"d/d{name}: {m}")


def test_multihead_attention_compiles_fullgraph():
    """batch_first=True explicitly; a key-padding mask (a masked graph on the chunked backend)."""
    mha = _mha()
    x, pad = _mha_inputs()
    x.requires_grad_(True)
    params = [x] + list(mha.parameters())
    y_eager = mha(x, x, x, key_padding_mask=pad)[0]
    g_eager = _grads(y_eager, params)
    compiled = torch.compile(mha, fullgraph=True, backend="aot_eager")
    y = compiled(x, x, x, key_padding_mask=pad)[0]
    torch.testing.assert_close(y, y_eager, atol=ATOL, rtol=RTOL)
    for g, ge in zip(_grads(y, params), g_eager, strict=True):
        torch.testing.assert_close(g, ge, atol=ATOL, rtol=RTOL)


def test_inductor_compiles_both_modules():
    """The default backend (inductor: generated C++ on CPU) runs the same graphs (inference)."""
    block = _nonlocal("embedded_gaussian")
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    mha = _mha()
    q, pad = _mha_inputs()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(block, fullgraph=True)(x), block(x), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(torch.compile(mha, fullgraph=True)(q, q, q, key_padding_mask=pad)[0],
                                   mha(q, q, q, key_padding_mask=pad)[0], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("strict", [False, True])
def test_modules_export(strict):
    block = _nonlocal("embedded_gaussian")
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ep = torch.export.export(block, (x,), strict=strict)
    torch.testing.assert_close(ep.module()(x), block(x), atol=ATOL, rtol=RTOL)

    mha = _mha()
    q, pad = _mha_inputs()
    ep = torch.export.export(mha, (q, q, q), {"key_padding_mask": pad}, strict=strict)
    torch.testing.assert_close(ep.module()(q, q, q, key_padding_mask=pad)[0],
                               mha(q, q, q, key_padding_mask=pad)[0], atol=ATOL, rtol=RTOL)


def test_compiled_code_skips_only_the_checks():
    """Eager mode still rejects NaN; the compiled function computes the same op without the scan."""
    q = torch.randn(5, 3, dtype=torch.float64)
    bad = q.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        nlgraph.aggregate(bad, q, q)
    fn = torch.compile(lambda a, b, c: nlgraph.aggregate(a, b, c, A.Gaussian(1.5), G.ExcludeSelf()),
                       fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(q, q, q), nlgraph.aggregate(q, q, q, A.Gaussian(1.5), G.ExcludeSelf()),
                               atol=ATOL, rtol=RTOL)


def test_optional_probe_is_traceable():
    """The optional-import probe runs inside a compiled graph (importlib itself is untraceable)."""
    from nlgraph._optional import optional

    fn = torch.compile(lambda x: x + (1.0 if optional("nlgraph_no_such_module") is None else 0.0),
                       fullgraph=True, backend="eager")
    assert fn(torch.zeros(1)).item() == 1.0


# ---------------------------------------------------------------------------------------------
# return_lse and merge trace too: compile(fullgraph), export, torch.func (vmap, jacrev)
# ---------------------------------------------------------------------------------------------

def _lse_inputs():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 6, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 6, 6, generator=gen) > 0.4
    mask[:, 0] = False  # a row without neighbours: lse = -inf
    return q, k, v, mask


def _finite(lse):
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


LSE_AFFINITIES = {"softmax": A.Softmax(), "dot": A.DotProduct(),
                  "gaussian_c1": A.Gaussian(1.2, normalize=False)}


@pytest.mark.parametrize("name", list(LSE_AFFINITIES))
def test_return_lse_and_merge_compile_fullgraph(name):
    """aggregate(return_lse=True) and a merge of two key halves in one graph (chunked), forward, backward."""
    aff = LSE_AFFINITIES[name]
    q, k, v, mask = _lse_inputs()

    def fn(q_, k_, v_):
        y, lse = nlgraph.aggregate(q_, k_, v_, aff, G.Mask(mask), return_lse=True)
        parts = [nlgraph.aggregate(q_, k_[:, s], v_[:, s], aff, G.Mask(mask[..., s]), return_lse=True)
                 for s in (slice(0, 2), slice(2, 6))]
        ym, lm = nlgraph.merge(parts, aff)
        return y, lse, ym, lm

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    eager = fn(*leaves)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(eager[2], eager[0], atol=ATOL, rtol=RTOL)  # merged halves == the whole
    loss = lambda out: out[0].square().sum() + _finite(out[1]).sum() + out[2].sum() + _finite(out[3]).sum()  # noqa
    for g, ge in zip(torch.autograd.grad(loss(compiled), leaves), torch.autograd.grad(loss(eager), leaves),
                     strict=True):
        torch.testing.assert_close(g, ge, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("strict", [False, True])
def test_return_lse_exports(strict):
    q, k, v, mask = _lse_inputs()

    class Attend(torch.nn.Module):
        def forward(self, q_, k_, v_):
            return nlgraph.aggregate(q_, k_, v_, graph=G.Mask(mask), return_lse=True)

    ep = torch.export.export(Attend(), (q, k, v), strict=strict)
    for a, b in zip(ep.module()(q, k, v), Attend()(q, k, v), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", list(LSE_AFFINITIES))
def test_return_lse_under_torch_func(name):
    """jacrev of lse (the chunked Function's stat output) and vmap over queries == the reference backend."""
    aff = LSE_AFFINITIES[name]
    q, k, v, mask = _lse_inputs()
    weight = torch.rand(6, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def lse_of(backend):
        def lse(q_, k_, w_):
            return _finite(nlgraph.aggregate(q_, k_, v[0], A.EdgeWeighted(aff, w_), G.Mask(mask[0]),
                                             backend=backend, return_lse=True)[1])
        return lse

    for argnum in (0, 1, 2):  # the count's gradient reaches the edge weights through C_i = sum_j w_ij
        jac = torch.func.jacrev(lse_of("chunked"), argnums=argnum)(q[0], k[0], weight)
        want = torch.func.jacrev(lse_of("reference"), argnums=argnum)(q[0], k[0], weight)
        torch.testing.assert_close(jac, want, atol=ATOL, rtol=RTOL, msg=f"jacrev of lse, argnum {argnum}")
    batched = torch.func.vmap(lse_of("chunked"), in_dims=(0, None, None))(q, k[0], weight)
    torch.testing.assert_close(batched, lse_of("reference")(q, k[0], weight), atol=ATOL, rtol=RTOL)


def test_untransformed_is_false_under_every_transform_and_compile():
    """``_values.untransformed`` (what the in-place / numba / host-reading paths ask): True in eager code,
    False under vmap, grad, jvp and while torch.compile traces."""
    from nlgraph._values import untransformed

    seen: list[bool] = []

    def probe(x):
        seen.append(untransformed())
        return x.sin().sum()

    x = torch.randn(3)
    probe(x)
    torch.func.vmap(probe)(x[:, None])
    torch.func.grad(probe)(x)
    torch.func.jvp(probe, (x,), (torch.ones(3),))
    assert seen == [True, False, False, False]
    compiled = torch.compile(lambda t: t + 1 if untransformed() else t - 1, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), x - 1)
    assert untransformed()
