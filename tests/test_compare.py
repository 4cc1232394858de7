"""``nlgraph compare``: a reduced run writes every field, seeds reproduce, the statistics and the tasks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nlgraph import cli, compare, tasks

pytest.importorskip("sklearn", reason="scikit-learn (test dependency: the digits) not installed")

FIELDS = {"variant", "label", "task", "f", "C", "graph", "params", "head_params", "accuracy_mean",
          "accuracy_std", "accuracies", "metric", "seeds", "gain_mean", "gain_ci_low", "gain_ci_high",
          "time_s", "time_kind", "peak_mib", "base", "gain_over_base_mean", "gain_over_base_ci_low",
          "gain_over_base_ci_high"}


def test_reduced_compare_writes_every_field(tmp_path, capsys):
    """One tiny training step per variant, two seeds, both tasks: the table, the JSON and the figure."""
    path = tmp_path / "compare.json"
    assert cli.main(["compare", "--tiny", "--seeds", "2", "--no-progress", "--json", str(path),
                     "--out", str(tmp_path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "compare" and doc["preset"] == "tiny" and doc["seeds"] == [0, 1]
    assert doc["duration_s"] > 0 and doc["command"].startswith("nlgraph compare --task all --seeds 2")
    by_task = {t: {r["variant"]: r for r in doc["rows"] if r["task"] == t} for t in compare.TASKS}
    assert set(by_task["segmentation"]) == {v.name for v in compare.VARIANTS}
    assert set(by_task["video"]) == {v.name for v in compare.VARIANTS if "video" in v.tasks}
    for row in doc["rows"]:
        assert FIELDS <= set(row), FIELDS - set(row)
        assert 0.0 <= row["accuracy_mean"] <= 1.0 and row["accuracy_std"] >= 0.0
        assert len(row["accuracies"]) == 2 and row["seeds"] == [0, 1]
        assert row["accuracy_mean"] == pytest.approx(sum(row["accuracies"]) / 2)
        assert row["params"] > 0 and row["time_s"] > 0
        assert row["peak_mib"] is not None and row["peak_mib"] > 0  # measured in a forked process
        local = by_task[row["task"]]["local"]["accuracies"]
        gains = [a - b for a, b in zip(row["accuracies"], local, strict=True)]
        assert row["gain_mean"] == pytest.approx(sum(gains) / 2)
        assert row["gain_ci_low"] <= row["gain_mean"] <= row["gain_ci_high"]
        assert (row["base"] is not None) == row["variant"].startswith("crf")
    seg = by_task["segmentation"]
    assert seg["local"]["head_params"] == 0 and seg["gcnet"]["head_params"] > 0
    assert seg["crf"]["params"] == seg[seg["crf"]["base"]]["params"]  # post-processing adds no parameter
    # + the kernel weights, the compatibility and the three log-bandwidths
    assert seg["crf-rnn"]["params"] == seg["crf"]["params"] + 2 + tasks.NUM_CLASSES ** 2 + 3
    out = capsys.readouterr().out
    assert out.count("| variant | f | C | graph | params |") == 2
    if "figure skipped" not in out:
        assert (tmp_path / "compare.png").stat().st_size > 20_000


def test_seeds_make_runs_reproducible():
    kw = dict(variant_names=["nl-dot", "gcnet"], seeds=2, preset="tiny", memory=False, progress=False,
              log=lambda line: None, steps=2)
    first = compare.run(["segmentation", "video"], **kw)
    second = compare.run(["segmentation", "video"], **kw)
    accs = lambda doc: [(r["task"], r["variant"], r["accuracies"]) for r in doc["rows"]]  # noqa: E731
    assert accs(first) == accs(second)
    assert [r["variant"] for r in first["rows"] if r["task"] == "video"] == ["local", "nl-dot", "gcnet"]


def test_bad_options(capsys):
    assert cli.main(["compare", "--tiny", "--variants", "nl-dot", "no-such-variant", "--no-memory"]) == 2
    assert "unknown variant(s) ['no-such-variant']; available: local, nl-gaussian" in capsys.readouterr().err
    assert cli.main(["compare", "--tiny", "--seeds", "0"]) == 2
    assert "--seeds, --threads and --steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compare", "--task", "audio"])
    with pytest.raises(ValueError, match="preset must be one of"):
        compare.run(["video"], preset="huge")


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 10, 30):
        for p in (0.9, 0.975, 0.995):
            assert compare.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_paired_interval():
    mean, lo, hi = compare.paired_interval([0.5, 0.7, 0.9], [0.2, 0.3, 0.4])  # differences 0.3, 0.4, 0.5
    half = compare.t_quantile(0.975, 2) * 0.1 / math.sqrt(3)
    assert (mean, lo, hi) == pytest.approx((0.4, 0.4 - half, 0.4 + half))
    assert compare.paired_interval([0.5], [0.25]) == (0.25, None, None)


@pytest.mark.parametrize("dilations,stride", [((1, 2, 4), 1), ((1, 1), 2), ((2, 1, 3), 2)])
def test_receptive_field_is_the_gradient_support(dilations, stride):
    """The body's output at one position depends on exactly receptive_field() input pixels per axis."""
    net = tasks.SegNet(None, width=4, dilations=dilations, stride=stride).double().eval()  # no batch stats
    x = torch.randn(1, 1, 64, 64, dtype=torch.float64, requires_grad=True)
    feats = net.body(x)
    feats[0, :, feats.shape[2] // 2, feats.shape[3] // 2].sum().backward()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(1))
    assert int(rows.max() - rows.min()) + 1 == tasks.receptive_field(dilations, stride)


@pytest.mark.parametrize("preset", ["full", "quick"])
def test_no_receptive_field_sees_both_digits(preset):
    """The local CNN cannot see the clean digit from the corrupted one: its receptive field (plus the
    bilinear upsampling's reach) is smaller than the gap between the two digits."""
    cfg = compare.PRESETS[preset]["segmentation"]
    reach = (tasks.receptive_field(cfg.dilations, cfg.stride) - 1) // 2 + cfg.stride
    gap = cfg.data["separation"] - 8 * cfg.data["scale"]
    assert reach < gap + 1
    _, y = tasks.digit_scenes(50, seed=3, **cfg.data)
    for labels in y:
        # link labelled pixels closer than the reach (Chebyshev); the two digits stay apart
        pts = torch.nonzero(labels)
        near = (pts[:, None, :] - pts[None, :, :]).abs().amax(-1) <= reach
        group = {0}
        while True:
            grown = set(torch.nonzero(near[sorted(group)].any(0)).flatten().tolist())
            if grown == group:
                break
            group = grown
        assert len(group) < len(pts)


def test_tasks_are_generated_reproducibly():
    x1, y1 = tasks.digit_scenes(6, seed=5, size=32, scale=1, separation=16)
    x2, y2 = tasks.digit_scenes(6, seed=5, size=32, scale=1, separation=16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (6, 1, 32, 32) and y1.shape == (6, 32, 32)
    assert 0 <= float(x1.min()) <= float(x1.max()) <= 1
    assert all(len(set(torch.unique(lab).tolist()) - {0}) == 1 for lab in y1)  # one class per scene
    clips, labels = tasks.moving_digit_clips(40, seed=2, frames=4, size=28)
    again = tasks.moving_digit_clips(40, seed=2, frames=4, size=28)
    assert torch.equal(clips, again[0]) and torch.equal(labels, again[1])
    assert clips.shape == (40, 1, 4, 28, 28) and 5 < int(labels.sum()) < 35
    two, _ = tasks.moving_digit_clips(40, seed=2, frames=4, size=28, classes=(0, 1))
    assert two.shape == clips.shape and not torch.equal(two, clips)
    with pytest.raises(ValueError, match="classes must hold at least two distinct digits 0-9"):
        tasks.moving_digit_clips(4, seed=0, classes=(3, 3))
    with pytest.raises(ValueError, match="cannot hold two 16-px digits 20 px apart"):
        tasks.digit_scenes(1, seed=0, size=30, scale=2, separation=20)
    with pytest.raises(ValueError, match="stride must be 2 or 4"):
        tasks.C2D(None, 8, stride=3)
