"""Session set-up shared by the tests.

Without a CUDA GPU, Triton kernels run in Triton's interpreter on the CPU. Triton binds that mode
when it is imported, so the variable is set here, before any test imports it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
