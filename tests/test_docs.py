"""The docs stay true: CI runs the README's test command, and the README's quickstart API exists."""

import inspect
import re
from pathlib import Path

import wpkl

ROOT = Path(__file__).resolve().parent.parent


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Develop: set up, then test", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.strip() for line in block.strip().splitlines()]
    assert len(lines) == 2, "the README gives two commands: set up, then test"
    return lines[1]


def test_ci_runs_the_readme_test_command():
    command = _readme_test_command()
    assert "pytest" in command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in [line.strip() for line in ci], f"{command!r} is not a line of .ci/run"


def test_readme_signature_matches_the_code():
    readme = " ".join((ROOT / "README.md").read_text().split())
    for function in (wpkl.weighted_kl_loss, wpkl.fused_linear_kl_loss, wpkl.FusedLinearWeightedKLLoss):
        for name, param in inspect.signature(function).parameters.items():
            default = "" if param.default is inspect.Parameter.empty else f"={param.default!r}"
            assert f"{name}{default}".replace("'", '"') in readme, f"README lacks {name}{default} ({function})"
    for name in ("ExpDecay(half_life)", "PowerDecay(alpha)", "PositionTable(values)", "PositionWindow(start, end)"):
        assert name in readme


def test_documented_kernels_name_their_bytes():
    for path in (ROOT / "kernels").glob("token_divergence_*.py"):
        doc = path.read_text().split('"""')[1]
        assert re.search(r"Passes over \[N, V\]", doc) and "Memory per valid token" in doc, path


def test_import_is_light():
    """`import wpkl` needs only torch: Triton, TRL and matplotlib load when (and if) they are used."""
    import subprocess
    import sys

    code = ("import sys, wpkl, wpkl.audit; heavy = [m for m in ('triton', 'trl', 'matplotlib', 'transformers') "
            "if m in sys.modules]; print(heavy); assert not heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_documented_attribute_access_works_after_a_bare_import():
    """README: `import wpkl; wpkl.audit.PositionBiasMonitor()` works, and a bare import stays light."""
    import subprocess
    import sys

    code = ("import sys, wpkl; assert 'wpkl.audit' not in sys.modules; m = wpkl.audit.PositionBiasMonitor(); "
            "import wpkl.integrations; print(type(m).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "PositionBiasMonitor" in result.stdout, result.stdout + result.stderr


def test_license_ships_with_the_package():
    """pyproject declares Apache-2.0; the LICENSE file holds its text and the installed metadata names it."""
    import importlib.metadata

    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"
    meta = importlib.metadata.metadata("wpkl")
    assert "LICENSE" in (meta.get_all("License-File") or []), meta.get_all("License-File")


def test_lint():
    """pyflakes and bugbear checks (ruff, configured in pyproject.toml): unused names, undefined names, traps."""
    import shutil
    import subprocess

    import pytest

    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the test extra)")
    result = subprocess.run([ruff, "check", "--output-format", "concise", "wpkl", "kernels", "bench", "tests",
                             "examples"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
