"""crf.DenseCRF == mean-field written out with materialised kernels; gradients; bad input."""

from __future__ import annotations

import pytest
import torch

import nlgraph
from crf import DenseCRF
from nlgraph import graph as G

# float64 rounding bound, derived in tests/formulas.py (TOLERANCES)
TOL = dict(rtol=1e-9, atol=1e-10)


def kernel_matrix(feat):
    """exp(-|f_i - f_j|^2 / 2) with a zero diagonal: (B, N, N)."""
    diff = feat[:, :, None, :] - feat[:, None, :, :]
    k = torch.exp(-0.5 * (diff * diff).sum(-1))
    return k * (1 - torch.eye(feat.shape[1], dtype=feat.dtype))


def positions(spatial, dtype):
    axes = [torch.arange(s, dtype=dtype) for s in spatial]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(spatial))


def mean_field_reference(unary, image, crf: DenseCRF):
    """Krähenbühl & Koltun's update, every sum materialised."""
    b, num_labels = unary.shape[:2]
    spatial = unary.shape[2:]
    pos = positions(spatial, unary.dtype)
    tscale = torch.ones(len(spatial), dtype=unary.dtype)
    if len(spatial) == 3 and crf.theta_time is not None:
        tscale[0] = 1.0
    def scaled(theta):
        s = torch.ones(len(spatial), dtype=unary.dtype) / theta  # (theta: a tensor when trainable)
        if len(spatial) == 3 and crf.theta_time is not None:
            s[0] = 1.0 / crf.theta_time
        return pos * s
    col = image.flatten(2).transpose(1, 2)
    f_app = torch.cat([scaled(crf.theta_alpha).expand(b, -1, -1), col / crf.theta_beta], -1)
    f_smooth = scaled(crf.theta_gamma).expand(b, -1, -1)
    w = crf.kernel_weights
    k_total = w[0] * kernel_matrix(f_app) + w[1] * kernel_matrix(f_smooth)
    logits = unary.flatten(2).transpose(1, 2)
    q = torch.softmax(logits, -1)
    for _ in range(crf.num_iterations):
        m = k_total @ q  # (B, N, L)
        pairwise = torch.einsum("bnk,lk->bnl", m, crf.compatibility)
        q = torch.softmax(logits - pairwise, -1)
    return q.transpose(1, 2).reshape(unary.shape)


def exact(crf: DenseCRF) -> DenseCRF:
    crf.backend = "chunked"
    return crf


