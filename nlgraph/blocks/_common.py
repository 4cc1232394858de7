"""Plumbing the family modules share: input checks, the token layout, the zero-initialised output.

Every module of :mod:`nlgraph.blocks` takes feature maps of any of the layouts (B, C, L), (B, C, H, W)
and (B, C, T, H, W), works on the flattened positions (B, C, N) with pointwise (1x1) convolutions,
and hands (B, N, d) token matrices to :func:`nlgraph.aggregate`.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["LAYOUTS", "check_features", "positive_int", "inter_width", "tokens", "ZeroInitOutput"]

LAYOUTS = "(B, C, L), (B, C, H, W) or (B, C, T, H, W)"


def positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1, or a ValueError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def inter_width(in_channels: int, inter_channels: object, divisor: int) -> int:
    """``inter_channels`` checked, or max(1, in_channels // divisor) when it is None."""
    if inter_channels is None:
        return max(1, in_channels // divisor)
    return positive_int("inter_channels", inter_channels)


def check_features(x: object, in_channels: int) -> None:
    """A float feature map of one of :data:`LAYOUTS` with ``in_channels`` channels, or a clear error."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.dim() not in (3, 4, 5) or x.shape[1] != in_channels:
        raise ValueError(f"x must have shape {LAYOUTS} with C = {in_channels}, got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")


def tokens(flat: Tensor) -> Tensor:
    """(B, C, N) channel-major positions -> (B, N, C) token matrix (a view)."""
    return flat.transpose(1, 2)


class ZeroInitOutput(nn.Module):
    """``BN(W y)``: a pointwise convolution d -> C followed by BatchNorm with zero scale and shift.

    The output is exactly zero at initialisation, so ``x + ZeroInitOutput(y)`` starts as the identity
    (Wang et al. 2018, sec. 3.3: the residual non-local design).

    Args:
        inter_channels: d, the width of the aggregated messages.
        out_channels: C, the width of the feature map the output is added to.
    """

    def __init__(self, inter_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv1d(inter_channels, out_channels, 1)
        self.bn = nn.BatchNorm1d(out_channels)
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, y: Tensor) -> Tensor:
        """(B, d, N) -> (B, C, N)."""
        return self.bn(self.conv(y))
