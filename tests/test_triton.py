"""The triton backend == the reference backend, forward and gradients.

On a machine with a CUDA GPU the kernel runs on the GPU; otherwise Triton's interpreter runs it
on the CPU (TRITON_INTERPRET=1, set by tests/conftest.py before triton is imported), so shapes stay
small. fp32 is compared with the float32 reference backend within a bound from the arithmetic
(:func:`_fp32_tol`); fp16/bf16 against the float64 result within twice the error that plain
PyTorch makes in the same precision (plus the output's rounding).
"""

from __future__ import annotations

import math

import pytest
import torch

import nlgraph
from nlgraph import affinity as A
from nlgraph import graph as G

pytest.importorskip("triton", reason="triton (the nlgraph[triton] extra) not installed")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
U32 = 2.0 ** -24  # float32 unit roundoff


def _fp32_tol(q, k, aff, ref, bias=None):
    """rtol / atol for a float32 kernel vs the float32 reference backend, from the arithmetic.

    Both sides compute each logit (scale q.k, or -|q' - k'|^2 / 2 as (|q'|^2 + |k'|^2) / 2 - q'.k' with
    q' = q / b, plus a float mask) in float32 from terms adding up to S in magnitude (here in float64,
    from the definitions): the roundings of its <= 3 terms and of their partial sums (~log2 d levels in
    tiled dot products) err by ~(log2 d + 3) u S, a relative error of the logit's weight. Outputs and
    gradients are sums over up to n = max(N, M) weights times values (another ~log2 n levels of
    rounding), so they err by those relative errors times their sums' magnitude (~max |ref|). Two
    sides: rtol = 2 (log2 d + log2 n + 3) u (1 + S), atol = rtol max |ref|.
    """
    qa, ka = q.detach().double().abs().cpu(), k.detach().double().abs().cpu()
    d, n = qa.shape[-1], max(qa.shape[-2], ka.shape[-2])
    if isinstance(aff, A.Softmax):
        s = (1 / d ** 0.5 if aff.scale is None else abs(float(aff.scale))) * qa @ ka.transpose(-1, -2)
    else:
        b2 = float(aff.bandwidth) ** 2
        s = ((qa * qa).sum(-1)[..., :, None] + (ka * ka).sum(-1)[..., None, :]) / (2 * b2) + aff.offset
        s = s + qa @ ka.transpose(-1, -2) / b2
    if bias is not None:
        s = s + bias.detach().double().abs().cpu()
    rtol = 2 * (math.log2(d) + math.log2(n) + 3) * U32 * (1 + float(s.max()))
    return dict(rtol=rtol, atol=rtol * float(ref.detach().abs().max()))


def _inputs(n, m, d, e, dtype, seed=0, scale=1.0, self_graph=False):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=gen, dtype=torch.float64) * scale)  # noqa: E731
    q = mk(2, n, d)
    k = q.clone() + 0.1 * mk(2, n, d) if self_graph else mk(2, m, d)
    v = torch.randn(2, k.shape[1], e, generator=gen, dtype=torch.float64)
    return [t.to(DEVICE, dtype).requires_grad_(True) for t in (q, k, v)]


AFFINITIES = {
    "softmax": lambda d: A.Softmax(),
    "gaussian": lambda d: A.Gaussian(2.0),
    "gaussian_c1": lambda d: A.Gaussian(float(d) ** 0.5, normalize=False),
    "gaussian_offset": lambda d: A.Gaussian(3.0, offset=0.5),
}


