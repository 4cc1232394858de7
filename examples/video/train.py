"""Video classification that needs the time axis: C2D with and without space-time non-local blocks.

    python examples/video/train.py [--steps 600] [--seed 0]

Clips of 4 frames (28x28) show one scikit-learn digit moving in a straight line; in the last frame
it either stays the same digit (label 1) or turns into a digit of another class (label 0). Every
single frame looks like an ordinary digit, so only comparing frames across time tells the classes
apart. The C2D baseline (2-D convolutions per frame, average pooling over space and time, a linear
classifier) cannot: averaged per-frame features of "A, A, A, B" are not linearly separable from
"A, A, A, A" for every pair of classes. A NonLocal3d block (attention over all T*H*W positions, as
in Wang et al. 2018) compares the frames. The script reports both accuracies and shows that the
block is exactly attention over the T*H*W tokens (torch.nn.MultiheadAttention after conversion).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from nlgraph import NonLocal3d, tasks
from nlgraph.adapters import mha_to_torch, nonlocal_to_mha

T, SIZE = 4, 28


def make_clips(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, T, 28, 28) clips in [0, 1] and (n,) labels (:func:`nlgraph.tasks.moving_digit_clips`)."""
    return tasks.moving_digit_clips(n, seed, frames=T, size=SIZE)


def C2D(nonlocal_blocks: bool, width: int = 32) -> tasks.C2D:  # noqa: N802  (the script's old class name)
    """Per-frame 2-D convolutions, optional space-time NonLocal3d block, pooling, linear classifier."""
    block = (lambda w: NonLocal3d(w, inter_channels=w // 2, sub_sample=True)) if nonlocal_blocks else None
    return tasks.C2D(block, width)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int, batch: int = 32) -> None:
    tasks.train(model, x, y, steps, seed, batch=batch, lr=3e-3)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def nonlocal_as_attention_max_diff(model: C2D, x: torch.Tensor) -> float:
    """|NonLocal3d(z) - (z + torch MHA over the T*H*W tokens)| on the block's real input z."""
    model.eval()
    z = model.features(x)
    block = model.nonlocal_block
    mha = mha_to_torch(nonlocal_to_mha(block))
    tokens = z.flatten(2).transpose(1, 2)  # (B, T*H*W, C)
    _, k, v = block.embed(z)  # sub_sample pools keys/values after phi and g
    via_attention = tokens + mha(tokens, k, v, need_weights=False)[0]
    return float((block(z).flatten(2).transpose(1, 2) - via_attention).abs().max())


def run(steps: int = 600, n_train: int = 3000, n_test: int = 500, seed: int = 0, log=print) -> dict:
    torch.manual_seed(seed)
    x_tr, y_tr = make_clips(n_train, seed)
    x_te, y_te = make_clips(n_test, seed + 1)
    results = {}
    for name, nl in (("C2D", False), ("C2D + space-time non-local", True)):
        t = time.perf_counter()
        model = C2D(nonlocal_blocks=nl)
        train(model, x_tr, y_tr, steps, seed)
        results[name] = accuracy(model, x_te, y_te)
        log(f"{name:<28} test accuracy {results[name]:.3f}   ({time.perf_counter() - t:.0f}s training)")
    diff = nonlocal_as_attention_max_diff(model, x_te[:8])
    results["max |NonLocal3d - attention over T*H*W tokens|"] = diff
    log(f"NonLocal3d == torch.nn.MultiheadAttention over T*H*W tokens: max abs difference "
        f"{results['max |NonLocal3d - attention over T*H*W tokens|']:.2e}")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="training steps per model (default 600)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    run(args.steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
