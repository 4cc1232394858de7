"""Node layout on grids: row-major coordinates, grid-shape checks and :func:`blocked_order`."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["blocked_order", "grid_coords", "check_grid_shape"]


def grid_coords(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """(prod(shape), D) row-major grid coordinates of every node (int64)."""
    axes = [torch.arange(s, device=device) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


def check_grid_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` as 1 to 3 positive ints; ValueError naming ``name(shape)`` otherwise."""
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(shape)
    if not 1 <= len(shape) <= 3 or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"{name}(shape) must be 1 to 3 positive ints, got {shape}")
    return shape


def blocked_order(shape: Sequence[int], block: int) -> Tensor:
    """A node order that lays a grid out in blocks of ``block`` per axis (row-major within and across).

    Tiles of a tiled backend then cover compact regions, so a local-window graph leaves most tiles
    empty (skipped) instead of spanning whole image rows. Returns the row-major grid index of each node.
    """
    shape = check_grid_shape("blocked_order", shape)
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"blocked_order(block) must be a positive int, got {block!r}")
    coords = grid_coords(shape, torch.device("cpu"))
    key = torch.zeros(coords.shape[0], dtype=torch.long)
    nblocks = [math.ceil(s / block) for s in shape]
    for c, nb in zip(coords.unbind(-1), nblocks, strict=True):  # block index, row-major over blocks
        key = key * nb + c // block
    for c in coords.unbind(-1):  # then position within the block
        key = key * block + c % block
    return torch.argsort(key)
