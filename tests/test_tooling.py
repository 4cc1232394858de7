"""The linter and the type checker pass on the whole tree (configuration: pyproject.toml).

``ruff check .`` (concise: one line per finding) and ``mypy nlgraph crf attention``, run from the
repository root with this interpreter, as a contributor runs them; the failure message is the tool's
own report.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(module: str, *args: str) -> None:
    pytest.importorskip(module, reason=f"{module} (test dependency) not installed")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    report = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, f"{module} {' '.join(args)} exited {proc.returncode}:\n{report}"


def test_ruff_check_is_clean():
    _run("ruff", "check", "--output-format", "concise", ".")


def test_mypy_is_clean():
    _run("mypy", "nlgraph", "crf", "attention")