def _inputs(shape, labels=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, spatial = shape[0], shape[1:]
    unary = torch.randn(b, labels, *spatial, generator=gen, dtype=torch.float64) * 2
    image = torch.rand(b, 3, *spatial, generator=gen, dtype=torch.float64) * 255
    return unary, image


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("compat", ["potts", "learned"])
def test_matches_materialised_mean_field(trainable, compat):
    mu = "potts" if compat == "potts" else torch.rand(3, 3, dtype=torch.float64)
    crf = DenseCRF(3, theta_alpha=4.0, theta_beta=30.0, theta_gamma=2.0, w_appearance=2.0, w_smoothness=1.5,
                   compatibility=mu, num_iterations=4, trainable=trainable).double()
    exact(crf)
    unary, image = _inputs((2, 6, 7))
    u1, u2 = unary.clone().requires_grad_(True), unary.clone().requires_grad_(True)
    q, q_ref = crf(u1, image), mean_field_reference(u2, image, crf)
    torch.testing.assert_close(q, q_ref, **TOL, msg=lambda m: f"forward: {m}")
    torch.testing.assert_close(q.sum(1), torch.ones_like(q.sum(1)), **TOL)
    dq = torch.randn_like(q)
    params = [p for p in crf.parameters()]
    g = torch.autograd.grad(q, [u1, *params], dq)
    g_ref = torch.autograd.grad(q_ref, [u2, *params], dq)
    for name, a, r in zip(["unary"] + [n for n, _ in crf.named_parameters()], g, g_ref, strict=True):
        torch.testing.assert_close(a, r, **TOL, msg=lambda m: f"d/d{name}: {m}")


def test_video_features_include_time():
    crf = exact(DenseCRF(2, theta_alpha=3.0, theta_beta=40.0, theta_gamma=2.0, num_iterations=3,
                         theta_time=1.5).double())
    unary, image = _inputs((1, 3, 4, 5), labels=2)
    torch.testing.assert_close(crf(unary, image), mean_field_reference(unary, image, crf), **TOL)


def test_gradcheck_trainable_crf():
    """float64 gradcheck w.r.t. the unary, the kernel weights and the compatibility (CRF-as-RNN)."""
    crf = exact(DenseCRF(2, theta_alpha=2.0, theta_beta=50.0, theta_gamma=1.5, num_iterations=2,
                         trainable=True).double())
    unary, image = _inputs((1, 3, 4), labels=2)
    w = crf.kernel_weights.detach().clone().requires_grad_(True)
    mu = (crf.compatibility.detach() + 0.3 * torch.rand(2, 2, dtype=torch.float64)).requires_grad_(True)

    def fn(u, w_, mu_):
        return torch.func.functional_call(crf, {"kernel_weights": w_, "compatibility": mu_}, (u, image))

    # central differences at eps = 1e-6 err by ~eps^2 |f^(3)| / 6 (~1e-12 x O(10)) plus
    # ~100 u |f| / eps (~1e-8): far below atol 1e-6
    assert torch.autograd.gradcheck(fn, (unary.requires_grad_(True), w, mu), eps=1e-6, atol=1e-6)


def test_one_message_is_the_core_op():
    crf = exact(DenseCRF(3, num_iterations=1).double())
    gen = torch.Generator().manual_seed(3)
    feat = torch.randn(2, 30, 5, generator=gen, dtype=torch.float64)
    q = torch.softmax(torch.randn(2, 30, 3, generator=gen, dtype=torch.float64), -1)
    m = crf.message(q, [(feat, torch.tensor(1.0, dtype=torch.float64))])
    torch.testing.assert_close(m, kernel_matrix(feat) @ q, **TOL)
    y = nlgraph.aggregate(feat, feat, q, nlgraph.Gaussian(1.0, normalize=False), G.ExcludeSelf(),
                          backend="reference")
    torch.testing.assert_close(m, y, **TOL)


def test_backends_agree_and_zero_iterations_is_softmax():
    crf = DenseCRF(3, theta_alpha=5.0, num_iterations=3).double()
    assert crf.backend == "permutohedral"
    unary, image = _inputs((1, 5, 5))
    crf.backend = "reference"
    q_ref = crf(unary, image)
    crf.backend = "chunked"
    torch.testing.assert_close(crf(unary, image), q_ref, **TOL)
    crf.num_iterations = 0
    torch.testing.assert_close(crf(unary, image), torch.softmax(unary, 1), **TOL)


def test_refines_a_noisy_segmentation():
    """Two flat regions with noisy unaries: the CRF's labels are more accurate than the unaries'."""
    gen = torch.Generator().manual_seed(0)
    h, w = 16, 16
    truth = torch.zeros(h, w, dtype=torch.long)
    truth[:, 8:] = 1
    image = torch.where(truth.bool(), 200.0, 40.0).expand(1, 3, h, w).double()
    onehot = torch.nn.functional.one_hot(truth, 2).permute(2, 0, 1)[None].double()
    unary = 1.0 * onehot + torch.randn(1, 2, h, w, generator=gen, dtype=torch.float64) * 1.2
    crf = DenseCRF(2, theta_alpha=5.0, theta_beta=20.0, theta_gamma=2.0, w_appearance=5.0, w_smoothness=1.0,
                   num_iterations=5).double()
    acc_unary = (unary.argmax(1)[0] == truth).double().mean()
    for backend in ("permutohedral", "chunked"):
        crf.backend = backend
        acc_crf = (crf(unary, image).argmax(1)[0] == truth).double().mean()
        # not a rounding tolerance: the CRF's effect on a seeded scene (rounding could flip only near-tied
        # labels, none here)
        assert acc_unary < 0.9 and acc_crf > 0.98, (backend, acc_unary, acc_crf)


def test_bad_input():
    crf = DenseCRF(3)
    with pytest.raises(ValueError, match=r"unary must be \(B, L, H, W\) or \(B, L, T, H, W\) with L = 3, "
                                         r"got \(1, 2, 4, 4\)"):
        crf(torch.randn(1, 2, 4, 4), torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError,
                       match=r"image must be \(B, C, \.\.\.\) with the unary's batch and spatial size"):
        crf(torch.randn(1, 3, 4, 4), torch.rand(1, 3, 4, 5))
    with pytest.raises(TypeError, match=r"image must be floating point, got torch.uint8"):
        crf(torch.randn(1, 3, 4, 4), torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"must share dtype and device"):
        crf(torch.randn(1, 3, 4, 4), torch.rand(1, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"num_labels must be an int >= 2"):
        DenseCRF(1)
    with pytest.raises(ValueError, match=r"theta_alpha must be a positive finite number, got 0"):
        DenseCRF(3, theta_alpha=0)
    with pytest.raises(ValueError, match=r"compatibility must be a float \(3, 3\) tensor"):
        DenseCRF(3, compatibility=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"unary contains NaN or Inf"):
        u = torch.randn(1, 3, 4, 4)
        u[0, 0, 0, 0] = float("nan")
        crf(u, torch.rand(1, 3, 4, 4))


def test_output_is_contiguous_and_trains_with_nll_loss():
    """CRF-as-RNN training: the marginals feed nll_loss (whose 2-D backward needs contiguous input)."""
    crf = DenseCRF(4, theta_alpha=3.0, theta_beta=0.3, num_iterations=2, trainable=True)
    logits = torch.randn(2, 4, 9, 10, requires_grad=True)
    q = crf(logits, torch.rand(2, 3, 9, 10))
    assert q.is_contiguous()
    loss = torch.nn.functional.nll_loss(torch.log(q.clamp_min(1e-8)), torch.randint(0, 4, (2, 9, 10)))
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(crf.kernel_weights.grad).all()
