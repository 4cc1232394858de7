"""nlgraph: non-local blocks, self-attention and dense-CRF mean-field as one message-passing op.

    y_i = (1 / C_i) sum_{j in N(i)} f(x_i, x_j) g(x_j)

The core op is :func:`nlgraph.aggregate` (with ``return_lse=True`` also log C_i, so results over
disjoint key sets combine exactly with :func:`nlgraph.merge`); affinities (f, C) live in
:mod:`nlgraph.affinity`,
graphs (N(i)) in :mod:`nlgraph.graph`, backends behind one dispatch in :mod:`nlgraph.dispatch`.
"""

from . import affinity, graph
from .affinity import Concatenation, DotProduct, EdgeWeighted, Gaussian, Softmax
from .blocks import (
    CompactNonLocal,
    DisentangledNonLocal,
    GlobalContextBlock,
    LatentGraphBlock,
    NeighborhoodAttention,
    PyramidNonLocal,
)
from .core import aggregate
from .denoise import denoise_nl_means
from .dispatch import BackendError, backend_names, compatible_backends, select_backend
from .merge import merge
from .nonlocal_blocks import NonLocal1d, NonLocal2d, NonLocal3d

__version__ = "0.1.0"

__all__ = [
    "aggregate",
    "merge",
    "denoise_nl_means",
    "affinity",
    "graph",
    "Softmax",
    "Gaussian",
    "DotProduct",
    "Concatenation",
    "EdgeWeighted",
    "NonLocal1d",
    "NonLocal2d",
    "NonLocal3d",
    "GlobalContextBlock",
    "PyramidNonLocal",
    "LatentGraphBlock",
    "CompactNonLocal",
    "DisentangledNonLocal",
    "NeighborhoodAttention",
    "BackendError",
    "backend_names",
    "compatible_backends",
    "select_backend",
]
