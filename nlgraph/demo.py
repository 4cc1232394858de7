"""``nlgraph demo``: the equivalence tour, built live and printed as one table.

Each row builds both sides of an equivalence from the same random inputs, compares the forward
outputs and every gradient, and reports the largest absolute difference against the stated
tolerance. Independent sides are PyTorch's own ``scaled_dot_product_attention`` and formulas
materialised right here from the definitions (explicit pairwise sums), never nlgraph's lowering.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import affinity as A
from . import graph as G
from .core import aggregate

__all__ = ["Check", "FigureWriteError", "core_checks", "run_checks", "main"]


class FigureWriteError(OSError):
    """The demo's figure could not be written (the command line reports it in one line)."""


@dataclass
class Check:
    name: str
    fwd_diff: Optional[float]
    grad_diff: Optional[float]
    tol: float
    skipped: str = ""  # why the check could not run (a peer package is missing)

    @property
    def passed(self) -> bool:
        if self.skipped:
            return True
        return (self.fwd_diff is not None and self.fwd_diff <= self.tol
                and (self.grad_diff is None or self.grad_diff <= self.tol))


def _compare(name: str, ours: Callable, theirs: Callable, inputs: Sequence[torch.Tensor],
             tol: float) -> Check:
    """Run both sides on the same leaves; compare outputs and the gradients of every input."""

    def cotangent(y: torch.Tensor) -> torch.Tensor:  # non-uniform: every output weighs differently
        return torch.ones_like(y) * 0.5 + torch.linspace(0, 1, y.numel()).view_as(y)

    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y1 = ours(*leaves)
    g1 = torch.autograd.grad(y1, leaves, cotangent(y1))
    leaves2 = [t.detach().clone().requires_grad_(True) for t in inputs]
    y2 = theirs(*leaves2)
    g2 = torch.autograd.grad(y2, leaves2, cotangent(y2))
    fwd = (y1 - y2).abs().max().item()
    grad = max((a - b).abs().max().item() for a, b in zip(g1, g2, strict=True))
    return Check(name, fwd, grad, tol)


def _pairwise_gaussian_message(feat, values, bandwidth):
    """One dense-CRF message written out: m_i = sum_{j != i} exp(-|f_i - f_j|^2 / (2 b^2)) Q_j."""
    diff = feat[:, None, :] - feat[None, :, :]
    k = torch.exp(-0.5 * (diff * diff).sum(-1) / bandwidth**2)
    k = k * (1 - torch.eye(feat.shape[0], dtype=feat.dtype))
    return k @ values


