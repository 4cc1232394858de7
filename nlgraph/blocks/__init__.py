"""The efficient non-local family, each block one configuration (f, C, graph) of the one op.

=========================  ========================================  ========  ==========================
block                      f                                         C         graph
=========================  ========================================  ========  ==========================
``GlobalContextBlock``     exp(w_k . x_j), query-independent         sum_j f   1 context node <- N nodes
``PyramidNonLocal``        exp(q_i . k_m / sqrt(d))                  sum_m f   N -> M pyramid cells
``LatentGraphBlock``       psi_k(x_i); softmax(cos) among latents    1; sum f  N -> K -> K -> N (K << N)
``CompactNonLocal``        Taylor-expanded Gaussian of scalars       1         all (channel, position)
``DisentangledNonLocal``   whitened exp(q_i . k_j) + exp(w_m . x_j)  sum_j f   complete + 1 unary node
``NeighborhoodAttention``  exp(q_i . k_j / sqrt(d_h))                sum_j f   local window
=========================  ========================================  ========  ==========================

Every aggregation is a call of :func:`nlgraph.aggregate`; ``module.backend`` switches its backend.
"""

from .compact import CompactNonLocal
from .disentangled import DisentangledNonLocal
from .global_context import GlobalContextBlock
from .latent import LatentGraphBlock
from .pyramid import PyramidNonLocal
from .window import NeighborhoodAttention

__all__ = [
    "GlobalContextBlock",
    "PyramidNonLocal",
    "LatentGraphBlock",
    "CompactNonLocal",
    "DisentangledNonLocal",
    "NeighborhoodAttention",
]
