"""Dense CRF inference on nlgraph's core op.

``crf.DenseCRF`` is differentiable mean-field (Krähenbühl and Koltun 2011; CRF-as-RNN, Zheng et al.
2015) whose message is ``nlgraph.aggregate`` with a Gaussian affinity, C = 1 and no self edge.
``crf.densecrf`` and ``crf.utils`` are drop-in replacements for ``pydensecrf.densecrf`` and
``pydensecrf.utils`` (``import crf.densecrf as dcrf``).
"""

from .dense_crf import DenseCRF, crf_features

__all__ = ["DenseCRF", "crf_features"]