def core_checks(seed: int = 0) -> list[Check]:
    """The core op's equivalences (float64)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    checks = []
    tol = 1e-9

    q, k, v = r(2, 4, 300, 32), r(2, 4, 280, 32), r(2, 4, 280, 16)
    checks.append(_compare("aggregate(Softmax) == F.scaled_dot_product_attention",
                           lambda q, k, v: aggregate(q, k, v, A.Softmax(), backend="chunked"),
                           lambda q, k, v: F.scaled_dot_product_attention(q, k, v), (q, k, v), tol))
    mask = torch.rand(300, 280, generator=gen) > 0.5
    checks.append(_compare("... with a bool attn_mask (chunked tiles)",
                           lambda q, k, v: aggregate(q, k, v, graph=G.Mask(mask), backend="chunked",
                                                     options={"block_n": 64, "block_m": 96}),
                           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                           (q, k, v), tol))

    x = r(1, 400, 24)
    w = r(48)
    checks.append(_compare("dot product: q (k^T v) / M algebra == N x M brute force",
                           lambda x: aggregate(x, x, x, A.DotProduct(), backend="algebra"),
                           lambda x: (x @ x.transpose(-1, -2)) @ x / x.shape[-2], (x,), tol))
    checks.append(_compare("concatenation: sorted prefix sums == N x M ReLU brute force",
                           lambda x, w: aggregate(x, x, x, A.Concatenation(w), backend="algebra"),
                           lambda x, w: (torch.relu((x @ w[:24])[..., :, None] + (x @ w[24:])[..., None, :])
                                         @ x / 400),
                           (x, w), tol))

    feat, qv = r(200, 5), torch.softmax(r(200, 3), -1)
    checks.append(_compare("CRF message == aggregate(Gaussian(C=1), ExcludeSelf)",
                           lambda f, v: aggregate(f, f, v, A.Gaussian(1.5, normalize=False), G.ExcludeSelf()),
                           lambda f, v: _pairwise_gaussian_message(f, v, 1.5), (feat, qv), tol))

    img = r(1, 12 * 16, 8)
    win = G.LocalWindow((12, 16), radius=2)
    dense = win.dense(192, 192)
    checks.append(_compare("local-window graph == dense op with the matching mask",
                           lambda x: aggregate(x, x, x, A.Gaussian(2.0), win),
                           lambda x: aggregate(x, x, x, A.Gaussian(2.0), G.Mask(dense), backend="reference"),
                           (img,), tol))
    return checks


def module_checks(seed: int = 0) -> list[Check]:
    """Non-local blocks and attention as instances of the op (float64)."""
    from .adapters import mha_to_torch, nonlocal_to_mha
    from .nonlocal_blocks import NonLocal2d, NonLocal3d

    torch.manual_seed(seed)
    tol = 1e-9
    checks = []
    tokens = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731

    def trained(block):
        with torch.no_grad():  # a trained-looking block: W / BN no longer zero
            for p in block.parameters():
                p.normal_(0, 0.3)
        return block

    block = trained(NonLocal2d(16, sub_sample=False, bn_layer=False, use_scale=True)).double()
    ours = nonlocal_to_mha(block)
    theirs = mha_to_torch(ours)
    x = torch.randn(2, 16, 12, 10, dtype=torch.float64)
    checks.append(_compare("NonLocal2d (embedded gaussian) == our MultiheadAttention",
                           lambda x: tokens(block(x)), lambda x: tokens(x) + ours(*[tokens(x)] * 3)[0],
                           (x,), tol))
    checks.append(_compare("our MultiheadAttention == torch.nn.MultiheadAttention",
                           lambda x: ours(*[tokens(x)] * 3, need_weights=False)[0],
                           lambda x: theirs(tokens(x), tokens(x), tokens(x), need_weights=False)[0],
                           (x,), tol))
    clip = trained(NonLocal3d(8, sub_sample=False, bn_layer=False)).double()
    att = nonlocal_to_mha(clip)
    v = torch.randn(1, 8, 4, 6, 6, dtype=torch.float64)
    checks.append(_compare("NonLocal3d on a clip == attention over T*H*W tokens",
                           lambda v: tokens(clip(v)), lambda v: tokens(v) + att(*[tokens(v)] * 3)[0],
                           (v,), tol))
    return checks


def peer_checks(seed: int = 0) -> list[Check]:
    """Equivalences with other libraries' implementations: PyG, pydensecrf, scikit-image."""
    from ._optional import missing, optional

    checks = []
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731

    name = "dense op (complete graph) == PyG MessagePassing on its edge_index"
    if optional("torch_geometric") is None:
        checks.append(Check(name, None, None, 1e-9, skipped=missing("torch_geometric")))
    else:
        q, k, v = r(2, 150, 16), r(2, 150, 16), r(2, 150, 8)
        ei = G.Complete().edges(150, 150, torch.device("cpu"))[0]
        checks.append(_compare(name, lambda q, k, v: aggregate(q, k, v, backend="chunked"),
                               lambda q, k, v: aggregate(q, k, v, graph=G.EdgeIndex(ei), backend="pyg"),
                               (q, k, v), 1e-9))

    skimage = optional("skimage")
    name = "crf.densecrf == pydensecrf (astronaut crop, 5 iterations, max|dQ|)"
    if optional("pydensecrf") is None or skimage is None:
        checks.append(Check(name, None, None, 1e-4, skipped=missing("pydensecrf" if skimage else "skimage")))
    else:
        import numpy as np
        import pydensecrf.densecrf as peer
        from skimage import data

        from crf import densecrf as ours
        from crf.utils import unary_from_softmax

        img = np.ascontiguousarray(data.astronaut()[100:228, 150:278])
        probs = torch.softmax(r(4, 128, 128) * 2, 0).float().numpy()
        unary = np.ascontiguousarray(unary_from_softmax(probs))
        qs = []
        for dcrf in (peer, ours):
            d = dcrf.DenseCRF2D(128, 128, 4)
            d.setUnaryEnergy(unary)
            d.addPairwiseGaussian(sxy=3, compat=3)
            d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10)
            qs.append(np.array(d.inference(5)))
        checks.append(Check(name, float(np.abs(qs[0] - qs[1]).max()), None, 1e-4))

    name = "non-local means vs skimage.restoration (camera crop, |d PSNR| dB)"
    if skimage is None:
        checks.append(Check(name, None, None, 0.2, skipped=missing("skimage")))
    else:
        import numpy as np
        from skimage import data
        from skimage.metrics import peak_signal_noise_ratio
        from skimage.restoration import denoise_nl_means as sk_nl_means
        from skimage.util import img_as_float

        from .denoise import denoise_nl_means

        clean = img_as_float(data.camera()[150:214, 200:264])
        noisy = clean + np.random.default_rng(seed).normal(0, 0.08, clean.shape)
        kw: dict[str, Any] = dict(patch_size=5, patch_distance=6, h=0.08, fast_mode=False)
        p1 = peak_signal_noise_ratio(clean, denoise_nl_means(noisy, **kw), data_range=1.0)
        p2 = peak_signal_noise_ratio(clean, sk_nl_means(noisy, **kw), data_range=1.0)
        checks.append(Check(name, abs(p1 - p2), None, 0.2))
    return checks


