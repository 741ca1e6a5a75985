"""PositionBiasMonitor and `wpkl audit`: table values against hand-computed ones, persistence, plots."""

import math
import subprocess
import sys

import pytest
import torch

import wpkl
from wpkl.audit import PositionBiasMonitor, bucket_of
from wpkl.stats import TokenStats


def _stats(position, divergence, weight, confidence, mask=None):
    position = torch.tensor(position, dtype=torch.float32)
    ones = torch.ones_like(position)
    return TokenStats(
        divergence=torch.tensor(divergence, dtype=torch.float32), weight=torch.tensor(weight, dtype=torch.float32),
        teacher_confidence=torch.tensor(confidence, dtype=torch.float32), teacher_entropy=2 * ones,
        student_entropy=3 * ones, position=position,
        mask=torch.ones_like(position, dtype=torch.bool) if mask is None else torch.tensor(mask))


def test_buckets_are_log_spaced():
    pos = torch.tensor([0, 1, 2, 3, 4, 7, 8, 15, 16, 1000])
    assert bucket_of(pos, 6).tolist() == [0, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_table_matches_hand_computation():
    monitor = PositionBiasMonitor(num_buckets=4)
    # step 1: positions 0, 1, 2, 3 (the last masked out), step 2: positions 0 and 5 (5 lands in the last bucket)
    monitor.update(_stats([0, 1, 2, 3], [1.0, 2.0, 3.0, 100.0], [1.0, 0.5, 2.0, 9.0], [0.9, 0.8, 0.7, 0.1],
                          mask=[True, True, True, False]))
    monitor.update(_stats([0, 5], [0.5, 4.0], [2.0, 1.0], [0.5, math.nan]))
    rows = {r["bucket"]: r for r in monitor.summary()}
    assert sorted(rows) == [0, 1, 2, 3]
    # bucket 0: D = 1.0, 0.5; w = 1, 2; conf = .9, .5
    assert rows[0]["tokens"] == 2
    assert rows[0]["mean_divergence"] == pytest.approx(0.75)
    assert rows[0]["mean_weight"] == pytest.approx(1.5)
    assert rows[0]["teacher_confidence"] == pytest.approx(0.7)
    # bucket 3 holds position 5 only, whose confidence is unknown (NaN): no confidence mean, other columns fine
    assert rows[3]["tokens"] == 1 and math.isnan(rows[3]["teacher_confidence"])
    assert rows[3]["student_entropy"] == pytest.approx(3.0)
    # loss shares: uniform sum D = 1 + 2 + 3 + 0.5 + 4 = 10.5; weighted sum w D = 1 + 1 + 6 + 1 + 4 = 13
    assert rows[0]["share_uniform"] == pytest.approx(1.5 / 10.5)
    assert rows[2]["share_uniform"] == pytest.approx(3.0 / 10.5)
    assert rows[0]["share_weighted"] == pytest.approx(2.0 / 13)
    assert rows[2]["share_weighted"] == pytest.approx(6.0 / 13)
    assert sum(r["share_weighted"] for r in rows.values()) == pytest.approx(1.0)
    table = monitor.format_table()
    assert "[0, 1)" in table and "[4, inf)" in table and "14.3%" in table
    # Bucket widths: 1, 1, 2, then the last bucket [4, inf) up to the largest position seen, 5: two positions.
    assert [rows[b]["width"] for b in range(4)] == [1.0, 1.0, 2.0, 2.0]
    steps, heat = monitor.heatmap()
    assert steps == [0, 1] and heat.shape == (2, 4)
    assert heat[0, 2].item() == pytest.approx(3.0) and math.isnan(heat[1, 1].item())


def test_save_load_roundtrip_and_real_stats(tmp_path):
    student, teacher = torch.randn(3, 12, 20), torch.randn(3, 12, 20)
    mask = torch.rand(3, 12) < 0.8
    monitor = PositionBiasMonitor()
    for step in range(3):
        _, stats = wpkl.weighted_kl_loss(student, teacher, mask=mask, return_stats=True,
                                         weighting=wpkl.Weighting(accumulated=0.5))
        monitor.update(stats, step=10 * step)
    path = monitor.save(tmp_path / "run" / "position_bias.pt")
    loaded = PositionBiasMonitor.load(path)
    assert loaded.summary() == monitor.summary()
    assert loaded.heatmap()[0] == [0, 10, 20]
    assert sum(r["tokens"] for r in loaded.summary()) == 3 * int(mask.sum())


def test_cli_prints_table_and_writes_plots(tmp_path):
    pytest.importorskip("matplotlib")
    monitor = PositionBiasMonitor(num_buckets=6)
    for step in range(4):
        monitor.update(_stats(list(range(20)), [1.0 + 0.1 * i for i in range(20)], [1.0] * 20, [0.5] * 20), step)
    monitor.save(tmp_path / "position_bias.pt")
    result = subprocess.run([sys.executable, "-m", "wpkl.cli", "audit", str(tmp_path / "position_bias.pt"),
                             "--out", str(tmp_path / "plots")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "share (weighted)" in result.stdout and "[16, inf)" in result.stdout
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["divergence_by_position.png", "divergence_heatmap.png", "loss_share_by_position.png"]


def test_cli_without_matplotlib_still_prints(tmp_path, monkeypatch, capsys):
    from wpkl import cli

    monitor = PositionBiasMonitor()
    monitor.update(_stats([0, 1, 2], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]))
    monitor.save(tmp_path / "position_bias.pt")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert cli.main(["audit", str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
    captured = capsys.readouterr()
    assert "[0, 1)" in captured.out and "matplotlib is not installed" in captured.err
    assert not (tmp_path / "plots").exists()


def test_cli_reports_missing_runs(tmp_path, capsys):
    from wpkl import cli

    assert cli.main(["audit", str(tmp_path)]) == 2
    assert cli.main(["audit", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no position_bias.pt" in err[0] and "does not exist" in err[1]


def test_cli_rejects_a_file_that_is_not_an_audit(tmp_path):
    """A results.json (or any other file) is named as such in one line, exit code 2, no traceback."""
    bad = tmp_path / "results.json"
    bad.write_text('{"runs": []}')
    result = subprocess.run([sys.executable, "-m", "wpkl.cli", "audit", str(bad)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"wpkl audit: error: {bad} is not a saved PositionBiasMonitor (PositionBiasMonitor.save writes one): "
        "UnpicklingError"], result.stderr


def test_micro_batches_of_one_step_make_one_column():
    """update(stats, step) once per micro-batch: one heatmap column per step, summed over its micro-batches."""
    monitor = PositionBiasMonitor(num_buckets=4)
    monitor.update(_stats([0, 1], [1.0, 2.0], [1.0, 1.0], [0.5, 0.5]), step=7)
    monitor.update(_stats([0, 1], [3.0, 6.0], [1.0, 1.0], [0.5, 0.5]), step=7)
    monitor.update(_stats([0], [5.0], [1.0], [0.5]), step=8)
    monitor.update(_stats([0], [1.0], [1.0], [0.5]))  # no step: the next one
    steps, heat = monitor.heatmap()
    assert steps == [7, 8, 9]
    assert heat[0, 0].item() == pytest.approx(2.0) and heat[0, 1].item() == pytest.approx(4.0)
    assert heat[1, 0].item() == pytest.approx(5.0) and heat[2, 0].item() == pytest.approx(1.0)


def test_loss_share_plot_is_per_position(tmp_path, monkeypatch):
    """The plotted bars are bucket share / bucket width: a uniform loss gives equal bars at every position."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    bars = []
    original = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, x, h, *a, **k: bars.append(list(h)) or
                        original(self, x, h, *a, **k))
    monitor = PositionBiasMonitor(num_buckets=5)
    positions = list(range(12))
    monitor.update(_stats(positions, [1.0] * 12, [1.0] * 12, [0.5] * 12))
    from wpkl.audit import plot

    plot(monitor, tmp_path)
    uniform, weighted = bars
    assert uniform == pytest.approx([100 / 12] * 5) and weighted == pytest.approx([100 / 12] * 5)
