"""Session set-up shared by the tests.

Without a CUDA GPU, Triton kernels run in Triton's interpreter on the CPU. Triton binds that mode
when it is imported, so the variable is set here, before any test imports it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture
def dispatched(monkeypatch):
    """A list of (backend name, affinity class name) for each call the core op dispatched: the registry walk
    (``select_backend``) and the dispatch's shortcut for plain softmax attention (``fast_softmax``, which
    answers for the ``sdpa`` backend)."""
    import nlgraph
    from nlgraph import affinity as A
    from nlgraph import dispatch

    seen: list[tuple[str, str]] = []
    real, real_fast = dispatch.select_backend, dispatch.fast_softmax

    def spy(*args, **kw):
        name, rec = real(*args, **kw)
        seen.append((name, type(args[3]).__name__))
        return name, rec

    def spy_fast(*args, **kw):
        y = real_fast(*args, **kw)
        if y is not None:
            seen.append(("sdpa", A.Softmax.__name__))
        return y

    monkeypatch.setattr(nlgraph.core, "select_backend", spy)
    monkeypatch.setattr(nlgraph.core, "fast_softmax", spy_fast)
    return seen
