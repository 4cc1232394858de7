"""Generated tasks on which the non-local family has something to do, and the small networks they train.

Both are built from scikit-learn's 8x8 digits (no download: the images ship with scikit-learn):

* **segmentation** (:func:`digit_scenes`): a scene holds two digits of one class, one clean and one
  corrupted (most of its pixels dropped, noise added); every digit pixel is labelled with the class
  (10 classes + background). The digits are placed farther apart than the CNN's receptive field, so
  the corrupted digit can only be recognised by looking at the clean one: long-range context.
* **video** (:func:`moving_digit_clips`): a digit moves in a straight line; in the last frame it either
  stays the same digit (label 1) or becomes a digit of another class (label 0). Every frame alone looks
  ordinary and per-frame features averaged over time do not separate the classes: only comparing
  frames does.

:class:`SegNet` (a dilated CNN + a context head + a 1x1 classifier) and :class:`C2D` (per-frame 2-D
convolutions + a space-time block + average pooling + a linear classifier) take the head / block as
a module, so every member of the family trains in the same network with the same budget.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._optional import missing, optional

__all__ = ["NUM_CLASSES", "digit_scenes", "moving_digit_clips", "miou", "SegNet", "C2D", "receptive_field",
           "train", "linear_decay", "StepTimer"]

NUM_CLASSES = 11  # background + 10 digits


def _digits() -> tuple[np.ndarray, np.ndarray]:
    datasets = optional("sklearn.datasets")
    if datasets is None:
        raise ImportError(missing("sklearn"))
    digits = datasets.load_digits()
    return digits.images / 16.0, digits.target


def digit_scenes(n: int, seed: int, size: int = 48, scale: int = 2, separation: int = 20, keep: float = 0.4,
                 corrupt_noise: float = 0.25, noise: float = 0.05) -> tuple[Tensor, Tensor]:
    """Segmentation scenes that need long-range context.

    Args:
        n: number of scenes.
        seed: numpy seed (the same seed gives the same scenes).
        size: scene side in pixels.
        scale: each 8x8 digit is upscaled to (8 scale)^2 pixels.
        separation: minimum Chebyshev distance between the two digits' corners (pixels).
        keep: fraction of the corrupted digit's pixels kept.
        corrupt_noise: std of the noise added to the corrupted digit.
        noise: std of the noise added to the whole scene.

    Returns:
        (n, 1, size, size) float32 images in [0, 1] and (n, size, size) int64 labels (0 = background).
    """
    images, target = _digits()
    side = 8 * scale
    if size - side < separation:
        raise ValueError(f"a {size}x{size} scene cannot hold two {side}-px digits {separation} px apart")
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, size, size), np.float32)
    y = np.zeros((n, size, size), np.int64)
    for s in range(n):
        cls = rng.integers(0, 10)
        idx = rng.choice(np.flatnonzero(target == cls), 2, replace=False)
        while True:  # two digits far enough apart that no receptive field smaller than `separation` sees both
            pos = rng.integers(0, size - side, size=(2, 2))
            if np.abs(pos[0] - pos[1]).max() >= separation:
                break
        for k, (i, (r, c)) in enumerate(zip(idx, pos, strict=True)):
            d = np.kron(images[i], np.ones((scale, scale)))
            fg = d > 0.3
            if k == 1:  # the corrupted copy
                d = d * (rng.random(d.shape) < keep) + rng.normal(0, corrupt_noise, d.shape)
            x[s, 0, r:r + side, c:c + side] = np.maximum(x[s, 0, r:r + side, c:c + side], d)
            y[s, r:r + side, c:c + side][fg] = cls + 1
    x += rng.normal(0, noise, x.shape).astype(np.float32)
    return torch.from_numpy(np.clip(x, 0, 1)), torch.from_numpy(y)


def moving_digit_clips(n: int, seed: int, frames: int = 4, size: int = 28, scale: int = 2, speed: int = 3,
                       noise: float = 0.05, classes: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor]:
    """Clips whose label needs a comparison across time.

    Args:
        n: number of clips.
        seed: numpy seed.
        frames: T.
        size: frame side in pixels.
        scale: each 8x8 digit is upscaled to (8 scale)^2 pixels.
        speed: pixels per frame along each axis (the direction is random).
        noise: std of the noise added to every frame.
        classes: the digit classes drawn (default all ten); a changed digit is of another of them.

    Returns:
        (n, 1, T, size, size) float32 clips in [0, 1] and (n,) int64 labels (1: the digit stays the same).
    """
    images, target = _digits()
    if classes is not None:
        if len(set(classes)) < 2 or not set(classes) <= set(range(10)):
            raise ValueError(f"classes must hold at least two distinct digits 0-9, got {classes!r}")
        keep = np.isin(target, list(classes))
        images, target = images[keep], target[keep]
    images = np.kron(images, np.ones((1, scale, scale)))
    side = 8 * scale
    travel = speed * (frames - 1)
    if size - side - travel < 0:
        raise ValueError(f"a {size}-px frame cannot hold a {side}-px digit moving {travel} px")
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, frames, size, size), np.float32)
    y = rng.integers(0, 2, n)
    for s in range(n):
        first = rng.integers(len(images))
        last = first if y[s] else rng.choice(np.flatnonzero(target != target[first]))
        v = rng.choice([-speed, speed], size=2)
        start = rng.integers(0, size - side - travel + 1, size=2)
        start = np.where(v < 0, start + travel, start)
        for t in range(frames):
            r, c = start + v * t
            x[s, 0, t, r:r + side, c:c + side] = images[last if t == frames - 1 else first]
    x += rng.normal(0, noise, x.shape).astype(np.float32)
    return torch.from_numpy(np.clip(x, 0, 1)), torch.from_numpy(y)


def miou(pred: Tensor, target: Tensor, num_classes: int = NUM_CLASSES) -> float:
    """Mean intersection over union over the classes present in ``pred`` or ``target``."""
    ious = []
    for c in range(num_classes):
        inter = ((pred == c) & (target == c)).sum().item()
        union = ((pred == c) | (target == c)).sum().item()
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


def receptive_field(dilations: Sequence[int], stride: int = 1) -> int:
    """Receptive field (pixels) of :class:`SegNet`'s body: 3x3 convolutions with these dilations, with
    a 3x3 stride-``stride`` convolution after the first when stride > 1 (the classifier's bilinear
    upsampling adds up to ``stride`` pixels on each side on top of this)."""
    rf, jump = 1 + 2 * dilations[0], 1
    if stride > 1:
        rf, jump = rf + 2, stride
    return rf + 2 * jump * sum(dilations[1:])


class SegNet(nn.Module):
    """Dilated 3x3 CNN + a context head + 1x1 classifier (+ bilinear upsampling at output stride > 1).

    Args:
        head: ``width -> module`` mapping (B, width, H, W) to the same shape, or None for the local
            baseline; called after the body is built (so a seed gives the same body for every head).
        width: channels of the CNN.
        dilations: one 3x3 convolution (+ BN + ReLU) per entry (default (1, 2, 4): 15 px).
        stride: output stride: with 2, a 3x3 stride-2 convolution follows the first layer, the head runs
            at half resolution (as segmentation heads run at 1/8 in practice) and the logits are
            upsampled bilinearly. Receptive field: :func:`receptive_field`.
        num_classes: output classes.
    """

    def __init__(self, head: Optional[Callable[[int], nn.Module]] = None, width: int = 32,
                 dilations: Sequence[int] = (1, 2, 4), stride: int = 1, num_classes: int = NUM_CLASSES):
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for i, dil in enumerate(dilations):
            layers += [nn.Conv2d(c, width, 3, padding=dil, dilation=dil), nn.BatchNorm2d(width), nn.ReLU()]
            c = width
            if i == 0 and stride > 1:
                layers += [nn.Conv2d(width, width, 3, stride=stride, padding=1), nn.BatchNorm2d(width),
                           nn.ReLU()]
        self.stride = stride
        self.body = nn.Sequential(*layers)
        self.head = nn.Identity() if head is None else head(width)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.classifier(self.head(self.body(x)))
        if self.stride > 1:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits


class C2D(nn.Module):
    """Per-frame 2-D convolutions (1x3x3 Conv3d), a space-time block, average pooling over T, H, W and a
    linear classifier; a constant time channel is appended to the input (the frame index in [0, 1]).

    Args:
        block: ``width -> module`` mapping (B, width, T, H/s, W/s) to the same shape, or None for the
            C2D baseline; called after the stem is built.
        width: channels.
        stride: spatial stride of the stem, 2 or 4 (each 2 is a 1x2x2 max-pool followed by a convolution).
        num_classes: output classes.
    """

    def __init__(self, block: Optional[Callable[[int], nn.Module]] = None, width: int = 32,
                 stride: int = 2, num_classes: int = 2):
        super().__init__()
        if stride not in (2, 4):
            raise ValueError(f"stride must be 2 or 4, got {stride!r}")

        def conv(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv3d(cin, cout, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(cout),
                                 nn.ReLU())

        extra = [nn.MaxPool3d((1, 2, 2)), conv(width, width)] if stride == 4 else []
        self.stem = nn.Sequential(conv(2, width), nn.MaxPool3d((1, 2, 2)), conv(width, width), *extra)
        self.nonlocal_block = nn.Identity() if block is None else block(width)
        self.top = conv(width, width)
        self.fc = nn.Linear(width, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """The stem's output (the block's input) for clips (B, 1, T, H, W)."""
        t = torch.linspace(0, 1, x.shape[2], dtype=x.dtype, device=x.device).view(1, 1, -1, 1, 1)
        return self.stem(torch.cat([x, t.expand(x.shape[0], 1, -1, x.shape[3], x.shape[4])], dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.top(self.nonlocal_block(self.features(x))).mean(dim=(2, 3, 4)))


class StepTimer:
    """Wall times of the forward+backward part of training steps (the optimiser update excluded)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def median(self, skip: int = 2) -> Optional[float]:
        """Median step time after ``skip`` warm-up steps (all steps when there are no more)."""
        t = self.times[skip:] if len(self.times) > skip else self.times
        return float(np.median(t)) if t else None


