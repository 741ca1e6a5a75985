"""The benchmark runs end to end on a CPU: results JSON, markdown table, interpreter smoke, plots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(*args, timeout=600):
    env = dict(os.environ, TRITON_INTERPRET="1", TRL_EXPERIMENTAL_SILENCE="1")
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run = _bench("--shapes", "48x384:float32", "--providers", "eager", "wpkl-torch", "trl", "wpkl", "--out", str(out),
                 "--no-progress", "--device", "cpu", "--linear-shapes", "40x16x384:float32")
    assert run.returncode == 0, run.stderr[-3000:]
    files = list(out.glob("*.json"))
    assert len(files) == 1
    return files[0], json.loads(files[0].read_text()), run


def test_rows_and_metadata(results):
    path, data, run = results
    meta, rows = data["meta"], data["rows"]
    assert "GPU numbers need a GPU" in run.stderr
    assert meta["device_kind"] == "cpu" and meta["copy_gbps"] > 0 and "torch" in meta["versions"]
    rows = [r for r in rows if not r["case"].startswith("linear-")]
    timed = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in timed} == {"eager", "wpkl-torch", "trl"}
    for r in timed:
        assert r["ms"] > 0 and r["gbps"] > 0 and 0 < r["copy_fraction"] and r["peak_extra_mib"] is not None
    # TRL has no combined weighting; the Triton kernels are not timed on a CPU, only smoke-tested.
    assert any(r["provider"] == "trl" and r["case"] == "combined" and r["status"] == "skipped" for r in rows)
    smoke = [r for r in rows if r["provider"] == "wpkl" and r["status"].startswith("smoke")]
    assert len(smoke) == 11 and all(r["status"] == "smoke-ok" for r in smoke)
    # Every provider computed the same loss for the same case and shape.
    for case in ("uniform", "combined", "iw_opd", "topk", "power_opd", "tip", "mopd", "mopd_jsd", "mopd_sampled",
                 "mopd_topk", "mopd_logits_topk"):
        losses = {r["note"] for r in timed if r["case"] == case and r["mode"] == "fwd"}
        assert len(losses) == 1, (case, losses)
    markdown = path.with_suffix(".md").read_text()
    assert markdown.count("| N=48 V=384 float32 |") >= 12
    # The torch path's time against eager torch, per case (issue: it must be at least as fast at N=2048 V=32000).
    assert "wpkl's torch path against eager torch" in markdown
    for case in ("uniform", "combined", "iw_opd", "topk", "power_opd", "tip", "mopd", "mopd_jsd", "mopd_sampled",
                 "mopd_topk", "mopd_logits_topk"):
        assert f"- {case} N=48 V=384 float32: " in markdown


def test_plot(results, tmp_path):
    path, _, _ = results
    pytest.importorskip("matplotlib")
    run = _bench("--plot", str(path), "--plot-dir", str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 13 and all(p.stat().st_size > 10_000 for p in pngs)  # 11 logits cases, 2 fused-linear


def test_help_lists_options():
    run = _bench("--help")
    assert run.returncode == 0
    for option in ("--quick", "--shapes", "--providers", "--plot", "--budget"):
        assert option in run.stdout


def test_fused_linear_suite(results):
    """wpkl's fused-linear loss against TRL's chunked divergence, materialized eager torch and the bare GEMMs: the
    same loss, timed, with peak memory; Liger needs CUDA."""
    path, data, _ = results
    linear = [r for r in data["rows"] if r["case"].startswith("linear-")]
    timed = {(r["case"], r["provider"]): r for r in linear if r["status"] == "ok"}
    assert set(timed) == {("linear-uniform", p) for p in ("wpkl", "trl", "eager", "gemms")} | {
        ("linear-combined", p) for p in ("wpkl", "eager")}
    for r in timed.values():
        assert r["ms"] > 0 and r["tflops"] > 0 and r["peak_extra_mib"] is not None and r["hidden"] == 16
    for case in ("linear-uniform", "linear-combined"):
        losses = {r["note"] for (c, p), r in timed.items() if c == case and p != "gemms"}
        assert len(losses) == 1, losses
    liger = [r for r in linear if r["provider"] == "liger"]
    assert liger and all(r["status"] == "skipped" for r in liger)
    markdown = path.with_suffix(".md").read_text()
    assert "| N=40 H=16 V=384 float32 | gemms |" in markdown and "x GEMMs" in markdown
