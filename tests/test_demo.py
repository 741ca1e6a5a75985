"""`wpkl demo` end to end at tiny settings (the running-sum task and the HMM language), and the synthetic
language's exact likelihoods."""

import json
import subprocess
import sys

import pytest
import torch

from wpkl.demo.language import HiddenModeLanguage


def test_language_likelihood_is_exact():
    lang = HiddenModeLanguage(vocab=12, modes=2, states=2, shared_tokens=4, seed=3)
    tokens = lang.sample(5, 4, torch.Generator().manual_seed(0))
    # Brute force: sum over every hidden path.
    import itertools

    S = lang.modes * lang.states
    for b in range(5):
        total = []
        for path in itertools.product(range(S), repeat=4):
            lp = lang.log_initial[path[0]] + sum(lang.log_emission[path[t], tokens[b, t]] for t in range(4))
            lp = lp + sum(lang.log_transition[path[t - 1], path[t]] for t in range(1, 4))
            total.append(lp)
        expected = torch.logsumexp(torch.stack(total), 0)
        assert lang.log_prob_prefixes(tokens[b:b + 1])[0, -1].item() == pytest.approx(expected.item(), abs=1e-4)


def test_modes_persist():
    """A continuation in another mode's private tokens is far less likely than one in its own."""
    lang = HiddenModeLanguage(seed=0)
    seq = lang.sample(64, 30, torch.Generator().manual_seed(1))
    assert lang.continuation_log_likelihood(seq, 6).mean() > -3.5


@pytest.mark.slow
def test_hmm_demo_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "wpkl.cli", "demo", "--task", "hmm", "--steps", "6",
                             "--teacher-steps", "20",
                             "--seeds", "2", "--weighting", "uniform,last30,iw_opd", "--out", str(out),
                             "--no-progress"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for name in ("uniform", "last30", "iw_opd"):
        assert f"| {name} |" in summary
    data = json.loads((out / "results.json").read_text())
    assert len(data["runs"]) == 6 and all(len(r["curve"]) == 2 for r in data["runs"])
    assert {r["weighting"] for r in data["summary"]} == {"uniform", "last30", "iw_opd"}
    assert (out / "curves.png").stat().st_size > 10_000
    assert sorted(p.name for p in (out / "audit" / "iw_opd").glob("*.png")) == [
        "divergence_by_position.png", "divergence_heatmap.png", "loss_share_by_position.png"]
    # Same seed, same start: every weighting begins from the same student.
    starts = {r["curve"][0]["kl"] for r in data["runs"] if r["seed"] == 0}
    assert len(starts) == 1
    # The demo's monitors feed `wpkl audit`.
    audit = subprocess.run([sys.executable, "-m", "wpkl.cli", "audit", str(out / "runs"), "--out",
                            str(tmp_path / "audit")], capture_output=True, text=True, timeout=300)
    assert audit.returncode == 0, audit.stderr[-2000:]
    assert audit.stdout.count("share (weighted)") == 6


@pytest.mark.slow
def test_sums_demo_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "wpkl.cli", "demo", "--steps", "4", "--teacher-steps", "30",
                             "--warmup-steps", "30", "--eval-prompts", "16", "--seeds", "2", "--teacher", "cons,rec",
                             "--weighting", "uniform,oracle", "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for teacher in ("cons", "rec"):
        for name in ("uniform", "oracle"):
            assert f"| {teacher} | {name} |" in summary
    assert "Δ AUC sampled vs uniform [95% CI]" in summary and "p (Holm)" in summary
    data = json.loads((out / "results.json").read_text())
    assert len(data["runs"]) == 8 and all([p["step"] for p in r["curve"]] == [0, 4] for r in data["runs"])
    assert {(c["teacher"], c["weighting"]) for c in data["comparisons"]} == {
        (t, "oracle") for t in ("cons", "rec")}
    runs = {(r["teacher"], r["name"], r["seed"]): r for r in data["runs"]}
    for seed in (0, 1):
        # Every run of a seed starts from the same student; the oracle trains only on tokens where cons and rec
        # agree, so its two runs coincide (its KL differs: it is measured against each run's own teacher).
        assert len({runs[(t, w, seed)]["curve"][0]["sampled"] for t in ("cons", "rec") for w in
                    ("uniform", "oracle")}) == 1
        oracle = [[(p["greedy"], p["sampled"], p["step_error"]) for p in runs[(t, "oracle", seed)]["curve"]]
                  for t in ("cons", "rec")]
        assert oracle[0] == oracle[1]
    for name in ("curves.png", "differences.png", "positions.png"):
        assert (out / name).stat().st_size > 10_000
    assert sorted(p.name for p in (out / "audit" / "rec" / "oracle").glob("*.png")) == [
        "divergence_by_position.png", "divergence_heatmap.png", "loss_share_by_position.png"]
    audit = subprocess.run([sys.executable, "-m", "wpkl.cli", "audit", str(out / "runs")], capture_output=True,
                           text=True, timeout=300)
    assert audit.returncode == 0, audit.stderr[-2000:]
    assert audit.stdout.count("share (weighted)") == 8


def test_sums_report_pairs_the_arms_with_iw_opd():
    """The report's second table: each arm's paired difference to the IW-OPD arm, computed per seed (the stored
    variants run of docs/experiments), checked against the differences taken here."""
    from pathlib import Path

    from wpkl.demo.sums_report import iw_opd_baseline, iw_opd_lines, summary_markdown

    results = json.loads((Path(__file__).parent.parent / "docs/experiments/variants-reverse_kl-results.json")
                         .read_text())
    assert iw_opd_baseline(results) == "iw_opd_0.5"
    lines = iw_opd_lines(results)
    auc = {(r["teacher"], r["name"], r["seed"]): r["auc_sampled"] for r in results["runs"]}
    seeds = results["config"]["seeds"]
    for teacher in results["config"]["teachers"]:
        for name in ("uniform", "mopd", "tip"):
            diffs = [auc[(teacher, name, s)] - auc[(teacher, "iw_opd_0.5", s)] for s in seeds]
            row = next(line for line in lines if line.startswith(f"| {teacher} | {name} |"))
            assert f"{sum(diffs) / len(diffs):+.3f} [" in row and f"| {sum(d > 0 for d in diffs)}/{len(seeds)} |" in row
    assert not any(line.startswith("| trained | iw_opd_0.5 |") for line in lines)  # (not paired with itself)
    assert "\n".join(lines) in summary_markdown(results, 0.0)
    without = dict(results, config=dict(results["config"], weightings=["uniform", "tip"]))
    assert iw_opd_lines(without) == []
