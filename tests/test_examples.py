"""The runnable example in examples/ runs (a few steps)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_custom_loop_example(tmp_path):
    out = tmp_path / "position_bias.pt"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "opd_custom_loop.py"), "--steps", "2",
                             "--micro-batch-size", "4", "--monitor-out", str(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step   1  loss" in result.stdout and "share (weighted)" in result.stdout
    assert out.exists()
