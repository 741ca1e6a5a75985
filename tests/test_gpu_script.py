"""bench/gpu.sh, the one command a borrowed GPU machine runs, rehearsed on this CPU: ``--dry-run`` walks every step
(versions, GPU tests, kernel report, both benchmark suites, the sharded and sequence-parallel benchmarks on 2
gloo ranks, plots) at tiny sizes without installing anything."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "gpu"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", str(out)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    for step in ("== install (dry run", "== GPU test suite", "gpu tests exit 0", "== kernel resource report",
                 "report exit 0", "bench (logits) exit 0", "bench (fused-linear) exit 0", "bench (sharded) exit 0",
                 "bench (sequence) exit 0", "done in"):
        assert step in summary, (step, summary)
    assert "no GPU" in (out / "versions.txt").read_text()
    assert list((out / "bench").glob("*.json")) and list((out / "bench-linear").glob("*.json"))
    sharded = list((out / "bench-sharded").glob("sharded-*.json"))
    assert sharded and "2 ranks on the CPU" in sharded[0].with_suffix(".md").read_text()
    sequence = list((out / "bench-sequence").glob("sequence-*.json"))
    assert sequence and "all_reduce" in sequence[0].with_suffix(".md").read_text()  # the bytes it records
    assert list((out / "figures").glob("*.png"))
    assert (out / "kernel-report.json").exists() and list((out / "sass").glob("*.sass"))