@pytest.mark.parametrize("aff_name", list(AFFINITIES))
@pytest.mark.parametrize("shape", [(37, 29, 16, 8), (20, 33, 64, 70), (9, 11, 257, 5), (5, 7, 1024, 3)])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_fp32_matches_reference(aff_name, shape, exclude_self):
    n, m, d, e = shape
    graph = G.ExcludeSelf() if exclude_self else None
    q, k, v = _inputs(n, n if exclude_self else m, d, e, torch.float32, self_graph=exclude_self,
                      scale=0.3 if aff_name == "gaussian_c1" else 1.0)
    aff = AFFINITIES[aff_name](d)
    y = nlgraph.aggregate(q, k, v, aff, graph, backend="triton", options={"block_n": 16, "block_m": 16})
    y_ref = nlgraph.aggregate(q, k, v, aff, graph, backend="reference")
    torch.testing.assert_close(y, y_ref, **_fp32_tol(q, k, aff, y_ref))
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), dy)
    grads_ref = torch.autograd.grad(y_ref, (q, k, v), dy)
    for name, g, gr in zip("qkv", grads, grads_ref, strict=True):
        torch.testing.assert_close(g, gr, **_fp32_tol(q, k, aff, gr), msg=lambda msg: f"d/d{name}: {msg}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("aff_name", ["softmax", "gaussian"])
def test_low_precision_within_twice_plain_torch(dtype, aff_name):
    from .formulas import aggregate_formula

    q, k, v = _inputs(40, 36, 64, 16, torch.float64)
    kind = "softmax" if aff_name == "softmax" else "gaussian"
    params = {} if kind == "softmax" else {"bandwidth": 2.0}
    exact = aggregate_formula(kind, q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), params)
    ql, kl, vl = (t.detach().to(dtype) for t in (q, k, v))
    plain = aggregate_formula(kind, ql.cpu(), kl.cpu(), vl.cpu(), params)
    err_plain = (plain.double() - exact).abs().max().item()
    y = nlgraph.aggregate(ql, kl, vl, AFFINITIES[aff_name](64), backend="triton")
    assert y.dtype == dtype
    err = (y.double().cpu() - exact).abs().max().item()
    assert err <= 2 * err_plain + 2 * torch.finfo(dtype).eps * exact.abs().max().item(), (err, err_plain)


def test_rows_without_neighbours_are_zero_with_finite_gradients():
    q, k, v = _inputs(1, 1, 16, 4, torch.float32)  # ExcludeSelf on one node: no edge at all
    y = nlgraph.aggregate(q, k, v, A.Softmax(), G.ExcludeSelf(), backend="triton")
    assert torch.equal(y, torch.zeros_like(y))
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(y.sum(), (q, k, v)))


def test_non_contiguous_inputs_work():
    q, k, v = _inputs(12, 10, 16, 6, torch.float32)
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    vt = v.detach()[..., ::1].transpose(0, 1).contiguous().transpose(0, 1)
    y = nlgraph.aggregate(qt, k.detach(), vt, backend="triton")
    y_ref = nlgraph.aggregate(q.detach(), k.detach(), v.detach(), backend="reference")
    torch.testing.assert_close(y, y_ref, **_fp32_tol(q, k, A.Softmax(), y_ref))


def test_capabilities_and_dispatch(monkeypatch):
    mod = nlgraph.dispatch.get_backend("triton")
    x = torch.randn(4, 8)
    ok, why = mod.can_run(x.double(), x.double(), x.double(), A.Softmax(), None)
    assert not ok and "float16, bfloat16 or float32" in why
    ok, why = mod.can_run(x, x, x, A.DotProduct(), None)
    assert not ok and "exp-kernel" in why
    ok, why = mod.can_run(x, x, x, A.Gaussian(1.0, cutoff=2.0), None)
    assert ok  # the cut-off runs in the kernel
    head = x[:, :4].contiguous()
    ok, why = mod.can_run(head, head.clone(), x, A.Softmax(), G.LocalWindow((4,), 1))
    assert ok  # local windows run in the kernel
    assert mod.can_run(head, head.clone(), x, A.Softmax(), G.CrissCross((2, 2)))[0]  # criss-cross too,
    assert not mod.prefer(head, head.clone(), x, A.Softmax(), G.CrissCross((2, 2)))  # but grid is preferred
    ok, why = mod.can_run(head, head.clone(), x, A.Softmax(), G.CrissCross((2, 2)) & G.LocalWindow((2, 2), 1))
    assert not ok and "one local window or criss-cross" in why
    if not CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
        ok, why = mod.can_run(x, x, x, A.Softmax(), None)
        assert not ok and "CUDA" in why
        assert nlgraph.select_backend(x, x, x, A.Softmax(), None)[0] == "sdpa"