def run_checks(checks: Sequence[Check]) -> bool:
    """Print the table; return True when every check passes (skipped ones say why)."""
    width = max(len(c.name) for c in checks)
    print(f"{'equivalence':<{width}}  {'max|d fwd|':>10}  {'max|d grad|':>11}  {'tol':>7}  pass")
    print("-" * (width + 42))
    for c in checks:
        if c.skipped:
            print(f"{c.name:<{width}}  skipped: {c.skipped}")
            continue
        grad = "-" if c.grad_diff is None else f"{c.grad_diff:.2e}"
        verdict = "yes" if c.passed else "NO"
        print(f"{c.name:<{width}}  {c.fwd_diff:>10.2e}  {grad:>11}  {c.tol:>7.0e}  {verdict}")
    ok = all(c.passed for c in checks)
    ran = [c for c in checks if not c.skipped]
    print(f"\n{sum(c.passed for c in ran)}/{len(ran)} equivalences hold (float64 where gradients are shown: "
          f"forward and all gradients), {len(checks) - len(ran)} skipped")
    return ok


def query_affinity_map(features: torch.Tensor, index: int, affinity: A.Affinity,
                       chunk: int = 4096) -> torch.Tensor:
    """Row ``index`` of the normalised affinity f_ij / C_i over all j, from the core op on one-hot values.

    (The same trick the attention module uses for ``need_weights``; chunked over the one-hot columns so
    memory stays O(N * chunk).)
    """
    n = features.shape[0]
    q = features[index:index + 1]
    cols = []
    for c0 in range(0, n, chunk):
        eye = torch.zeros(n, min(chunk, n - c0), dtype=features.dtype)
        eye[torch.arange(c0, c0 + eye.shape[1]), torch.arange(eye.shape[1])] = 1.0
        cols.append(aggregate(q, features, eye, affinity)[0])
    return torch.cat(cols)


