"""Compute backends, each a module of its own; all compute the same core op.

Registration order is the automatic priority: exact closed forms first (algebra), then torch's own
attention kernels (sdpa: no case overlaps algebra's; on CUDA it defers wide heads, which SDPA's fused
kernels refuse, to triton), then the fused Triton kernels (CUDA), then the approximate lattice, the
grid path and the edge-list path (each only where its ``prefer`` hook says it pays off), then the
tiled PyTorch path, then the materialising oracle. Adding a backend = one new module + one line here.
"""

from ..dispatch import register

register("algebra", "nlgraph.backends.algebra")
register("sdpa", "nlgraph.backends.sdpa")
register("triton", "nlgraph.backends.triton")
register("permutohedral", "nlgraph.backends.permutohedral")
register("grid", "nlgraph.backends.grid")
register("pyg", "nlgraph.backends.pyg")
register("chunked", "nlgraph.backends.chunked")
register("reference", "nlgraph.backends.reference")
