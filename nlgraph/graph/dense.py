"""Dense masks: SDPA's ``attn_mask`` (:class:`Mask`) and ``is_causal`` (:class:`Causal`)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._shapes import slice_rows_cols
from .._values import checking_values, no_nan_or_posinf
from .base import Graph

__all__ = ["Mask", "Causal"]


class Mask(Graph):
    """A dense mask with the semantics of SDPA's ``attn_mask``.

    Args:
        mask: bool (..., N, M) (broadcastable; True = edge, as in
            :func:`torch.nn.functional.scaled_dot_product_attention`) or float (..., N, M): an
            additive log-weight on the scores (-inf removes the edge), which receives gradients.
            For the count-normalised affinities a float mask b weights edges by exp(b). The
            caller's tensor: every call reads (and checks) its current values.
    """

    def __init__(self, mask: Tensor):
        if not isinstance(mask, Tensor):
            raise TypeError(f"Mask(mask) must be a tensor, got {type(mask).__name__}")
        if mask.dim() < 2:
            raise ValueError(f"Mask(mask) must have at least 2 dims (..., N, M), got shape "
                             f"{tuple(mask.shape)}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"Mask(mask) must be bool or floating point, got {mask.dtype}")
        self.mask = mask  # the caller's tensor: read (and re-checked) at every call
        if checking_values():
            self._check_entries()

    def _check_entries(self) -> None:
        if self.mask.is_floating_point() and not no_nan_or_posinf(self.mask):
            raise ValueError(f"Mask(mask) float entries must be finite or -inf (no NaN, no +inf); the mask "
                             f"of shape {tuple(self.mask.shape)} has one")

    def check_values(self, n, m):
        self._check_entries()

    def tensors(self):
        return (self.mask,) if self.mask.is_floating_point() else ()

    def validate(self, n, m, device):
        rows, cols = self.mask.shape[-2:]
        if rows not in (1, n) or cols not in (1, m):
            raise ValueError(
                f"Mask(mask) has shape {tuple(self.mask.shape)}; its last two dims must be (N, M) = "
                f"({n}, {m}) or broadcast to them"
            )
        if self.mask.device != device:
            raise ValueError(f"Mask(mask) is on {self.mask.device} but the inputs are on {device}")

    @property
    def lead_shape(self):
        return tuple(self.mask.shape[:-2])

    def block(self, i0, i1, j0, j1, device):
        if self.mask.dtype != torch.bool:
            return None  # float masks live in dense_bias()
        return slice_rows_cols(self.mask, i0, i1, j0, j1)

    def dense_bias(self):
        return self.mask if self.mask.is_floating_point() else None

    @property
    def attn_mask(self):
        return self.mask

    def __repr__(self) -> str:
        return f"Mask({self.mask.dtype}, shape={tuple(self.mask.shape)})"



class Causal(Graph):
    """Query i sees keys j <= i: the causal mask of SDPA's ``is_causal=True``, top-left aligned.

    For N queries and M keys the edge set is ``torch.ones(N, M, dtype=torch.bool).tril()`` (as
    :func:`torch.nn.functional.scaled_dot_product_attention` builds it, also when N != M), so every
    query keeps key 0. Tiles above the diagonal hold no edge and tiled backends skip them.
    """

    causal = True

    def block(self, i0, i1, j0, j1, device):
        if j1 - 1 <= i0:
            return None  # every key of the tile is at or before every query of it
        i = torch.arange(i0, i1, device=device)
        j = torch.arange(j0, j1, device=device)
        return i[:, None] >= j[None, :]

    def tile_pairs(self, row_tiles, col_tiles, device):
        last = torch.tensor([b - 1 for _, b in row_tiles], device=device)
        first = torch.tensor([a for a, _ in col_tiles], device=device)
        return first[None, :] <= last[:, None]

    def __repr__(self) -> str:
        return "Causal()"