def segmentation_figure(out: str, seed: int = 0) -> dict:
    """Refine a noisy 3-label segmentation of scikit-image's coffee photo with the dense CRF; write a PNG.

    Panels: the photo, the noisy labels (35% replaced at random), the CRF's labels, and the normalised
    appearance-kernel affinity of one query pixel (the attention map the CRF's message uses).
    """
    import numpy as np
    from skimage import data
    from skimage.filters import gaussian, threshold_multiotsu

    from crf import DenseCRF, crf_features

    image = np.ascontiguousarray(data.coffee()[::2, ::2][:192, 40:232])
    gray = gaussian(image.mean(-1), sigma=2)
    truth = np.digitize(gray, threshold_multiotsu(gray, classes=3))
    rng = np.random.default_rng(seed)
    noisy = np.where(rng.random(truth.shape) < 0.35, rng.integers(0, 3, truth.shape), truth)
    img = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    onehot = F.one_hot(torch.from_numpy(noisy), 3).permute(2, 0, 1)[None].float()
    unary = torch.log(onehot * 0.6 + (1 - onehot) * 0.2)
    crf = DenseCRF(3, theta_alpha=10.0, theta_beta=15.0, theta_gamma=3.0, w_appearance=0.02,
                   w_smoothness=0.05, num_iterations=5)
    refined = crf(unary, img).argmax(1)[0].numpy()
    h, w = truth.shape
    query = (h // 2) * w + w // 3
    feats = crf_features(img, 60.0, crf.theta_beta)[0]  # a wider spatial reach shows the non-local part
    attn = query_affinity_map(feats, query, A.Gaussian(1.0, normalize=True)).reshape(h, w).numpy()
    stats = {"accuracy_noisy": float((noisy == truth).mean()),
             "accuracy_crf": float((refined == truth).mean())}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    panels = [(image, "scikit-image coffee", None),
              (noisy, f"noisy labels ({stats['accuracy_noisy']:.1%} right)", "viridis"),
              (refined, f"dense CRF, 5 mean-field steps ({stats['accuracy_crf']:.1%})", "viridis"),
              (attn, "affinity of the marked pixel (theta_alpha=60, theta_beta=15)", "magma")]
    for ax, (im, title, cmap) in zip(axes, panels, strict=True):
        ax.imshow(im, cmap=cmap)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    for ax in (axes[0], axes[3]):
        ax.plot([w // 3], [h // 2], marker="+", color="cyan", markersize=14, mew=2)
    fig.suptitle("nlgraph: the CRF message is the core op with a Gaussian affinity (C = 1, j != i)")
    fig.tight_layout()
    import os

    try:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        fig.savefig(out, dpi=90)
    except OSError as err:
        raise FigureWriteError(f"cannot write the figure to {out!r}: {err.strerror or err}") from err
    finally:
        plt.close(fig)
    return stats


def main(args) -> int:
    from ._optional import missing, optional

    start = time.perf_counter()
    print("nlgraph demo: one op, y_i = (1/C_i) sum_{j in N(i)} f(x_i, x_j) g(x_j), checked against "
          "independent implementations\n")
    steps = [("core op", core_checks), ("modules", module_checks), ("peer libraries", peer_checks)]
    tqdm = getattr(optional("tqdm"), "tqdm", None)
    bar = tqdm(steps, desc="equivalences", unit="group", leave=False) if tqdm else steps
    checks: list[Check] = []
    for _, fn in bar:
        checks += fn(seed=args.seed)
    ok = run_checks(checks)
    if args.out:
        needed = [m for m in ("matplotlib", "skimage") if optional(m) is None]
        if needed:
            print(f"\nfigure skipped: {missing(needed[0])}")
        else:
            stats = segmentation_figure(args.out, seed=args.seed)
            print(f"\ndense-CRF refinement of a noisy segmentation: label accuracy "
                  f"{stats['accuracy_noisy']:.3f} -> {stats['accuracy_crf']:.3f}; "
                  f"figure written to {args.out}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(type("Args", (), {"seed": 0})()))