@pytest.mark.parametrize("kind", ["bool2d", "bool_batch", "key_padding", "float", "float_and_self",
                                  "empty_rows"])
def test_masks_match_reference(kind):
    gen = torch.Generator().manual_seed(3)
    b, h, n, d, e = 2, 3, 21, 16, 6
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEVICE).requires_grad_(True)  # noqa: E731
    q, k, v = mk(b, h, n, d), mk(b, h, n, d), mk(b, h, n, e)
    bias = None
    if kind == "bool2d":
        graph = G.Mask(torch.rand(n, n, generator=gen).to(DEVICE) > 0.4)
    elif kind == "bool_batch":
        graph = G.Mask(torch.rand(b, 1, n, n, generator=gen).to(DEVICE) > 0.4)
    elif kind == "key_padding":
        pad = torch.ones(b, 1, 1, n, dtype=torch.bool)
        pad[0, ..., -5:] = False
        graph = G.Mask(pad.to(DEVICE))
    elif kind in ("float", "float_and_self"):
        bias = mk(1, h, n, n)
        graph = G.Mask(bias) if kind == "float" else G.Mask(bias) & G.ExcludeSelf()
    else:
        m = torch.rand(n, n, generator=gen) > 0.5
        m[4] = False  # a row with no neighbour
        graph = G.Mask(m.to(DEVICE)) & G.ExcludeSelf()
    y = nlgraph.aggregate(q, k, v, A.Softmax(), graph, backend="triton",
                          options={"block_n": 16, "block_m": 16})
    y_ref = nlgraph.aggregate(q, k, v, A.Softmax(), graph, backend="reference")
    torch.testing.assert_close(y, y_ref, **_fp32_tol(q, k, A.Softmax(), y_ref, bias))
    leaves = [q, k, v] + ([bias] if bias is not None else [])
    dy = torch.randn_like(y)
    for g, gr in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(y_ref, leaves, dy), strict=True):
        torch.testing.assert_close(g, gr, **_fp32_tol(q, k, A.Softmax(), gr, bias))


@pytest.mark.parametrize("shape,radius,order", [((6, 7), 1, False), ((5, 8), (2, 1), True),
                                                ((3, 4, 4), 1, False)])
@pytest.mark.parametrize("aff_name", ["softmax", "gaussian_offset"])
def test_local_window_in_kernel_matches_reference(shape, radius, order, aff_name):
    n = 1
    for s_ in shape:
        n *= s_
    graph = G.LocalWindow(shape, radius, order=G.blocked_order(shape, 2) if order else None)
    q, k, v = _inputs(n, n, 16, 5, torch.float32, seed=4)
    aff = AFFINITIES[aff_name](16)
    opts = {"block_n": 16, "block_m": 16}
    y = nlgraph.aggregate(q, k, v, aff, graph & G.ExcludeSelf() if order else graph, backend="triton",
                          options=opts)
    y_ref = nlgraph.aggregate(q, k, v, aff, graph & G.ExcludeSelf() if order else graph, backend="reference")
    torch.testing.assert_close(y, y_ref, **_fp32_tol(q, k, aff, y_ref))
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), dy)
    grads_ref = torch.autograd.grad(y_ref, (q, k, v), dy)
    for g, gr in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, gr, **_fp32_tol(q, k, aff, gr))


