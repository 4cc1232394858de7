"""Sphinx configuration of nlgraph's API reference (generated from the docstrings).

Build: ``python -m sphinx -W -b html docs docs/_build/html`` from the repository root (the test
``tests/test_docs.py`` builds it the same way into a temporary folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # document this checkout, installed or not

import nlgraph  # noqa: E402  (after the path: the checkout's nlgraph)

project = "nlgraph"
author = "nlgraph contributors"
copyright = "nlgraph contributors"
release = version = nlgraph.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]

# Google-style ``Args:`` / ``Returns:`` / ``Raises:`` sections (conventions.md)
napoleon_google_docstring = True
napoleon_numpy_docstring = False

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# optional packages imported lazily by some modules: never needed to document them
autodoc_mock_imports = ["triton", "torch_geometric", "pydensecrf", "skimage", "matplotlib", "tqdm"]

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