def linear_decay(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate decayed linearly from its initial value to 0 over ``steps`` steps."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int, seed: int, batch: int = 16, lr: float = 3e-3,
          loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, extra: Sequence[nn.Parameter] = (),
          timer: Optional[StepTimer] = None, progress: Optional[Callable[[], None]] = None,
          lr_decay: bool = False) -> None:
    """Adam on random minibatches (drawn with ``torch.manual_seed(seed)``).

    Args:
        model: the network; ``loss_fn(model, inputs, targets)`` defaults to cross-entropy of its output.
        x, y: training inputs and targets.
        steps: optimiser steps.
        seed: seeds torch's global RNG before the first batch (reproducible runs).
        batch: minibatch size.
        lr: Adam's learning rate.
        loss_fn: ``(inputs, targets) -> loss``; default ``cross_entropy(model(inputs), targets)``.
        extra: further parameters to optimise (e.g. a CRF's).
        timer: records each step's forward+backward wall time.
        progress: called after every step (a progress bar's update).
        lr_decay: decay the learning rate linearly from ``lr`` to 0 over the ``steps`` (default: constant).
    """
    torch.manual_seed(seed)
    opt = torch.optim.Adam(list(model.parameters()) + list(extra), lr=lr)
    loss_fn = loss_fn or (lambda inputs, targets: F.cross_entropy(model(inputs), targets))
    sched = linear_decay(opt, steps) if lr_decay else None
    model.train()
    for _ in range(steps):
        i = torch.randint(0, x.shape[0], (batch,))
        start = time.perf_counter()
        loss = loss_fn(x[i], y[i])
        opt.zero_grad()
        loss.backward()
        if timer is not None:
            timer.times.append(time.perf_counter() - start)
        opt.step()
        if sched is not None:
            sched.step()
        if progress is not None:
            progress()