@pytest.mark.parametrize("shape,opts", [
    ((9,), dict(kernel_size=4, border="shift")),
    ((6, 7), dict(kernel_size=(3, 4), dilation=(2, 1), border="shift")),
    ((5, 8), dict(kernel_size=(2, 3), is_causal=(True, False), border="shift")),
    ((7, 6), dict(kernel_size=3, dilation=(1, 2))),
    ((3, 4, 6), dict(kernel_size=(2, 3, 3), dilation=(1, 1, 2), is_causal=(True, False, False),
                     border="shift")),
])
def test_window_options_in_kernel_match_reference(shape, opts):
    """Every LocalWindow option but the relative position bias runs in the kernel's window test
    (LocalWindow._axis_edge's predicate from the coordinates; tiles the plan rules out skipped)."""
    n = math.prod(shape)
    graph = G.LocalWindow(shape, **opts)
    q, k, v = _inputs(n, n, 16, 5, torch.float32, seed=5)
    blocks = {"block_n": 16, "block_m": 16}
    y = nlgraph.aggregate(q, k, v, A.Softmax(), graph, backend="triton", options=blocks)
    y_ref = nlgraph.aggregate(q, k, v, A.Softmax(), graph, backend="reference")
    torch.testing.assert_close(y, y_ref, **_fp32_tol(q, k, A.Softmax(), y_ref))
    dy = torch.randn_like(y)
    for g, gr in zip(torch.autograd.grad(y, (q, k, v), dy), torch.autograd.grad(y_ref, (q, k, v), dy),
                     strict=True):
        torch.testing.assert_close(g, gr, **_fp32_tol(q, k, A.Softmax(), gr))
    rpb = torch.zeros(*(2 * kk - 1 for kk in graph.kernel_size))
    ok, why = nlgraph.dispatch.get_backend("triton").can_run(
        q, k, v, A.Softmax(), G.LocalWindow(shape, rpb=rpb, **opts))
    assert not ok and "relative position bias" in why


@pytest.mark.parametrize("shape", [(5, 7), (1, 6), (9, 3)])
@pytest.mark.parametrize("aff_name", ["softmax", "gaussian_offset"])
def test_criss_cross_in_kernel_matches_reference(shape, aff_name):
    """CCNet's criss-cross graph in the kernel (the same row OR the same column, the query once)."""
    n = math.prod(shape)
    q, k, v = _inputs(n, n, 16, 5, torch.float32, seed=6)
    aff = AFFINITIES[aff_name](16)
    graph = G.CrissCross(shape)
    y = nlgraph.aggregate(q, k, v, aff, graph, backend="triton", options={"block_n": 16, "block_m": 16})
    y_ref = nlgraph.aggregate(q, k, v, aff, graph, backend="reference")
    torch.testing.assert_close(y, y_ref, **_fp32_tol(q, k, aff, y_ref))
    dy = torch.randn_like(y)
    for g, gr in zip(torch.autograd.grad(y, (q, k, v), dy), torch.autograd.grad(y_ref, (q, k, v), dy),
                     strict=True):
        torch.testing.assert_close(g, gr, **_fp32_tol(q, k, aff, gr))


def _cutoff_in_a_gap(q, k, bandwidth, offset):
    """A cut-off halfway between two neighbouring pair distances (float64), far from every pair.

    The cut-off is a jump: a pair within rounding of it may be kept by one side and dropped by the
    other. Placing it in the widest gap between the middle third of the sorted distances keeps every
    pair many roundings away (asserted), so both sides drop the same pairs.
    """
    qd, kd = q.detach().double().cpu() / bandwidth, k.detach().double().cpu() / bandwidth
    dist = ((qd[..., :, None, :] - kd[..., None, :, :]) ** 2).sum(-1) / 2 - offset
    u = dist.clamp(min=0).flatten().sort().values
    lo, hi = len(u) // 3, 2 * len(u) // 3
    gaps = u[lo + 1:hi + 1] - u[lo:hi]
    i = lo + int(gaps.argmax())
    cut = float(u[i] + u[i + 1]) / 2
    assert float(u[i + 1] - u[i]) > 1e-4 * (1 + cut)  # >> float32 rounding of a distance (~1e-6 relative)
    return cut


@pytest.mark.parametrize("normalize,offset", [(True, 0.0), (True, 0.5), (False, 0.0)])
@pytest.mark.parametrize("graph_kind", ["complete", "exclude_self", "window"])
def test_gaussian_cutoff_in_kernel_matches_reference(normalize, offset, graph_kind):
    """Gaussian(cutoff=c): pairs farther than c are non-edges, in the kernel as in the reference."""
    shape = (5, 6)
    n = shape[0] * shape[1]
    q, k, v = _inputs(n, n, 8, 5, torch.float32, self_graph=True)
    bw = 2.0
    aff = A.Gaussian(bw, normalize=normalize, offset=offset, cutoff=_cutoff_in_a_gap(q, k, bw, offset))
    graph = {"complete": None, "exclude_self": G.ExcludeSelf(), "window": G.LocalWindow(shape, 2)}[graph_kind]
    opts = {"block_n": 16, "block_m": 16}
    y = nlgraph.aggregate(q, k, v, aff, graph, backend="triton", options=opts)
    y_ref = nlgraph.aggregate(q, k, v, aff, graph, backend="reference")
    tol = _fp32_tol(q, k, aff, y_ref)
    torch.testing.assert_close(y, y_ref, **tol)
    dy = torch.randn_like(y)
    for g, gr in zip(torch.autograd.grad(y, (q, k, v), dy), torch.autograd.grad(y_ref, (q, k, v), dy),
                     strict=True):
        torch.testing.assert_close(g, gr, **_fp32_tol(q, k, aff, gr))


