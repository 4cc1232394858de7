"""When may code read tensor values on the host? Not while a graph is traced, nor inside vmap.

Eager validation is thorough (NaN/Inf scans, range checks, empty-tile skipping); each of those reads
values on the host (a sync, a data-dependent branch). Under ``torch.compile`` / ``torch.export``
such a branch would break the graph (``fullgraph=True`` and export refuse it), and inside
``torch.func.vmap`` a batched tensor has no single value to branch on. There the data-dependent
checks step aside and the traced code computes the same result without them.
"""

from __future__ import annotations

import torch
from torch._C._functorch import TransformType, get_interpreter_stack

__all__ = ["values_readable"]


def values_readable() -> bool:
    """False while torch.compile / torch.export trace the code or inside ``torch.func.vmap``; else True."""
    if torch.compiler.is_compiling():
        return False
    stack = get_interpreter_stack()
    return not stack or all(level.key() != TransformType.Vmap for level in stack)
