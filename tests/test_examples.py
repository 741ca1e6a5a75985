"""The runnable examples in examples/ run (a few steps)."""

import subprocess
import sys
from pathlib import Path

from utils import run_torchrun

ROOT = Path(__file__).resolve().parent.parent


def test_custom_loop_example(tmp_path):
    out = tmp_path / "position_bias.pt"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "opd_custom_loop.py"), "--steps", "2",
                             "--micro-batch-size", "4", "--monitor-out", str(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step   1  loss" in result.stdout and "share (weighted)" in result.stdout
    assert out.exists()


def test_tensor_parallel_example():
    """examples/tp_distill.py under torchrun with 2 CPU ranks (gloo): the sharded loss and gradients equal one
    process's on the full vocabulary (the script checks and exits non-zero otherwise)."""
    result = run_torchrun("examples/tp_distill.py", "--steps", "2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "step   1  loss" in result.stdout, result.stdout
    assert "match one process on the full vocabulary: True" in result.stdout, result.stdout
    assert "trunk replicas identical on all 2 ranks: True" in result.stdout, result.stdout


def test_context_parallel_example():
    """examples/context_parallel.py under torchrun with 2 CPU ranks: Megatron's load-balanced split, IW-OPD
    weights; the ranks' loss and the all-reduced gradients equal one process's on the whole batch (the script
    checks and exits non-zero otherwise), and weighing each rank's chunks alone gives another loss."""
    result = run_torchrun("examples/context_parallel.py", "--steps", "2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "match one process on the whole batch: True" in result.stdout, result.stdout
    line = next(x for x in result.stdout.splitlines() if x.startswith("last step"))
    numbers = [float(w.rstrip(",")) for w in line.replace(",", " ").split() if w[0].isdigit()]
    assert abs(numbers[0] - numbers[1]) < 1e-4 < abs(numbers[0] - numbers[2]), line