def test_gaussian_cutoff_dropping_a_whole_row_gives_zero():
    """A query whose every pair is cut off has no neighbour: y = 0, finite (zero) gradients."""
    q, k, v = _inputs(7, 9, 4, 3, torch.float32)
    with torch.no_grad():
        q[:, 2] += 100.0  # far from every key
    aff = A.Gaussian(1.0, cutoff=3.0)
    y = nlgraph.aggregate(q, k, v, aff, backend="triton", options={"block_n": 16, "block_m": 16})
    assert torch.equal(y[:, 2], torch.zeros_like(y[:, 2]))
    gq, = torch.autograd.grad(y.sum(), q)
    assert torch.isfinite(gq).all() and torch.equal(gq[:, 2], torch.zeros_like(gq[:, 2]))


def test_non_local_means_runs_on_the_kernel():
    import numpy as np

    img = np.random.default_rng(0).random((12, 14)).astype(np.float32)
    # the exact formula: float32 and float64 may disagree at the cut-off's jump (a distance within
    # rounding of it); the kernel's cut-off is checked with the cut-off in a gap (above)
    kw = dict(patch_size=3, patch_distance=2, h=0.3, cutoff=None)
    ours = nlgraph.denoise_nl_means(torch.from_numpy(img).to(DEVICE), backend="triton", **kw)
    ref = nlgraph.denoise_nl_means(img.astype(np.float64), **kw)
    # float32 vs exact: a weight's logit is a patch distance / h^2, a sum of squares (its own |terms|),
    # so it errs by ~(log2 9 + 3) u logit relative; weights exp(-logit) make the error of these positive
    # averages of pixels <= that u max(logit e^-logit) = 6.2 u / e per window entry (25): <= 3.4e-6 relative
    np.testing.assert_allclose(ours.cpu().numpy(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("aff_name", ["softmax", "gaussian_c1"])
def test_low_precision_gradients_within_twice_plain_torch(dtype, aff_name):
    """Backward kernels in fp16/bf16 (fp32 accumulation) vs plain PyTorch autograd in the same dtype."""
    from .formulas import aggregate_formula

    kind, params = (("softmax", {}) if aff_name == "softmax" else ("gaussian_unnorm", {"bandwidth": 8.0}))
    q, k, v = _inputs(40, 36, 64, 16, torch.float64, seed=5)
    dy = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def grads(qq, kk, vv, fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (qq, kk, vv)]
        y = fn(*leaves)
        return torch.autograd.grad(y, leaves, dy.to(y.dtype).to(y.device))

    exact = grads(q.cpu(), k.cpu(), v.cpu(), lambda a, b, c: aggregate_formula(kind, a, b, c, params))
    low = [t.detach().cpu().to(dtype) for t in (q, k, v)]
    plain = grads(*low, lambda a, b, c: aggregate_formula(kind, a, b, c, params))
    ours = grads(*[t.to(DEVICE) for t in low],
                 lambda a, b, c: nlgraph.aggregate(a, b, c, AFFINITIES[aff_name](64) if aff_name == "softmax"
                                                   else A.Gaussian(8.0, normalize=False), backend="triton",
                                                   options={"block_n": 16, "block_m": 16}))
    for name, g_ex, g_pl, g_us in zip("qkv", exact, plain, ours, strict=True):
        assert g_us.dtype == dtype
        err_plain = (g_pl.double() - g_ex).abs().max().item()
        err = (g_us.double().cpu() - g_ex).abs().max().item()
        bound = 2 * err_plain + 2 * torch.finfo(dtype).eps * g_ex.abs().max().item()
        assert err <= bound, (name, err, err_plain)


def test_backward_runs_in_the_kernels(monkeypatch):
    """Without a float mask that needs a gradient, no PyTorch tile loop runs in backward."""
    from nlgraph.backends.triton import launch as tb

    def boom(*a, **k):
        raise AssertionError("tile_backward called")

    monkeypatch.setattr(tb, "tile_backward", boom)
    q, k, v = _inputs(19, 23, 16, 7, torch.float32, seed=8)
    y = nlgraph.aggregate(q, k, v, A.Gaussian(2.0, offset=0.3), backend="triton",
                          options={"block_n": 16, "block_m": 16})
    y_ref = nlgraph.aggregate(q, k, v, A.Gaussian(2.0, offset=0.3), backend="reference")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), dy)
    grads_ref = torch.autograd.grad(y_ref, (q, k, v), dy)
    for g, gr in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, gr, **_fp32_tol(q, k, A.Gaussian(2.0, offset=0.3), gr))


