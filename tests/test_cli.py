"""The command line: demo passes, bench writes the documented JSON, bad options are one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from nlgraph import cli


def test_demo_passes(capsys, tmp_path):
    figure = tmp_path / "demo.png"
    assert cli.main(["demo", "--out", str(figure)]) == 0
    out = capsys.readouterr().out
    if "figure skipped" not in out:
        assert figure.exists() and figure.stat().st_size > 50_000
        before, after = map(float, re.search(r"label accuracy ([\d.]+) -> ([\d.]+)", out).groups())
        assert after > before + 0.1
    assert " NO" not in out
    held, ran, skipped = map(int, re.search(r"(\d+)/(\d+) equivalences hold.*, (\d+) skipped", out).groups())
    assert held == ran >= 9 and ran + skipped == 12


def test_bench_core_quick_writes_json(tmp_path, capsys):
    path = tmp_path / "core.json"
    assert cli.main(["bench", "core", "--quick", "--repeats", "1", "--no-memory", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["benchmark"] == "core" and data["rows"]
    for row in data["rows"]:
        assert {"name", "ours_s", "peer", "peer_s", "ratio"} <= set(row)
        assert row["ours_s"] > 0 and row["peer_s"] > 0
        assert row["ratio"] == pytest.approx(row["ours_s"] / row["peer_s"])
    assert "| case | peer |" in capsys.readouterr().out


@pytest.mark.parametrize("name,extra", [("nonlocal", ["--no-memory"]), ("crf", []),
                                        ("grid", ["--no-memory"])])
def test_other_benchmarks_quick(name, extra, tmp_path):
    if name == "crf":
        pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (test dependency) not installed")
        pytest.importorskip("skimage.data", reason="scikit-image (test dependency) not installed")
    path = tmp_path / f"{name}.json"
    assert cli.main(["bench", name, "--quick", "--repeats", "1", *extra, "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    # a peer that cannot run here (not installed, no compiled extension) is a row that says why
    skipped = [r for r in rows if "skipped" in r]
    assert all(r["skipped"] and {"name", "peer"} <= set(r) for r in skipped)
    rows = [r for r in rows if "skipped" not in r]
    assert rows and all({"name", "ours_s", "peer", "peer_s", "ratio"} <= set(r) for r in rows)
    if name == "crf":
        assert {r["peer"] for r in skipped} <= {"SimpleCRF denseCRF3D", "MONAI CRF"}
        # SimpleCRF's 3-D CRF is another implementation of the model (its labels differ from
        # pydensecrf's too): there ours is checked against pydensecrf on the same uint8 input
        simple = [r for r in rows if r["peer"].startswith("SimpleCRF")]
        assert all(r["agreement_ours_pydensecrf"] >= 0.98 for r in simple)
        agreeing = [r for r in rows if "agreement" in r and r not in simple]  # stage rows: times only
        assert len(agreeing) >= 10 and all(r["agreement"] >= 0.98 for r in agreeing)
        cold = [r for r in rows if r["name"].endswith("cold") and "agreement" in r]
        assert cold and all(r["ours_page_faults"] >= 0 and r["peer_page_faults"] >= 0 for r in cold)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="measures on the GPU when one is present")
def test_bench_triton_without_gpu_says_so_and_exits_0(capsys):
    assert cli.main(["bench", "triton"]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_unknown_benchmark_is_a_one_line_error(capsys):
    assert cli.main(["bench", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown benchmark 'nope'" in err


@pytest.mark.parametrize("argv", [["--bogus"], ["demo", "--seed", "x"], ["frobnicate"],
                                  ["bench", "core", "--threads", "0"]])
def test_bad_options_exit_2_without_traceback(argv):
    proc = subprocess.run([sys.executable, "-m", "nlgraph.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["bench", "--help"], ["info", "--help"],
                                  ["bench", "core", "--help"]])
def test_help(argv):
    proc = subprocess.run([sys.executable, "-m", "nlgraph.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage:" in proc.stdout


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "chunked" in out and "reference" in out and "algebra" in out


def test_time_pair_alternates_and_returns_each_median():
    from nlgraph.bench import harness

    calls = []
    t_a, t_b = harness.time_pair(lambda: calls.append("a"), lambda: calls.append("b"), repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4 and t_a >= 0 and t_b >= 0


def test_print_table_escapes_pipes_so_each_row_keeps_its_columns(capsys):
    from nlgraph.bench import harness

    harness.print_table("t", [{"name": "a|b", "d": 7.15e-7, "ratio": 0.5}],
                        [("name", "case"), ("d", "max |dQ|"), ("ratio", "ours/peer")])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("|")]
    assert lines[0] == "| case | max \\|dQ\\| | ours/peer |"
    assert lines[2] == "| a\\|b | 7.15e-07 | 0.50 |"
    # every line splits into the same number of cells once escaped pipes are ignored
    assert len({ln.replace("\\|", "").count("|") for ln in lines}) == 1