@pytest.mark.parametrize("wrt", ["q", "k", "v", "qk"])
def test_gradients_of_a_subset(wrt):
    """Only the requested gradients are computed (the kernels get zero chunks for the rest)."""
    q, k, v = _inputs(18, 21, 20, 9, torch.float32, seed=9)
    leaves = [t for name, t in zip("qkv", (q, k, v), strict=True) if name in wrt]
    qd, kd, vd = (t if name in wrt else t.detach() for name, t in zip("qkv", (q, k, v), strict=True))
    opts = {"block_n": 16, "block_m": 16}
    y = nlgraph.aggregate(qd, kd, vd, A.Gaussian(3.0), backend="triton", options=opts)
    y_ref = nlgraph.aggregate(qd, kd, vd, A.Gaussian(3.0), backend="reference")
    dy = torch.randn_like(y)
    for g, gr in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(y_ref, leaves, dy), strict=True):
        torch.testing.assert_close(g, gr, **_fp32_tol(q, k, A.Gaussian(3.0), gr))


def test_kernels_compile_for_gpu_targets():
    """The kernels compile to sm_80 / sm_90 cubins (Triton's compiler + ptxas run without a GPU)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_compile.py")
    res = subprocess.run([sys.executable, str(script), "--arch", "80", "90", "--dtype", "fp16", "fp32"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("compiled") == 12, res.stdout


@pytest.mark.parametrize("graph_kind", ["complete", "bool_mask", "float_mask"])
def test_torch_func_vmap_and_jacrev(graph_kind):
    """torch.func through the kernels: the vmap rule folds the vmapped dim into the kernels' batch
    (forward and the backward Function), so vmap and jacrev (vmap over vjp) match the reference."""
    q, k, v = (t.detach() for t in _inputs(5, 6, 4, 3, torch.float32, seed=11))
    gen = torch.Generator().manual_seed(12)
    graph = {"complete": None, "bool_mask": G.Mask((torch.rand(2, 5, 6, generator=gen) > 0.3).to(DEVICE)),
             "float_mask": G.Mask(torch.randn(5, 6, generator=gen).to(DEVICE))}[graph_kind]
    aff = A.Gaussian(1.3, normalize=graph_kind != "complete")

    def fn(backend):
        opts = {"block_n": 16, "block_m": 16} if backend == "triton" else None
        return lambda q_, k_, v_: nlgraph.aggregate(q_, k_, v_, aff, graph, backend=backend, options=opts)

    for argnum in (0, 2):
        torch.testing.assert_close(torch.func.jacrev(fn("triton"), argnums=argnum)(q, k, v),
                                   torch.func.jacrev(fn("reference"), argnums=argnum)(q, k, v),
                                   rtol=1e-4, atol=1e-5)
    qb = torch.randn(3, *q.shape, generator=gen).to(DEVICE)
    torch.testing.assert_close(torch.func.vmap(fn("triton"), in_dims=(0, None, None))(qb, k, v),
                               fn("reference")(qb, k, v), rtol=1e-4, atol=1e-5)
